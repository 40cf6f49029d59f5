"""The Gaussian (VAE-style) condition encoder: the FSQ backbone, a KL term, conditions from the prior, no indices."""

import pytest
import torch

from conftest import make_tiny_models, seeded
from qac_diffusers.models.gaussian_condition_encoder import GaussianConditionEncoder, gaussian_kl


@pytest.fixture
def encoder():
    unet, _ = make_tiny_models()
    return GaussianConditionEncoder.for_unet(unet, code_dim=4, kl_weight=0.5)


def test_kl_matches_a_hand_computation():
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    logvar = torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(4.0)), 0.0]])
    # per entry 0.5 * (mean^2 + var - 1 - logvar): 0, 0.5, 0.5 * (4 + 4 - 1 - ln 4), 0.5; mean over 4 entries
    expected = (0 + 0.5 + 0.5 * (7 - torch.log(torch.tensor(4.0))) + 0.5) / 4
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)


def test_the_backbone_is_the_fsq_encoders(encoder):
    _, fsq = make_tiny_models()
    assert {key for key in fsq.state_dict() if not key.startswith(("proj_out", "code_weights"))} == {
        key for key in encoder.state_dict() if not key.startswith(("proj_mean", "proj_logvar"))
    }


def test_forward_gives_the_mean_or_a_reparameterized_sample(encoder):
    images = torch.rand(3, 1, 8, 8, generator=seeded(0)) * 2 - 1
    output = encoder(images)
    torch.testing.assert_close(output.codes, output.mean)
    sampled = encoder(images, generator=seeded(1), sample_posterior=True)
    noise = torch.randn(3, 4, generator=seeded(1))
    torch.testing.assert_close(sampled.codes, output.mean + (0.5 * output.logvar).exp() * noise)
    passed = encoder(images, sample_posterior=True, noise=noise)
    torch.testing.assert_close(passed.codes, sampled.codes, rtol=0, atol=0)
    torch.testing.assert_close(output.kl, gaussian_kl(output.mean, output.logvar))
    torch.testing.assert_close(output.prior_loss, 0.5 * output.kl)


def test_the_kl_term_trains_the_encoder(encoder):
    images = torch.rand(3, 1, 8, 8, generator=seeded(2)) * 2 - 1
    encoder(images, generator=seeded(3), sample_posterior=True).prior_loss.backward()
    assert encoder.conv_in.weight.grad.abs().sum() > 0


def test_sampling_draws_conditions_from_the_prior(encoder):
    codes = encoder.sample_codes(2, seeded(4))
    torch.testing.assert_close(codes, torch.randn(2, 4, generator=seeded(4)))


@pytest.mark.parametrize("name", ["sample_indices", "indices_to_codes", "codes_to_indices", "update_code_weights"])
def test_asking_for_code_indices_is_refused(encoder, name):
    with pytest.raises(ValueError, match=rf"GaussianConditionEncoder.{name}: .* no codebook, code indices"):
        getattr(encoder, name)(torch.tensor([0]))


def test_asking_for_the_codebook_size_is_refused(encoder):
    with pytest.raises(ValueError, match="Draw conditions with `sample_codes"):
        encoder.codebook_size


def test_a_negative_kl_weight_is_refused():
    with pytest.raises(ValueError, match=r"`kl_weight` weighs the KL term .* must be >= 0, got -0.1"):
        GaussianConditionEncoder(kl_weight=-0.1)


def test_save_and_load_round_trip(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    loaded = GaussianConditionEncoder.from_pretrained(tmp_path)
    assert loaded.config.kl_weight == 0.5
    images = torch.rand(2, 1, 8, 8, generator=seeded(5)) * 2 - 1
    torch.testing.assert_close(loaded(images).mean, encoder(images).mean, rtol=0, atol=0)
