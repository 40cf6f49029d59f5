"""RNE's noise encoder: q(z | x) of the image's shape, the beta-weighted KL, and the backbone shared with QAC."""

import pytest
import torch

from conftest import make_tiny_models, seeded
from qac_diffusers.models.noise_encoder import NoiseEncoder, encode_jointly


SHAPE = (3, 1, 8, 8)


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(SHAPE, generator=seeded(seed)) * 2 - 1


@pytest.fixture
def noise_encoder():
    unet, _ = make_tiny_models()
    encoder = NoiseEncoder.for_unet(unet, beta=20.0)
    torch.nn.init.normal_(encoder.conv_out.weight, std=0.2)  # a fresh one is the independent coupling
    return encoder


def test_a_fresh_noise_encoder_is_the_independent_coupling():
    unet, _ = make_tiny_models()
    output = NoiseEncoder.for_unet(unet)(images(), generator=seeded(1))
    torch.testing.assert_close(output.noise, torch.randn(SHAPE, generator=seeded(1)), rtol=0, atol=0)
    assert output.kl.item() == 0


def test_the_kl_term_matches_a_hand_computation(noise_encoder):
    output = noise_encoder(images(), generator=seeded(2))
    assert output.noise.shape == output.mean.shape == output.logvar.shape == SHAPE
    # RNE's get_kl: the KL of each image summed over its 64 dimensions, divided by 64, averaged over the 3 images
    mean, var = output.mean.double(), output.logvar.double().exp()
    per_image = 0.5 * (mean**2 + var - 1 - var.log()).sum(dim=(1, 2, 3)) / 64
    torch.testing.assert_close(output.kl.double(), per_image.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(output.prior_loss, 20.0 * output.kl)
    assert output.kl.item() > 0


def test_the_noise_is_reparameterized(noise_encoder):
    output = noise_encoder(images(), generator=seeded(3))
    expected = output.mean + (0.5 * output.logvar).exp() * torch.randn(SHAPE, generator=seeded(3))
    torch.testing.assert_close(output.noise, expected)


def test_the_unit_noise_can_be_passed(noise_encoder):
    unit = torch.randn(SHAPE, generator=seeded(6))
    output = noise_encoder(images(), noise=unit)
    torch.testing.assert_close(output.noise, output.mean + (0.5 * output.logvar).exp() * unit)


def test_a_negative_beta_is_refused():
    with pytest.raises(ValueError, match=r"`beta` weighs the KL term .* >= 0, got -1.0. RNE's paper uses beta = 20"):
        NoiseEncoder(beta=-1.0)


def test_qac_and_rne_share_one_backbone_with_two_heads():
    _, condition_encoder = make_tiny_models()
    head = NoiseEncoder.for_encoder(condition_encoder, beta=20.0)
    torch.nn.init.normal_(head.conv_out.weight, std=0.2)
    assert not any(key.startswith(("conv_in", "down_blocks")) for key in head.state_dict())
    codes, noise = encode_jointly(condition_encoder, head, images(), generator=seeded(4))
    torch.testing.assert_close(codes.indices, condition_encoder(images()).indices, rtol=0, atol=0)
    (noise.prior_loss + noise.noise.square().mean()).backward()
    # the noise head's loss trains the shared backbone
    assert condition_encoder.conv_in.weight.grad.abs().sum() > 0


def test_a_gaussian_condition_and_the_noise_head_each_take_their_own_unit_noise():
    from qac_diffusers.models import GaussianConditionEncoder

    unet, _ = make_tiny_models()
    condition_encoder = GaussianConditionEncoder.for_unet(unet, code_dim=6)
    head = NoiseEncoder.for_encoder(condition_encoder)
    code_noise, pixel_noise = torch.randn((3, 6), generator=seeded(1)), torch.randn(SHAPE, generator=seeded(2))
    codes, noise = encode_jointly(
        condition_encoder, head, images(), noise=pixel_noise,
        code_head_kwargs={"sample_posterior": True, "noise": code_noise},
    )
    alone = condition_encoder(images(), sample_posterior=True, noise=code_noise)
    torch.testing.assert_close(codes.codes, alone.codes, rtol=0, atol=0)
    torch.testing.assert_close(noise.noise, pixel_noise, rtol=0, atol=0)  # a fresh head: z = n


def test_a_shared_noise_head_is_not_run_alone():
    _, condition_encoder = make_tiny_models()
    head = NoiseEncoder.for_encoder(condition_encoder)
    with pytest.raises(ValueError, match=r"shared_backbone=True.*encode_jointly\(condition_encoder"):
        head(images())


def test_encode_jointly_refuses_a_head_built_for_another_backbone(noise_encoder):
    _, condition_encoder = make_tiny_models()
    with pytest.raises(ValueError, match="has its own backbone"):
        encode_jointly(condition_encoder, noise_encoder, images())
    other = NoiseEncoder(in_channels=1, sample_size=8, block_out_channels=(16, 16), norm_num_groups=8,
                         shared_backbone=True)
    with pytest.raises(ValueError, match=r"differ in \{'block_out_channels'"):
        encode_jointly(condition_encoder, other, images())


def test_save_and_load_round_trip(noise_encoder, tmp_path):
    noise_encoder.save_pretrained(tmp_path)
    loaded = NoiseEncoder.from_pretrained(tmp_path)
    assert loaded.config.beta == 20.0
    torch.testing.assert_close(
        loaded(images(), generator=seeded(5)).noise, noise_encoder(images(), generator=seeded(5)).noise, rtol=0, atol=0
    )
