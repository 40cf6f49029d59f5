import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_pipeline, seeded
from qac_diffusers import FSQConditionEncoder, QACPipeline
from qac_diffusers.models import quantize, straight_through_quantize


def small_encoder(**kwargs):
    config = {"in_channels": 1, "sample_size": 8, "block_out_channels": (8, 8), "norm_num_groups": 4, "code_dim": 4}
    return FSQConditionEncoder(**{**config, **kwargs})


def test_quantize_pinned_levels():
    y = torch.tensor([-20.0, -0.1, 0.0, 0.1, 20.0, 100.0])
    assert quantize(y, 2).tolist() == [0, 0, 1, 1, 1, 1]
    # L = 3: floor(3 * sigmoid(y)) = floor(0.81), floor(1.5), floor(2.19), and 3 clamped to 2 where sigmoid(y) == 1.0
    assert quantize(torch.tensor([-1.0, 0.0, 1.0, 100.0]), 3).tolist() == [0, 1, 2, 2]


@pytest.mark.parametrize("straight_through", ["sigmoid", "identity"])
def test_straight_through_value_and_gradient(straight_through):
    y = torch.tensor([-3.0, -0.5, 0.5, 3.0], requires_grad=True)
    y_q = straight_through_quantize(y, 2, straight_through)
    assert y_q.tolist() == [0, 0, 1, 1]
    y_q.sum().backward()
    expected = torch.ones(4) if straight_through == "identity" else torch.sigmoid(y) * (1 - torch.sigmoid(y))
    assert torch.allclose(y.grad, expected.detach())


def far_and_boundary_inputs(dtype: torch.dtype) -> torch.Tensor:
    """|y| from 1e-30 to 1e30 (both signs, past 2**24 where y + (f(y) - y) rounds), zeros and random values."""
    magnitudes = torch.logspace(-30, 30, 241, dtype=torch.float64)
    random = torch.randn(2000, generator=seeded(0), dtype=torch.float64) * 4
    return torch.cat([magnitudes, -magnitudes, torch.zeros(1), random]).to(dtype)


