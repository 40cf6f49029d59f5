"""Curvature and L_CFM against closed-form answers (single point, Gaussian, mixtures), and the pipeline helpers."""

import numpy as np
import pytest
import torch

from conftest import make_tiny_models
from qac_diffusers import IPNDMScheduler, QACPipeline
from qac_diffusers.metrics.trajectory import (
    conditional_flow_matching_loss,
    pipeline_conditional_flow_matching_loss,
    pipeline_curvature,
    pipeline_denoiser,
    trajectory_curvature,
    uniform_time_sigmas,
)
from qac_diffusers.models import NoiseEncoder
from qac_diffusers.schedulers.scheduling_ipndm import karras_sigmas


DIM = 4


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def point_denoiser(point):
    """Data concentrated at one point: D(x; sigma) = point exactly."""
    return lambda x, sigma: point.expand_as(x)


def gaussian_denoiser(scale):
    """Data ~ N(0, scale^2 I): D(x; sigma) = scale^2 / (scale^2 + sigma^2) x."""
    return lambda x, sigma: scale**2 / (scale**2 + sigma**2) * x


def mixture_denoiser(points, tau=0.0, component=None):
    """
    Data ~ uniform mixture of N(points_k, tau^2 I): D = (tau^2 x + sigma^2 sum_k w_k points_k) / (sigma^2 + tau^2),
    w = softmax_k(-|x - points_k|^2 / (2 (sigma^2 + tau^2))). With `component` (one index per sample), the conditional
    denoiser of that component alone.
    """

    def denoiser(x, sigma):
        variance = sigma**2 + tau**2
        logits = -torch.cdist(x, points).square() / (2 * variance)
        if component is not None:
            logits = torch.where(torch.arange(len(points)) == component[:, None], logits, -torch.inf)
        mean = torch.softmax(logits, dim=-1) @ points
        return (tau**2 * x + sigma**2 * mean) / variance

    return denoiser


TWO_POINTS = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 0.0]], dtype=torch.float64)


