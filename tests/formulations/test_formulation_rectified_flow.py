"""Rectified flow: closed-form checks on a point-mass data set, RNE's grids and NFE, RK45 on a linear ODE."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from conftest import make_tiny_models, seeded
from qac_diffusers import IPNDMScheduler
from qac_diffusers.formulations import (
    EDMFormulation,
    RectifiedFlowFormulation,
    formulation_from_name,
    heun_steps,
    rk45_solve,
)


SHAPE = (4, 1, 8, 8)


class VelocityNet(torch.nn.Module):
    """A stand-in UNet returning a known velocity v(x, t) (t = timestep / 1000), counting its calls and times."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity
        self.weight = torch.nn.Parameter(torch.zeros(()))  # gives the module a dtype
        self.times = []

    @property
    def dtype(self):
        return self.weight.dtype

    def forward(self, sample, timestep, code=None):
        times = torch.as_tensor(timestep, dtype=sample.dtype).flatten() / 1000
        self.times.append(times.max().item())
        times = times.expand(sample.shape[0]).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.velocity(sample, times))


def point_mass(center: torch.Tensor) -> VelocityNet:
    """The exact velocity field of data concentrated at `center`: E[z - x | x_t] = (x_t - center) / t."""
    return VelocityNet(lambda x, t: (x - center) / t)


@pytest.fixture
def center():
    return torch.linspace(-0.9, 0.9, 64).reshape(1, 1, 8, 8)


def test_noising_and_target_match_the_point_mass_velocity(center):
    formulation = RectifiedFlowFormulation()
    times, noise = formulation.sample_noise(SHAPE, seeded(0))
    images = center.expand(SHAPE)
    noisy = formulation.add_noise(images, noise, times)
    torch.testing.assert_close(noisy, times * noise + (1 - times) * images)
    exact = (noisy - center) / times
    torch.testing.assert_close(formulation.target(images, noise), exact, rtol=1e-4, atol=1e-4)


def test_the_exact_velocity_has_zero_loss_and_denoises_to_the_point(center):
    formulation = RectifiedFlowFormulation()
    net = point_mass(center)
    images = center.expand(SHAPE)
    times, noise = formulation.sample_noise(SHAPE, seeded(1))
    assert formulation.loss(net, images, times, noise).item() < 1e-9
    noisy = formulation.add_noise(images, noise, times)
    torch.testing.assert_close(formulation.denoise(net, noisy, times), images, rtol=0, atol=1e-5)


def test_denoise_edm_is_the_same_estimate_in_edm_coordinates(center):
    formulation = RectifiedFlowFormulation()
    net = point_mass(center)
    sigma = torch.tensor([0.05, 0.7, 3.0, 80.0]).reshape(-1, 1, 1, 1)
    x_sigma = center + sigma * torch.randn(SHAPE, generator=seeded(2))
    torch.testing.assert_close(formulation.denoise_edm(net, x_sigma, sigma), center.expand(SHAPE), atol=1e-4, rtol=0)


def test_training_times_are_uniform_on_eps_to_one():
    formulation = RectifiedFlowFormulation(eps=0.25)
    times, noise = formulation.sample_noise((20000, 1, 1, 1), seeded(3))
    assert times.min().item() >= 0.25
    assert times.max().item() < 1
    assert abs(times.mean().item() - 0.625) < 0.005
    assert abs(noise.std().item() - 1) < 0.02


def test_the_network_sees_t_times_num_train_timesteps(center):
    formulation = RectifiedFlowFormulation()
    net = point_mass(center)
    formulation.velocity(net, center.expand(SHAPE), torch.full((4, 1, 1, 1), 0.3))
    assert net.times == [pytest.approx(0.3)]


