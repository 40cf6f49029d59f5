import json

import pytest
import torch

from qac_diffusers import IPNDMScheduler
from qac_diffusers.training.code_usage import batch_code_usage, code_usage
from qac_diffusers.training.edm_loss import EDMLoss
from qac_diffusers.training.ema import ema_decay, update_ema
from qac_diffusers.training.presets import PRESETS, resolve_model_config


def test_ema_decay_follows_edm_half_life_with_ramp_up():
    # Early: the half-life is capped at 5% of the images seen (50 images), so two half-lives pass in one batch of 100.
    assert ema_decay(1000, 100, halflife_kimg=500, rampup_ratio=0.05) == pytest.approx(0.25)
    # Late (or without ramp-up): 0.5 ** (batch / halflife).
    assert ema_decay(10**9, 100, halflife_kimg=500, rampup_ratio=0.05) == pytest.approx(0.5 ** (100 / 500_000))
    assert ema_decay(1000, 100, halflife_kimg=500, rampup_ratio=None) == pytest.approx(0.5 ** (100 / 500_000))


def test_update_ema_interpolates_parameters():
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), ema.weight.fill_(3.0)
    update_ema(ema, model, decay=0.75)
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.75 * 3.0 + 0.25 * 1.0))


class ZeroNetwork(torch.nn.Module):
    """F = 0, so D(x; sigma) = c_skip * x."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, code=None):
        return type("Output", (), {"sample": torch.zeros_like(sample)})()


def test_edm_loss_matches_the_formula():
    scheduler = IPNDMScheduler()
    loss_fn = EDMLoss(scheduler)
    images = torch.linspace(-1, 1, 2 * 1 * 2 * 2).reshape(2, 1, 2, 2)
    sigma, noise = loss_fn.sample_noise(images.shape, torch.Generator().manual_seed(0))
    assert sigma.shape == (2, 1, 1, 1) and noise.shape == images.shape
    loss = loss_fn(ZeroNetwork(), images, sigma, noise)
    sigma_data = 0.5
    noisy = images + sigma * noise
    denoised = sigma_data**2 / (sigma**2 + sigma_data**2) * noisy
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    assert loss.item() == pytest.approx((weight * (denoised - images) ** 2).mean().item(), rel=1e-6)


def test_sigma_distribution_is_lognormal():
    loss_fn = EDMLoss(IPNDMScheduler(), P_mean=-1.2, P_std=1.2)
    sigma, _ = loss_fn.sample_noise((20000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.03)


def test_code_usage_numbers():
    weights = torch.zeros(16)
    weights[[1, 2, 3]] = torch.tensor([0.5, 0.25, 0.25])
    usage = code_usage(weights)
    assert usage == {"codes_used": 3, "entropy_bits": pytest.approx(1.5), "perplexity": pytest.approx(2**1.5),
                     "largest_share": pytest.approx(0.5), "codes_for_half_weight": 1}
    assert code_usage(torch.zeros(4))["codes_used"] == 0
    stats = batch_code_usage(torch.tensor([3, 3, 3, 1]), torch.tensor([[-2.0, 2.0]]))
    assert stats == {"batch_distinct_codes": 2, "batch_largest_share": 0.75, "mean_abs_y": 2.0}


def test_presets_and_json_overrides(tmp_path):
    assert resolve_model_config("tiny")["unet"] == PRESETS["tiny"]["unet"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"code_dim": 12, "unet": {"layers_per_block": 2}, "encoder": {"layers_per_block": 3}}))
    config = resolve_model_config("tiny", str(path))
    assert config["code_dim"] == 12 and config["encoder"] == {"layers_per_block": 3}
    assert config["unet"]["layers_per_block"] == 2 and config["unet"]["block_out_channels"] == (32, 64)
    path.write_text(json.dumps({"unet_config": {}}))
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_model_config("tiny", str(path))
    with pytest.raises(ValueError, match="Unknown preset"):
        resolve_model_config("huge")
