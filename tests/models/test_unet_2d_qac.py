import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from conftest import seeded
from qac_diffusers import QACUNet2DModel


# Outputs compared across code paths or with pinned values: the last float bits differ between CPUs (oneDNN kernels).
LAST_BITS = {"rtol": 1e-5, "atol": 1e-6}


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
    zeros, ones = unet(sample, 0.5, code=torch.zeros(2, 6)).sample, unet(sample, 0.5, code=torch.ones(2, 6)).sample
    assert not torch.allclose(zeros, ones)


def test_python_float_timestep_is_not_truncated(tiny_models):
    unet, _ = tiny_models
    sample, code = torch.randn(1, 1, 8, 8), torch.ones(1, 6)
    as_tensor = unet(sample, torch.tensor([0.75]), code=code).sample
    assert torch.equal(unet(sample, 0.75, code=code).sample, as_tensor)
    assert not torch.equal(unet(sample, 0, code=code).sample, as_tensor)


EVERY_UNET2D_ARGUMENT = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 2,
    "center_input_sample": True,
    "time_embedding_type": "positional",
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
    "num_class_embeds": None,
    "num_train_timesteps": 7,
}


@pytest.mark.parametrize(
    "extra",
    [{"code_dim": 5, "code_levels": 3}, {"code_dim": 0, "num_class_embeds": 5}],
    ids=["codes", "classes_without_codes"],
)
def test_every_unet2d_argument_round_trips(tmp_path, extra):
    config = {**EVERY_UNET2D_ARGUMENT, **extra}
    model = QACUNet2DModel(**config)
    model.save_pretrained(tmp_path)
    loaded = QACUNet2DModel.from_pretrained(tmp_path)
    for key, value in config.items():
        saved = loaded.config[key]
        assert (tuple(saved) if isinstance(saved, list) else saved) == value, key
    sample = torch.randn(1, 3, 16, 16)
    model.eval(), loaded.eval()
    if extra["code_dim"]:
        inputs = {"code": torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0]])}
    else:
        inputs = {"class_labels": torch.tensor([1])}
    expected = model(sample, 0.2, **inputs).sample
    torch.testing.assert_close(loaded(sample, 0.2, **inputs).sample, expected, **LAST_BITS)


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


# Computed with the forward-hook implementation (before the code embedding took UNet2DModel's class-embedding slot):
# the outputs must stay bit-identical.
PINNED_FIRST = [
    -0.01926262490451336, -0.1965097039937973, -0.058478210121393204,
    -0.34153231978416443, -0.44050097465515137, -0.4055095613002777,
    0.10747813433408737, -0.205850750207901, 0.2887214124202728,
]  # fmt: skip
PINNED_SECOND = [
    0.16922135651111603, -0.20703503489494324, -0.10970290750265121,
    -0.12460950762033463, -0.17200931906700134, 0.09005354344844818,
    0.16369494795799255, -0.12637139856815338, -0.008314816281199455,
]  # fmt: skip


def pinned_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sample = torch.randn(2, 1, 8, 8, generator=seeded(0))
    code = torch.tensor([[1.0, 0, 1, 0, 1, 1], [0.0, 1, 1, 0, 0, 1]])
    return sample, torch.tensor([0.1, -0.7]), code


def assert_pinned_output(output: torch.Tensor) -> None:
    torch.testing.assert_close(output[0, 0, :3, :3].flatten(), torch.tensor(PINNED_FIRST), **LAST_BITS)
    torch.testing.assert_close(output[1, 0, -3:, -3:].flatten(), torch.tensor(PINNED_SECOND), **LAST_BITS)


def test_output_is_bit_identical_to_the_hook_implementation(tiny_models):
    unet, _ = tiny_models
    sample, timestep, code = pinned_inputs()
    assert_pinned_output(unet(sample, timestep, code=code).sample)


# What QACUNet2DModel.save_pretrained wrote before the code embedding took the class-embedding slot.
LEGACY_CODE_EMBEDDING_KEYS = {
    "code_embedding.linear_1.weight",
    "code_embedding.linear_1.bias",
    "code_embedding.linear_2.weight",
    "code_embedding.linear_2.bias",
}


def legacy_state_dict(unet: QACUNet2DModel) -> dict[str, torch.Tensor]:
    """The model's weights under the key names of the forward-hook implementation."""
    legacy = {key.replace("class_embedding.", "code_embedding."): value for key, value in unet.state_dict().items()}
    assert LEGACY_CODE_EMBEDDING_KEYS <= set(legacy)
    return legacy


