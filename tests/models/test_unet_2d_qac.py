import pytest
import torch
from diffusers import UNet2DModel

from qac_diffusers import QACUNet2DModel


def test_fresh_model_ignores_the_code_and_equals_unet2d(tiny_unet_config):
    torch.manual_seed(0)
    unet = UNet2DModel(**tiny_unet_config).eval()
    qac = QACUNet2DModel.from_unet(unet, code_dim=6).eval()
    sample, timestep = torch.randn(3, 1, 8, 8), torch.tensor(0.37)
    reference = unet(sample, timestep).sample
    for code in (torch.zeros(3, 6), torch.ones(3, 6), torch.randint(0, 2, (3, 6)).float()):
        assert torch.equal(qac(sample, timestep, code=code).sample, reference)


def test_fresh_model_built_directly_has_a_zero_code_embedding(tiny_unet_config):
    torch.manual_seed(0)
    qac = QACUNet2DModel(**tiny_unet_config, code_dim=6).eval()
    sample = torch.randn(2, 1, 8, 8)
    assert torch.equal(qac(sample, 0.5, code=torch.zeros(2, 6)).sample, qac(sample, 0.5, code=torch.ones(2, 6)).sample)


def test_trained_code_embedding_changes_the_output(tiny_models):
    unet, _ = tiny_models
    sample = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(unet(sample, 0.5, code=torch.zeros(2, 6)).sample, unet(sample, 0.5, code=torch.ones(2, 6)).sample)


def test_python_float_timestep_is_not_truncated(tiny_models):
    unet, _ = tiny_models
    sample, code = torch.randn(1, 1, 8, 8), torch.ones(1, 6)
    as_tensor = unet(sample, torch.tensor([0.75]), code=code).sample
    assert torch.equal(unet(sample, 0.75, code=code).sample, as_tensor)
    assert not torch.equal(unet(sample, 0, code=code).sample, as_tensor)


def test_every_unet2d_argument_round_trips(tmp_path):
    config = {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 2,
        "center_input_sample": True,
        "time_embedding_type": "fourier",
        "time_embedding_dim": 48,
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (12, 24),
        "layers_per_block": 1,
        "mid_block_scale_factor": 0.5,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": 0.1,
        "act_fn": "silu",
        "attention_head_dim": 4,
        "norm_num_groups": 4,
        "attn_norm_num_groups": 2,
        "norm_eps": 1e-4,
        "resnet_time_scale_shift": "scale_shift",
        "add_attention": False,
        "class_embed_type": None,
        "num_class_embeds": 5,
        "num_train_timesteps": 7,
        "code_dim": 5,
        "code_levels": 3,
    }
    model = QACUNet2DModel(**config)
    model.save_pretrained(tmp_path)
    loaded = QACUNet2DModel.from_pretrained(tmp_path)
    for key, value in config.items():
        saved = loaded.config[key]
        assert (tuple(saved) if isinstance(saved, list) else saved) == value, key
    sample = torch.randn(1, 3, 16, 16)
    model.eval(), loaded.eval()
    code = torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0]])
    labels = torch.tensor([1])
    expected = model(sample, 0.2, code=code, class_labels=labels).sample
    assert torch.allclose(loaded(sample, 0.2, code=code, class_labels=labels).sample, expected, atol=1e-5)


def test_code_errors(tiny_models, tiny_unet_config):
    unet, _ = tiny_models
    sample = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="pass `code` of shape \\(2, 6\\)"):
        unet(sample, 0.5)
    with pytest.raises(ValueError, match="must have shape \\(2, 6\\)"):
        unet(sample, 0.5, code=torch.ones(2, 5))
    baseline = QACUNet2DModel(**tiny_unet_config, code_dim=0)
    assert baseline.code_embedding is None
    assert baseline(sample, 0.5).sample.shape == sample.shape
    with pytest.raises(ValueError, match="code_dim=0"):
        baseline(sample, 0.5, code=torch.ones(2, 6))


def test_pinned_output_slice(tiny_models):
    unet, _ = tiny_models
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 1, 8, 8, generator=generator)
    output = unet(sample, torch.tensor(0.1), code=torch.tensor([[1.0, 0, 1, 0, 1, 1]])).sample
    expected = torch.tensor([-0.01926, -0.19651, -0.05848, -0.34153, -0.44050, -0.40551, 0.10748, -0.20585, 0.28872])
    assert torch.allclose(output[0, 0, :3, :3].flatten(), expected, atol=1e-4)