@pytest.mark.parametrize("nfe", [1, 2, 4, 7])
def test_euler_spends_every_call_on_a_real_step_of_rne_grid(nfe):
    formulation = RectifiedFlowFormulation()
    formulation.set_timesteps(nfe)
    expected = [1 - i / nfe for i in range(nfe + 1)]
    torch.testing.assert_close(formulation.scheduler.sigmas, torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(formulation.scheduler.timesteps, torch.tensor(expected[:-1]) * 1000)


def test_heun_five_calls_take_rne_three_steps_the_last_euler():
    formulation = RectifiedFlowFormulation(FlowMatchHeunDiscreteScheduler())
    formulation.set_timesteps(5)
    third = 1 / 3
    torch.testing.assert_close(
        formulation.scheduler.sigmas, torch.tensor([1, 2 * third, 2 * third, third, third, 0], dtype=torch.float32)
    )
    assert len(formulation.scheduler.timesteps) == 5
    # diffusers' own grid is restored for anyone calling set_timesteps directly
    assert formulation.scheduler.sigma_min == pytest.approx(1e-3)


def test_heun_refuses_an_even_number_of_calls():
    with pytest.raises(ValueError, match=r"odd number of model calls .* pass 3 or 5"):
        heun_steps(4)


def rne_sampler(velocity, z, nfe, solver):
    """RNE's `sample_ode_generative` (sangyun884/fast-ode, flows.py), transcribed: the reference for the NFE rules."""
    steps = (nfe + 1) // 2 if solver == "heun" else nfe
    dt = -1.0 / steps
    for i in reversed(range(1, steps + 1)):
        t, t_next = i / steps, (i - 1) / steps
        vt = velocity(z, t)
        if solver == "heun" and i > 1:
            vt = (vt + velocity(z + vt * dt, t_next)) / 2
        z = z + vt * dt
    return z


@pytest.mark.parametrize(("solver", "nfe"), [("euler", 1), ("euler", 4), ("euler", 16), ("heun", 1), ("heun", 5)])
def test_diffusers_schedulers_reproduce_rne_sampler_with_nfe_calls(solver, nfe):
    def velocity(x, t):  # a curved field: the trajectories bend, so every step's placement matters
        return torch.sin(3 * x) * (1 + t) - x

    net = VelocityNet(velocity)
    formulation = RectifiedFlowFormulation(RectifiedFlowFormulation().solver(solver))
    z = torch.randn(SHAPE, generator=seeded(4))
    sample = formulation.solve(net, z, None, nfe)
    assert len(net.times) == nfe
    expected = rne_sampler(lambda x, t: velocity(x, torch.tensor(t)), z, nfe, solver)
    torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("solver", "nfe"), [("euler", 3), ("heun", 3)])
def test_every_solver_lands_on_the_point_mass(center, solver, nfe):
    formulation = RectifiedFlowFormulation(RectifiedFlowFormulation().solver(solver))
    sample = formulation.solve(point_mass(center), torch.randn(SHAPE, generator=seeded(5)), None, nfe)
    torch.testing.assert_close(sample, center.expand(SHAPE), rtol=0, atol=1e-5)


def test_rk45_on_a_linear_ode_matches_its_solution_and_reports_nfe():
    # dx/dt = -2 x from x(1) = x1: x(t) = x1 * exp(2 (1 - t))
    x1 = torch.randn(3, 5, generator=seeded(6), dtype=torch.float64)
    calls = []

    def velocity(x, t):
        calls.append(t)
        return -2 * x

    sample, nfe = rk45_solve(velocity, x1, eps=1e-3)
    torch.testing.assert_close(sample, x1 * math.exp(2 * (1 - 1e-3)), rtol=1e-4, atol=1e-4)
    assert nfe == len(calls)
    assert nfe % 6 == 2  # RK45: 6 evaluations per attempted step, plus the 2 that choose the first step
    assert calls[0] == 1.0


def test_sample_rk45_stops_at_eps_on_the_point_mass(center):
    formulation = RectifiedFlowFormulation()
    net = point_mass(center)
    z = torch.randn(SHAPE, generator=seeded(7))
    sample, nfe = formulation.sample_rk45(net, z)
    # the exact flow is the straight line x(t) = center + t (z - center)
    torch.testing.assert_close(sample, center + 1e-3 * (z - center), rtol=0, atol=1e-4)
    assert nfe == len(net.times)


@pytest.mark.parametrize("scheduler", [IPNDMScheduler(), EDMEulerScheduler()])
def test_rectified_flow_refuses_edm_schedulers(scheduler):
    with pytest.raises(ValueError, match="needs one of FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscrete"):
        RectifiedFlowFormulation(scheduler)


@pytest.mark.parametrize("scheduler", [FlowMatchEulerDiscreteScheduler(), FlowMatchHeunDiscreteScheduler()])
def test_edm_refuses_flow_matching_schedulers(scheduler):
    with pytest.raises(ValueError, match=r"needs one of IPNDMScheduler.*solver_from_config\('ipndm'"):
        EDMFormulation(scheduler)


def test_unknown_solver_and_formulation_names_are_refused():
    with pytest.raises(ValueError, match=r"choose one of \['euler', 'heun'\], or `sample_rk45`"):
        RectifiedFlowFormulation().solver("ipndm")
    with pytest.raises(ValueError, match=r"choose one of \['edm', 'rectified_flow'\]"):
        formulation_from_name("ddpm")


def test_a_tiny_qac_unet_trains_and_samples_through_the_formulation():
    unet, encoder = make_tiny_models()
    formulation = formulation_from_name("rectified_flow")
    images = torch.rand(SHAPE, generator=seeded(8)) * 2 - 1
    times, noise = formulation.sample_noise(SHAPE, seeded(9))
    code = encoder(images).codes
    loss = formulation.loss(unet, images, times, noise, code)
    loss.backward()
    assert encoder.proj_out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        sample = formulation.solve(unet, noise, code.detach(), 3)
    assert sample.shape == SHAPE
    assert np.isfinite(sample.numpy()).all()
