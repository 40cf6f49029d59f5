# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Rectified flow as RNE trains and samples it (sangyun884/fast-ode, flows.py; DESIGN.md section 10).

Data x, noise z, t ~ U(eps, 1), x_t = t z + (1 - t) x, the network predicts the velocity v = z - x; sampling integrates
dx/dt = v from t = 1 (noise) to 0. diffusers' flow-matching schedulers use the same path with sigma in place of t and
call the network with timesteps = sigma * num_train_timesteps, so a model trained here samples with
`FlowMatchEulerDiscreteScheduler` and `FlowMatchHeunDiscreteScheduler` on the grids of RNE's sampler.
"""

from collections.abc import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..schedulers.fitted_schedules import FittedTimeGridsMixin, own_settings, without_fitted_schedules
from ..schedulers.scheduling_flow_match_euler_fitted import FittedFlowMatchEulerDiscreteScheduler, euler_grid
from ..schedulers.scheduling_flow_match_heun_fitted import FittedFlowMatchHeunDiscreteScheduler, heun_steps
from .base import Formulation


# RNE's `RectifiedFlow.get_train_tuple`: t = eps + (1 - eps) * U(0, 1).
TRAIN_EPS = 1e-5
# RNE's `sample_ode_generative_bbox`: scipy's RK45 from t = 1 to eps = 1e-3, rtol = atol = 1e-5.
RK45_EPS = 1e-3
RK45_TOLERANCE = 1e-5

# The Karras exponent of EDM (Karras et al. 2022), for the editing grid.
KARRAS_RHO = 7.0

# diffusers' solvers, as the subclasses that take time grids and keep the ones fitted for them.
SOLVERS = {"euler": FittedFlowMatchEulerDiscreteScheduler, "heun": FittedFlowMatchHeunDiscreteScheduler}
# diffusers' own class of each: grids fitted for one solver mean nothing to the other (Heun takes two calls a step).
DIFFUSERS_SOLVERS = {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}


def rk45_solve(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    eps: float = RK45_EPS,
    rtol: float = RK45_TOLERANCE,
    atol: float = RK45_TOLERANCE,
) -> tuple[torch.Tensor, int]:
    """
    Integrate dx/dt = velocity(x, t) from x(1) = noise to t = eps with scipy's adaptive RK45, the whole batch as one
    system, as RNE's reference sampler does (`sample_ode_generative_bbox`).

    Args:
        velocity (`Callable[[torch.Tensor, float], torch.Tensor]`): v(x, t) for x of the shape of `noise`.
        noise (`torch.Tensor`): x(1).
        eps (`float`, defaults to 1e-3): Where the integration stops (RNE returns x(eps) as the sample).
        rtol (`float`, defaults to 1e-5), atol (`float`, defaults to 1e-5): scipy's tolerances.

    Returns:
        `tuple` `(sample, nfe)`: x(eps) in the dtype and on the device of `noise`, and the number of velocity
        evaluations the solver made (scipy's `nfev`).
    """
    # scipy is imported here: the pipeline (and the code a saved pipeline ships) imports this module without it
    from scipy.integrate import solve_ivp

    shape = noise.shape

    def ode(t: float, x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(x.reshape(shape)).to(device=noise.device, dtype=torch.float32)
        return velocity(x, t).detach().double().cpu().numpy().reshape(-1)

    start = noise.detach().double().cpu().numpy().reshape(-1)
    solution = solve_ivp(ode, (1.0, eps), start, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"RK45 did not reach t = {eps}: {solution.message}")
    sample = torch.from_numpy(solution.y[:, -1].reshape(shape)).to(device=noise.device, dtype=noise.dtype)
    return sample, int(solution.nfev)


class RectifiedFlowFormulation(Formulation):
    r"""
    Rectified flow: x_t = t z + (1 - t) x, velocity target z - x, t ~ U(eps, 1), loss mean ||v_theta(x_t, t) - (z -
    x)||^2 (RNE's objective), the network called with timesteps t * num_train_timesteps as diffusers' flow-matching
    schedulers call it. Sampled with diffusers' `FlowMatchEulerDiscreteScheduler` ("euler") or
    `FlowMatchHeunDiscreteScheduler` ("heun") on RNE's uniform grids, or with [`sample_rk45`].

    Args:
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or [`FlowMatchHeunDiscreteScheduler`], *optional*): Solves the
            ODE; its `num_train_timesteps` scales t for the network. A default `FlowMatchEulerDiscreteScheduler`
            (shift 1: a plain uniform grid) when `None`.
        eps (`float`, defaults to 1e-5): The lower end of the training times (RNE's).
    """

    name = "rectified_flow"
    scheduler_classes = (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)
    scheduler_fix = (
        "Its network predicts velocities and takes t * num_train_timesteps: use diffusers' flow-matching schedulers, "
        "e.g. `pipe.scheduler = FlowMatchEulerDiscreteScheduler()` or `RectifiedFlowFormulation(scheduler).solver("
        "'heun')`."
    )

    def __init__(self, scheduler: SchedulerMixin | None = None, eps: float = TRAIN_EPS):
        super().__init__(FlowMatchEulerDiscreteScheduler() if scheduler is None else scheduler)
        if not 0 <= eps < 1:
            raise ValueError(f"`eps` (the smallest training time) must lie in [0, 1), got {eps}.")
        self.eps = eps
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    # ----- training ------------------------------------------------------------------------------------------------

    def sample_noise(self, shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t of shape `(B, 1, 1, 1)`, uniform on [eps, 1) as RNE draws it, then unit noise z of `shape`."""
        uniform = torch.rand((shape[0], 1, 1, 1), generator=generator, device=generator.device)
        times = uniform * (1 - self.eps) + self.eps
        noise = torch.randn(shape, generator=generator, device=generator.device)
        return times, noise

    def add_noise(self, images: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """x_t = t z + (1 - t) x."""
        return levels * noise + (1 - levels) * images

    @staticmethod
    def target(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity of the straight path, dx_t / dt = z - x."""
        return noise - images

    def velocity(
        self,
        unet: torch.nn.Module,
        sample: torch.Tensor,
        level: float | torch.Tensor,
        code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        v_theta(x_t, t, y): the network at timesteps t * num_train_timesteps (float, one per sample).

        Args:
            unet ([`QACUNet2DModel`]): The network.
            sample (`torch.Tensor` of shape `(batch, channels, height, width)`): x_t.
            level (`float` or `torch.Tensor` of shape `(batch, 1, 1, 1)`): t.
            code (`torch.Tensor` of shape `(batch, code_dim)`, *optional*): The condition.

        Returns:
            `torch.Tensor` of the shape and dtype of `sample`.
        """
        times = torch.as_tensor(level, dtype=torch.float32, device=sample.device).flatten()
        timesteps = times.expand(sample.shape[0]) * self.num_train_timesteps
        unet_dtype = next(unet.parameters()).dtype  # `unet.dtype` is missing when DistributedDataParallel wraps it
        return unet(sample.to(unet_dtype), timesteps, code=code).sample.to(sample.dtype)

    def loss(self, unet, images, levels, noise, code=None) -> torch.Tensor:
        """mean || v_theta(x_t, t, y) - (z - x) ||^2 over pixels and images (RNE's `loss_fm`)."""
        prediction = self.velocity(unet, self.add_noise(images, noise, levels), levels, code)
        return (prediction - self.target(images, noise)).square().mean()

    # ----- the model -----------------------------------------------------------------------------------------------

    def denoise(self, unet, sample, level, code=None) -> torch.Tensor:
        """x_hat = x_t - t v_theta(x_t, t, y), the clean image the velocity points away from (RNE's `x0hat`)."""
        times = torch.as_tensor(level, dtype=sample.dtype, device=sample.device)
        return sample - times * self.velocity(unet, sample, level, code)

    def denoise_edm(self, unet, sample, sigma, code=None) -> torch.Tensor:
        """
        D(x; sigma) through x_t = x / (1 + sigma) at t = sigma / (1 + sigma): x0 + sigma z = (x0 (1 - t) + t z) / (1 -
        t), so the two paths meet at every level (metrics/trajectory.py). Finite sigma only: t = 1 is pure noise.
        """
        sigma = torch.as_tensor(sigma, dtype=sample.dtype, device=sample.device)
        return self.denoise(unet, sample / (1 + sigma), sigma / (1 + sigma), code)

    @property
    def sigma_range(self) -> tuple[float, float]:
        """
        t from 1 / num_train_timesteps to 1 - 1 / num_train_timesteps as EDM levels sigma = t / (1 - t): the lower
        end is the smallest level of diffusers' flow-matching grids; the upper end mirrors it, since in EDM
        coordinates t = 1 (pure noise) is sigma = infinity. For 1000 timesteps, sigma from 1/999 to 999.
        """
        t_min = 1.0 / self.num_train_timesteps
        return t_min / (1 - t_min), (1 - t_min) / t_min

    @property
    def rho(self) -> float:
        """EDM's 7: the editing grid in EDM coordinates spends its steps at low noise, as EDM's does."""
        return KARRAS_RHO

    # ----- sampling ------------------------------------------------------------------------------------------------

    def solver(self, name: str) -> SchedulerMixin:
        """
        "euler" or "heun": diffusers' `FlowMatchEulerDiscreteScheduler` or `FlowMatchHeunDiscreteScheduler`, as
        [`FittedFlowMatchEulerDiscreteScheduler`] or [`FittedFlowMatchHeunDiscreteScheduler`], which keep the grids
        fitted to the model for that solver (dropped when the current scheduler is the other one).
        """
        if name not in SOLVERS:
            raise ValueError(
                f"Unknown rectified-flow solver {name!r}: choose one of {sorted(SOLVERS)}, or `sample_rk45` for the "
                "adaptive reference."
            )
        solver_class, same_solver = SOLVERS[name], isinstance(self.scheduler, DIFFUSERS_SOLVERS[name])
        config = self.scheduler.config if same_solver else without_fitted_schedules(self.scheduler.config)
        # only its own settings: diffusers warns that the others (Euler's for Heun) "are not expected"
        return solver_class.from_config(own_settings(solver_class, config))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """
        RNE's grids: Euler, `num_inference_steps` steps of 1 / N (or the grid fitted to the model for that NFE, with a
        [`FittedFlowMatchEulerDiscreteScheduler`]); Heun, N calls (N odd) in (N + 1) / 2 steps of equal length, the
        last one Euler (see [`heun_steps`]). All passed to diffusers' own `set_timesteps`.
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
        if isinstance(self.scheduler, FittedTimeGridsMixin):  # the schedulers of SOLVERS: the fitted grid, or RNE's
            self.scheduler.set_timesteps(sigmas=self.scheduler.grid(num_inference_steps), device=device)
        elif isinstance(self.scheduler, FlowMatchHeunDiscreteScheduler):
            self._set_heun_timesteps(heun_steps(num_inference_steps), device)
        else:
            self.scheduler.set_timesteps(sigmas=euler_grid(num_inference_steps).tolist(), device=device)

    def _set_heun_timesteps(self, num_steps: int, device: str | torch.device | None) -> None:
        # diffusers 0.42.1's FlowMatchHeunDiscreteScheduler.set_timesteps takes no `sigmas`: it spaces its points
        # from `sigma_max` to `sigma_min` (1 / num_train_timesteps), then appends 0 and ends with an Euler step, as
        # RNE does. Its own code gives RNE's grid when the points end at 1 / num_steps.
        scheduler, sigma_min = self.scheduler, self.scheduler.sigma_min
        scheduler.sigma_min = 1.0 / num_steps
        try:
            scheduler.set_timesteps(num_steps, device=device)
        finally:
            scheduler.sigma_min = sigma_min

    def initial_sample(self, latents: torch.Tensor) -> torch.Tensor:
        """x(1) = z: the latents themselves."""
        return latents

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x_t itself: flow matching has no input scaling."""
        return sample

    @torch.no_grad()
    def sample_rk45(
        self,
        unet: torch.nn.Module,
        latents: torch.Tensor,
        code: torch.Tensor | None = None,
        eps: float = RK45_EPS,
        rtol: float = RK45_TOLERANCE,
        atol: float = RK45_TOLERANCE,
    ) -> tuple[torch.Tensor, int]:
        """
        The adaptive reference sampler of the paper's "RK45" column (RNE's settings): [`rk45_solve`] of the model's
        velocity from the latents at t = 1 to t = eps.

        Returns:
            `tuple` `(samples, nfe)`: float32 samples and the number of UNet calls.
        """
        return rk45_solve(lambda x, t: self.velocity(unet, x, t, code), latents.float(), eps, rtol, atol)

    def reference_solve(self, unet, latents, code=None) -> tuple[torch.Tensor, int]:
        """[`sample_rk45`] with RNE's settings: the paper's "RK45" column."""
        return self.sample_rk45(unet, latents, code)