def noise(batch=64, seed=0):
    return torch.randn(batch, DIM, generator=seeded(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Curvature


def test_uniform_time_sigmas():
    sigmas = uniform_time_sigmas(8, 80.0)
    assert sigmas[0] == 80.0 and sigmas[-1] == 0.0 and len(sigmas) == 9
    times = sigmas / (1 + sigmas)
    assert torch.allclose(times[:-1] - times[1:], torch.full((8,), 80 / 81 / 8, dtype=torch.float64), atol=1e-14)
    with pytest.raises(ValueError, match="num_steps"):
        uniform_time_sigmas(0, 80.0)


KARRAS_TO_ZERO = torch.cat([karras_sigmas(12, 0.002, 80.0, 7.0), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("sigmas", [uniform_time_sigmas(16, 80.0), KARRAS_TO_ZERO], ids=["uniform-time", "karras"])
def test_single_point_is_straight(sigmas):
    # D = x0: y(t) = (1 - t) x0 + t * noise, a straight line at constant speed, on any grid (Euler is exact)
    point = torch.tensor([[0.3, -0.7, 0.1, 0.9]], dtype=torch.float64)
    curvature = trajectory_curvature(point_denoiser(point), noise(), sigmas)
    assert curvature.shape == (64,)
    assert curvature.abs().max() < 1e-12


def test_matches_literal_rne_formula_on_uniform_grid():
    """RNE's `straightness`: mean_i mean(((y_{i-1} - y_i) / dt - (y_0 - y_N))^2), dt = 1/N, trajectory stored."""
    denoiser, sigmas, start = mixture_denoiser(TWO_POINTS), uniform_time_sigmas(20, 80.0), noise()
    x = sigmas[0] * start
    trajectory = [x / (1 + sigmas[0])]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * (x - denoiser(x, torch.full((64, 1), sigma.item(), dtype=x.dtype))) / sigma
        trajectory.append(x / (1 + sigma_next))
    num_steps = len(trajectory) - 1
    base = trajectory[0] - trajectory[-1]
    dt = 1 / num_steps
    literal = torch.stack(
        [((trajectory[i - 1] - trajectory[i]) / dt - base).square().mean(dim=1) for i in range(1, num_steps + 1)]
    ).mean(dim=0)
    assert torch.allclose(trajectory_curvature(denoiser, start, sigmas), literal, rtol=1e-10, atol=1e-12)


def test_gaussian_data_matches_quadrature():
    # y(t) = k g(t) n with g(t) = sqrt(t^2 + s^2 (1 - t)^2), k = sigma_0 / sqrt(sigma_0^2 + s^2): straight but at a
    # varying speed; C = k^2 mean(n^2) / t0 * int_0^t0 (t0 g'(t) - (g(t0) - g(0)))^2 dt
    scale, sigma_max = 0.5, 80.0
    t0 = sigma_max / (1 + sigma_max)
    t = np.linspace(0, t0, 400_001)
    g = np.sqrt(t**2 + scale**2 * (1 - t) ** 2)
    g_prime = (t - scale**2 * (1 - t)) / g
    integrand = (t0 * g_prime - (g[-1] - g[0])) ** 2
    integral = np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t)) / t0
    start = noise(16)
    k2 = sigma_max**2 / (sigma_max**2 + scale**2)
    expected = k2 * start.square().mean(dim=1) * integral
    curvature = trajectory_curvature(gaussian_denoiser(scale), start, uniform_time_sigmas(2000, sigma_max))
    assert torch.allclose(curvature, expected, rtol=5e-3)


def test_mixture_curved_and_conditional_straighter():
    start, sigmas = noise(256), uniform_time_sigmas(64, 80.0)
    component = torch.randint(0, 2, (256,), generator=seeded(1))
    unconditional = trajectory_curvature(mixture_denoiser(TWO_POINTS, 0.3), start, sigmas).mean()
    conditional = trajectory_curvature(mixture_denoiser(TWO_POINTS, 0.3, component), start, sigmas).mean()
    assert unconditional > 0.1
    assert 0 < conditional < 0.6 * unconditional


def test_curvature_rejects_bad_sigmas():
    for bad in ([1.0], [1.0, 2.0], [0.0, 0.0], [2.0, 1.0, 1.0], [float("nan"), 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            trajectory_curvature(point_denoiser(torch.zeros(1, DIM)), noise(), torch.tensor(bad))


# ---------------------------------------------------------------------------------------------------------------------
# L_CFM


def test_cfm_single_point_is_zero():
    point = torch.tensor([[0.3, -0.7, 0.1, 0.9]], dtype=torch.float64)
    loss = conditional_flow_matching_loss(point_denoiser(point), point.expand(128, DIM), seeded())
    assert loss.shape == (128,) and loss.abs().max() < 1e-20


def test_cfm_gaussian_matches_quadrature():
    # D - X_0 = (s^2 sigma X_1 - sigma^2 X_0) / (s^2 + sigma^2), so
    # E|D - X_0|^2 / dim / t^2 = s^2 (1 + sigma)^2 / (s^2 + sigma^2)
    scale, sigma_min, sigma_max = 0.5, 0.002, 80.0
    t_min, t_max = sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max)
    t = np.linspace(t_min, t_max, 200_001)
    sigma = t / (1 - t)
    integrand = scale**2 * (1 + sigma) ** 2 / (scale**2 + sigma**2)
    expected = np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t)) / (t_max - t_min)
    images = scale * torch.randn(20_000, DIM, generator=seeded(2), dtype=torch.float64)
    loss = conditional_flow_matching_loss(gaussian_denoiser(scale), images, seeded(3), sigma_min, sigma_max)
    standard_error = loss.std() / len(loss) ** 0.5
    assert abs(loss.mean().item() - expected) < 4 * standard_error


def test_cfm_conditioning_on_the_component_lowers_the_loss():
    component = torch.randint(0, 2, (4096,), generator=seeded(4))
    images = TWO_POINTS[component] + 0.1 * torch.randn(4096, DIM, generator=seeded(5), dtype=torch.float64)
    loss = lambda denoiser: conditional_flow_matching_loss(denoiser, images, seeded(6)).mean()  # noqa: E731
    unconditional = loss(mixture_denoiser(TWO_POINTS, 0.1))
    conditional = loss(mixture_denoiser(TWO_POINTS, 0.1, component))
    assert conditional < 0.5 * unconditional


def test_cfm_is_reproducible_and_checks_range():
    images = torch.randn(8, DIM, dtype=torch.float64)
    first = conditional_flow_matching_loss(gaussian_denoiser(1.0), images, seeded(7))
    assert torch.equal(first, conditional_flow_matching_loss(gaussian_denoiser(1.0), images, seeded(7)))
    with pytest.raises(ValueError, match="sigma_min"):
        conditional_flow_matching_loss(gaussian_denoiser(1.0), images, seeded(7), sigma_min=1.0, sigma_max=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines


@pytest.fixture(scope="module")
def pipes():
    unet, encoder = make_tiny_models()
    baseline_unet, _ = make_tiny_models(code_dim=0)
    return (
        QACPipeline(unet=unet, scheduler=IPNDMScheduler(), encoder=encoder),
        QACPipeline(unet=baseline_unet, scheduler=IPNDMScheduler()),
    )


def test_pipeline_denoiser_is_the_preconditioned_unet(pipes):
    pipe, _ = pipes
    x = torch.randn(3, 1, 8, 8, generator=seeded())
    code = pipe.encoder.indices_to_codes(torch.tensor([1, 7, 30]))
    sigma = torch.tensor([0.1, 2.0, 40.0]).reshape(3, 1, 1, 1)
    scheduler, expected = pipe.scheduler, []
    for i, s in enumerate([0.1, 2.0, 40.0]):
        x_i = x[i : i + 1]
        unet_input = scheduler.precondition_inputs(x_i, s)
        model_output = pipe.unet(unet_input, scheduler.precondition_noise(s), code=code[i : i + 1]).sample
        expected.append(scheduler.precondition_outputs(x_i, model_output, s))
    expected = torch.cat(expected)
    assert torch.allclose(pipeline_denoiser(pipe, code)(x, sigma), expected, atol=1e-5)


def test_pipeline_curvature(pipes):
    pipe, baseline = pipes
    curvature = pipeline_curvature(pipe, num_samples=4, num_steps=4, generator=seeded())
    assert np.isfinite(curvature) and curvature > 0
    assert curvature == pipeline_curvature(pipe, num_samples=4, num_steps=4, generator=seeded())
    batched = pipeline_curvature(pipe, num_samples=4, num_steps=4, generator=seeded(), batch_size=3)
    assert batched == pytest.approx(curvature, rel=1e-5)  # the UNet rounds differently per batch size
    other_codes = pipeline_curvature(pipe, 4, 4, seeded(), code_indices=torch.tensor([0, 0, 0, 0]))
    assert other_codes != curvature
    assert np.isfinite(pipeline_curvature(baseline, 4, 4, seeded()))
    with pytest.raises(ValueError, match="unconditional"):
        pipeline_curvature(baseline, 4, 4, seeded(), code_indices=torch.tensor([0, 0, 0, 0]))


def test_pipeline_cfm(pipes):
    pipe, baseline = pipes
    images = torch.rand(6, 1, 8, 8, generator=seeded()) * 2 - 1
    loss = pipeline_conditional_flow_matching_loss(pipe, images, seeded(1), num_draws=2, batch_size=4)
    assert np.isfinite(loss) and loss > 0
    assert loss == pipeline_conditional_flow_matching_loss(pipe, images, seeded(1), num_draws=2, batch_size=4)
    assert np.isfinite(pipeline_conditional_flow_matching_loss(baseline, images, seeded(1)))


def test_pipeline_cfm_under_rne_coupling(pipes):
    pipe, _ = pipes
    images = torch.rand(6, 1, 8, 8, generator=seeded()) * 2 - 1
    noise_encoder = NoiseEncoder.for_unet(pipe.unet)
    independent = pipeline_conditional_flow_matching_loss(pipe, images, seeded(1))
    # a fresh noise encoder is q(z | x) = N(0, I), fed the same unit noise: the independent coupling, draw for draw
    assert pipeline_conditional_flow_matching_loss(pipe, images, seeded(1), noise_encoder=noise_encoder) == independent

    # mean 0.5 and logvar 0: X_1 = n + 0.5 with n the draw X_1 would be without the encoder
    torch.nn.init.constant_(noise_encoder.conv_out.bias[:1], 0.5)
    seen = []
    recorder = lambda x, sigma: seen.append((x, sigma)) or x  # noqa: E731
    conditional_flow_matching_loss(recorder, images, seeded(2), noise_encoder=noise_encoder)
    conditional_flow_matching_loss(recorder, images, seeded(2))
    (coupled, sigmas), (independent, same_sigmas) = seen
    assert torch.equal(sigmas, same_sigmas)
    torch.testing.assert_close(coupled - independent, 0.5 * sigmas.expand_as(coupled), rtol=0, atol=1e-5)