@pytest.mark.parametrize("straight_through", ["sigmoid", "identity"])
@pytest.mark.parametrize("code_levels", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_forward_is_exactly_f_of_y_for_any_finite_y(straight_through, code_levels, dtype):
    y = far_and_boundary_inputs(dtype).requires_grad_()
    y_q = straight_through_quantize(y, code_levels, straight_through)
    assert y_q.dtype == dtype
    assert torch.equal(y_q, quantize(y.detach(), code_levels))


@pytest.mark.parametrize("straight_through", ["sigmoid", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradient_is_that_of_the_surrogate_for_any_finite_y(straight_through, dtype):
    y = far_and_boundary_inputs(dtype).requires_grad_()
    (gradient,) = torch.autograd.grad(straight_through_quantize(y, 5, straight_through).sum(), y)
    surrogate = y if straight_through == "identity" else 4 * torch.sigmoid(y)
    (expected,) = torch.autograd.grad(surrogate.sum(), y)
    assert torch.equal(gradient, expected)
    if straight_through == "identity":
        assert torch.equal(gradient, torch.ones_like(y))


def test_identity_estimator_keeps_valid_codes_when_y_is_huge():
    # The regime the literal estimator drifts into (|y| ~ 1e8 and beyond): every code must still be a valid level.
    encoder = small_encoder(code_dim=4, code_levels=2, straight_through="identity")
    torch.nn.init.zeros_(encoder.proj_out.weight)
    with torch.no_grad():
        encoder.proj_out.bias.copy_(torch.tensor([1e8, -1e8, 3e9 + 1, -5e10]))
    output = encoder(torch.zeros(1, 1, 8, 8))
    assert output.codes.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert output.indices.tolist() == [5]


def test_index_round_trip_covers_the_codebook():
    encoder = small_encoder(code_dim=4, code_levels=3)
    indices = torch.arange(3**4)
    codes = encoder.indices_to_codes(indices)
    assert codes.shape == (81, 4)
    assert torch.equal(encoder.codes_to_indices(codes), indices)
    # Mixed radix, channel 0 least significant: 1 + 2*3 + 0*9 + 1*27 = 34
    assert encoder.codes_to_indices(torch.tensor([[1.0, 2.0, 0.0, 1.0]])).item() == 34
    assert encoder.indices_to_codes(torch.tensor(34)).tolist() == [1, 2, 0, 1]


def test_forward_codes_indices_and_gradient():
    torch.manual_seed(0)
    encoder = small_encoder()
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    output = encoder(images)
    assert output.codes.shape == (5, 4) and output.indices.shape == (5,) and output.indices.dtype == torch.long
    assert set(output.codes.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(output.codes, (output.pre_quantized >= 0).float())
    assert torch.equal(output.indices, encoder.codes_to_indices(output.codes))
    output.codes.sum().backward()
    assert encoder.conv_in.weight.grad.abs().sum() > 0
    codes, indices, pre_quantized = encoder(images, return_dict=False)
    assert torch.equal(indices, output.indices)


def test_output_survives_accelerate_mixed_precision_conversion():
    from accelerate.utils.operations import convert_to_fp32

    output = small_encoder()(torch.rand(2, 1, 8, 8))
    converted = convert_to_fp32(output)
    assert type(converted) is type(output)
    assert torch.equal(converted.indices, output.indices) and torch.equal(converted.codes, output.codes)


def test_update_code_weights_is_the_ema_of_the_batch_histogram():
    encoder = small_encoder(code_dim=3)
    encoder.update_code_weights(torch.tensor([1, 1, 3, 5]), decay=0.9)
    expected = torch.zeros(8)
    expected[[1, 3, 5]] = torch.tensor([0.5, 0.25, 0.25]) * 0.1
    assert torch.allclose(encoder.code_weights, expected)
    encoder.update_code_weights(torch.tensor([0, 0]), decay=0.5)
    expected = expected * 0.5
    expected[0] += 0.5
    assert torch.allclose(encoder.code_weights, expected)
    with pytest.raises(ValueError, match="decay"):
        encoder.update_code_weights(torch.tensor([0]), decay=1.5)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        encoder.update_code_weights(torch.tensor([8]), decay=0.5)


def test_code_weights_without_the_device_reading_checks_are_bincounts_bit_for_bit(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    encoder, indices = small_encoder(code_dim=6), torch.randint(0, 64, (1000,), generator=generator)
    encoder.code_weights.copy_(torch.rand(64, generator=generator))
    counts = torch.bincount(indices, minlength=64).float()
    expected = encoder.code_weights.clone().mul_(0.9).add_(counts / 1000, alpha=1.0 - 0.9)  # the bincount version
    monkeypatch.setattr(type(encoder), "check_indices", lambda *args: pytest.fail("the trainer's path checks"))
    encoder.update_code_weights(indices, decay=0.9, check_indices=False)
    assert torch.equal(encoder.code_weights, expected)
    # the forward pass converts its own codes without the range check (which reads the device)
    monkeypatch.setattr(type(encoder), "codes_to_indices", lambda *args: pytest.fail("forward checks its codes"))
    output = encoder(torch.rand(3, 1, 8, 8) * 2 - 1)
    assert torch.equal(output.indices, (output.codes.long() * encoder.radix).sum(-1))


def test_sample_indices_follows_the_weights_and_is_seeded():
    encoder = small_encoder(code_dim=2)
    with pytest.raises(ValueError, match="all zero"):
        encoder.sample_indices(3)
    encoder.code_weights.copy_(torch.tensor([0.0, 1.0, 0.0, 3.0]))
    draws = encoder.sample_indices(20000, torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {1, 3}
    assert abs((draws == 3).float().mean().item() - 0.75) < 0.02
    again = encoder.sample_indices(20000, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    per_image = encoder.sample_indices(2, [torch.Generator().manual_seed(s) for s in (0, 1)])
    assert per_image[0] == encoder.sample_indices(1, torch.Generator().manual_seed(0))[0]
    with pytest.raises(ValueError, match="one per sample"):
        encoder.sample_indices(3, [torch.Generator()])


def test_bad_indices_and_images_are_refused():
    encoder = small_encoder(code_dim=2)
    with pytest.raises(ValueError, match="integer"):
        encoder.indices_to_codes(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        encoder.indices_to_codes(torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\)"):
        encoder(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\)"):
        encoder(torch.zeros(1, 1, 16, 16))


def test_codebook_limits():
    with pytest.raises(ValueError, match="2\\*\\*24"):
        small_encoder(code_dim=25, code_levels=2)
    with pytest.raises(ValueError, match="code_levels"):
        small_encoder(code_levels=1)
    with pytest.raises(ValueError, match="straight_through"):
        small_encoder(straight_through="tanh")
    assert small_encoder(code_dim=20).code_weights.shape == (2**20,)


def test_save_and_load_keep_code_weights_in_safetensors(tmp_path):
    encoder = small_encoder(straight_through="identity")
    encoder.code_weights.copy_(torch.rand(16))
    encoder.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")["code_weights"]
    assert torch.equal(saved, encoder.code_weights)
    loaded = FSQConditionEncoder.from_pretrained(tmp_path)
    assert torch.equal(loaded.code_weights, encoder.code_weights)
    assert loaded.config.straight_through == "identity"
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(loaded(images).indices, encoder(images).indices)


def test_for_unet_is_a_small_share_of_the_denoiser(tiny_models):
    unet, _ = tiny_models
    encoder = FSQConditionEncoder.for_unet(unet, code_dim=20)
    assert encoder.config.block_out_channels == (8, 8)
    assert (encoder.config.in_channels, encoder.config.sample_size) == (1, 8)
    share = sum(p.numel() for p in encoder.parameters()) / sum(p.numel() for p in unet.parameters())
    assert share < 0.05


def rare_code_weights(size: int) -> torch.Tensor:
    """Weights with codes below float16's resolution (6e-8) and close values that float16 merges."""
    weights = torch.full((size,), 1e-9)
    weights[: size // 2] = 1.0 + torch.arange(size // 2) * 1e-5
    return weights


@pytest.mark.parametrize(
    "cast",
    [
        lambda encoder: encoder.half(),
        lambda encoder: encoder.bfloat16(),
        lambda encoder: encoder.to(torch.float16),
        lambda encoder: encoder.to(dtype=torch.float16),
        lambda encoder: encoder.to("cpu", torch.bfloat16),
        lambda encoder: encoder.double(),
    ],
    ids=["half", "bfloat16", "to_dtype", "to_dtype_keyword", "to_device_and_dtype", "double"],
)
def test_code_weights_stay_float32_when_the_encoder_is_cast(cast):
    encoder = small_encoder()
    weights = rare_code_weights(16)
    encoder.code_weights.copy_(weights)
    cast(encoder)
    assert encoder.conv_in.weight.dtype != torch.float32
    assert encoder.code_weights.dtype == torch.float32
    assert torch.equal(encoder.code_weights, weights)


def test_code_weights_follow_the_device():
    encoder = small_encoder().to("meta", torch.float16)
    assert encoder.code_weights.device.type == "meta"
    assert encoder.code_weights.dtype == torch.float32
    assert encoder.conv_in.weight.device.type == "meta"


def test_code_weights_stay_float32_through_from_pretrained_with_torch_dtype(tmp_path):
    encoder = small_encoder()
    encoder.code_weights.copy_(rare_code_weights(16))
    encoder.save_pretrained(tmp_path)
    loaded = FSQConditionEncoder.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert loaded.conv_in.weight.dtype == torch.float16
    assert loaded.code_weights.dtype == torch.float32
    assert torch.equal(loaded.code_weights, encoder.code_weights)


def test_half_precision_encoder_samples_the_same_codes():
    encoder = small_encoder()
    encoder.code_weights.copy_(rare_code_weights(16))
    expected = encoder.sample_indices(50, seeded(1))
    assert torch.equal(encoder.half().sample_indices(50, seeded(1)), expected)
    assert encoder(torch.zeros(2, 1, 8, 8, dtype=torch.float16)).indices.shape == (2,)


def test_pipeline_cast_and_load_in_float16_keep_float32_code_weights(tmp_path):
    pipe = make_tiny_pipeline()
    pipe.encoder.code_weights.copy_(rare_code_weights(pipe.encoder.codebook_size))
    weights = pipe.encoder.code_weights.clone()
    pipe.save_pretrained(tmp_path)
    pipe.to(torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert pipe.encoder.code_weights.dtype == torch.float32
    assert torch.equal(pipe.encoder.code_weights, weights)
    loaded = QACPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert loaded.unet.dtype == torch.float16
    assert loaded.encoder.code_weights.dtype == torch.float32
    assert torch.equal(loaded.encoder.code_weights, weights)
