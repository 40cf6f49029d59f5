"""Shared fixtures: tiny CPU models, offline."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
TINY_CODE_DIM = 6


@pytest.fixture
def tiny_unet_config():
    return dict(TINY_UNET_CONFIG)


def make_tiny_models(seed: int = 0, code_dim: int = TINY_CODE_DIM, channels: int = 1):
    """A tiny QAC UNet with a random (non-zero) code embedding, and its encoder with non-uniform code weights."""
    from qac_diffusers import FSQConditionEncoder, QACUNet2DModel

    torch.manual_seed(seed)
    unet = QACUNet2DModel(**{**TINY_UNET_CONFIG, "in_channels": channels, "out_channels": channels}, code_dim=code_dim)
    if code_dim == 0:
        return unet.eval(), None
    torch.nn.init.normal_(unet.code_embedding.linear_2.weight, std=0.5)
    encoder = FSQConditionEncoder.for_unet(unet, code_dim=code_dim)
    encoder.code_weights.copy_(torch.rand(encoder.codebook_size) ** 4)
    return unet.eval(), encoder.eval()


def make_tiny_pipeline(code_dim: int = TINY_CODE_DIM, channels: int = 1, pipeline_class=None):
    """A `QACPipeline` (or `pipeline_class`) around `make_tiny_models`, with IPNDMScheduler and no progress bar."""
    from qac_diffusers import IPNDMScheduler, QACPipeline

    unet, encoder = make_tiny_models(code_dim=code_dim, channels=channels)
    pipe = (pipeline_class or QACPipeline)(unet=unet, scheduler=IPNDMScheduler(), encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_rf_pipeline(scheduler=None, encoder="fsq", pipeline_class=None):
    """A tiny rectified-flow pipeline: the tiny UNet with its FSQ encoder, a Gaussian encoder, or none."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qac_diffusers import QACPipeline
    from qac_diffusers.models import GaussianConditionEncoder

    unet, fsq_encoder = make_tiny_models(code_dim=0 if encoder is None else 6)
    encoders = {"fsq": fsq_encoder, "gaussian": GaussianConditionEncoder.for_unet(unet, code_dim=6), None: None}
    pipe = (pipeline_class or QACPipeline)(
        unet=unet,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        encoder=encoders[encoder],
        formulation="rectified_flow",
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_unet_calls(pipe) -> list:
    """The timesteps of every later call of the pipeline's UNet, appended to the list returned."""
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[1]))
    return calls


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def tiny_models():
    return make_tiny_models()

from hub_server import fake_hub  # noqa: E402, F401  (the loopback Hub fixture)