def test_checkpoints_saved_with_the_old_key_names_load(tiny_models, tmp_path):
    unet, _ = tiny_models
    unet.save_pretrained(tmp_path)
    weights_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({key: value.contiguous() for key, value in legacy_state_dict(unet).items()}, weights_file)
    sample, timestep, code = pinned_inputs()

    loaded = QACUNet2DModel.from_pretrained(tmp_path)
    assert_pinned_output(loaded(sample, timestep, code=code).sample)
    fresh = QACUNet2DModel.from_config(unet.config).eval()
    fresh.load_state_dict(load_file(weights_file))
    assert_pinned_output(fresh(sample, timestep, code=code).sample)


def test_saved_weights_use_diffusers_class_embedding_names(tiny_models, tmp_path):
    unet, _ = tiny_models
    unet.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert {key.replace("code_embedding.", "class_embedding.") for key in LEGACY_CODE_EMBEDDING_KEYS} <= keys
    assert not any(key.startswith("code_embedding.") for key in keys)


def test_a_forward_inside_a_forward_sees_only_its_own_code(tiny_models):
    # A per-call hook on the shared time embedding leaked into any forward running at the same time (threads,
    # or a nested call as here).
    unet, _ = tiny_models
    sample, timestep, code = pinned_inputs()
    inner_code = 1 - code
    expected_inner = unet(sample, timestep, code=inner_code).sample
    inner_outputs = []

    def run_inner_forward_once(*args):
        if not inner_outputs:
            inner_outputs.append(None)
            inner_outputs[0] = unet(sample, timestep, code=inner_code).sample

    hook = unet.conv_in.register_forward_hook(run_inner_forward_once)
    try:
        outer = unet(sample, timestep, code=code).sample
    finally:
        hook.remove()
    torch.testing.assert_close(inner_outputs[0], expected_inner, **LAST_BITS)
    assert_pinned_output(outer)


def test_compiles_as_one_graph(tiny_models):
    unet, _ = tiny_models
    sample, timestep, code = pinned_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    assert torch.equal(compiled(sample, timestep, code=code).sample, unet(sample, timestep, code=code).sample)


def test_from_unet_of_a_qac_baseline_starts_a_zero_code_embedding(tiny_unet_config):
    torch.manual_seed(0)
    baseline = QACUNet2DModel(**tiny_unet_config, code_dim=0).eval()
    qac = QACUNet2DModel.from_unet(baseline, code_dim=6, code_levels=3).eval()
    assert (qac.config.code_dim, qac.config.code_levels) == (6, 3)
    sample = torch.randn(2, 1, 8, 8)
    assert torch.equal(qac(sample, 0.3, code=torch.full((2, 6), 2.0)).sample, baseline(sample, 0.3).sample)


def test_from_unet_of_a_qac_unet_with_codes_is_refused(tiny_models):
    unet, _ = tiny_models
    with pytest.raises(ValueError, match=r"already a QACUNet2DModel with a code embedding \(code_dim=6"):
        QACUNet2DModel.from_unet(unet)


@pytest.mark.parametrize("time_embedding_type", ["fourier", "learned"])
def test_time_embeddings_that_cannot_take_c_noise_are_refused(tiny_unet_config, time_embedding_type):
    message = f"time_embedding_type='{time_embedding_type}'.*Use time_embedding_type='positional'"
    with pytest.raises(ValueError, match=message):
        QACUNet2DModel(**tiny_unet_config, time_embedding_type=time_embedding_type, num_train_timesteps=10)
    unet = UNet2DModel(**tiny_unet_config, time_embedding_type=time_embedding_type, num_train_timesteps=10)
    with pytest.raises(ValueError, match=message):
        QACUNet2DModel.from_unet(unet)


@pytest.mark.parametrize(
    "class_config",
    [{"num_class_embeds": 4}, {"class_embed_type": "timestep"}, {"class_embed_type": "identity"}],
    ids=["embedding", "timestep", "identity"],
)
def test_class_conditioning_with_codes_is_refused(tiny_unet_config, class_config):
    with pytest.raises(ValueError, match="class conditioning.*code_dim=0"):
        QACUNet2DModel(**tiny_unet_config, **class_config, code_dim=6)
    QACUNet2DModel(**tiny_unet_config, **class_config, code_dim=0)  # a class-conditional UNet without codes


def test_class_labels_are_refused_when_the_model_takes_codes(tiny_models):
    unet, _ = tiny_models
    with pytest.raises(ValueError, match="no class conditioning"):
        unet(torch.randn(1, 1, 8, 8), 0.5, code=torch.ones(1, 6), class_labels=torch.tensor([0]))
