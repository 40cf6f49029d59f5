# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The EDM formulation (Karras et al. 2022; DESIGN.md section 2), over the library's existing EDM code."""

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.edm_denoiser import edm_denoise
from ..schedulers.scheduling_ipndm import IPNDMScheduler
from ..schedulers.solvers import solver_from_config
from ..training.edm_loss import EDMLoss
from .base import Formulation


# EDM's training distribution of ln(sigma) (Karras et al. 2022, Table 1): N(-1.2, 1.2^2).
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2


class EDMFormulation(Formulation):
    r"""
    x_sigma = x0 + sigma * n with ln(sigma) ~ N(P_mean, P_std^2), the preconditioned denoiser D of [`edm_denoise`] and
    the weighted loss of [`EDMLoss`]; sampled with the EDM schedulers of `qac_diffusers.schedulers.SOLVERS`.

    Args:
        scheduler ([`IPNDMScheduler`], [`EDMEulerScheduler`] or [`EDMDPMSolverMultistepScheduler`], *optional*):
            Solves the ODE and gives the preconditioning; a default [`IPNDMScheduler`] when `None`.
        P_mean (`float`, defaults to -1.2), P_std (`float`, defaults to 1.2): The training distribution of ln(sigma).
    """

    name = "edm"
    scheduler_classes = (IPNDMScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler)
    scheduler_fix = (
        "Use the model's own scheduler or one of the EDM solvers: `pipe.scheduler = "
        "qac_diffusers.schedulers.solver_from_config('ipndm', pipe.scheduler.config)`."
    )

    def __init__(self, scheduler: SchedulerMixin | None = None, P_mean: float = EDM_P_MEAN, P_std: float = EDM_P_STD):
        super().__init__(IPNDMScheduler() if scheduler is None else scheduler)
        # EDMLoss noises with IPNDMScheduler.add_noise(sigmas=...), which diffusers' EDM schedulers lack; the
        # preconditioning is the same for all of them given sigma_data.
        loss_scheduler = IPNDMScheduler(sigma_data=self.scheduler.config.sigma_data)
        self.loss_fn = EDMLoss(loss_scheduler, P_mean=P_mean, P_std=P_std)

    def sample_noise(self, shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma of shape `(B, 1, 1, 1)` with ln(sigma) ~ N(P_mean, P_std^2), then unit noise of `shape`."""
        return self.loss_fn.sample_noise(shape, generator)

    def add_noise(self, images: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """x0 + sigma * n."""
        return self.loss_fn.scheduler.add_noise(images, noise, sigmas=torch.as_tensor(levels).flatten())

    def loss(self, unet, images, levels, noise, code=None) -> torch.Tensor:
        """lambda(sigma) * || D(x0 + sigma * n; sigma, y) - x0 ||^2, averaged (see [`EDMLoss`])."""
        return self.loss_fn(unet, images, levels, noise, code=code)

    def denoise(self, unet, sample, level, code=None) -> torch.Tensor:
        """D(x; sigma, y) with the scheduler's preconditioning (see [`edm_denoise`])."""
        return edm_denoise(unet, self.scheduler, sample, level, code)

    def denoise_edm(self, unet, sample, sigma, code=None) -> torch.Tensor:
        """D(x; sigma, y): EDM's own coordinates."""
        return self.denoise(unet, sample, sigma, code)

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The scheduler's `sigma_min` and `sigma_max`: the levels the model samples (and was tuned for)."""
        return self.scheduler.config.sigma_min, self.scheduler.config.sigma_max

    @property
    def rho(self) -> float:
        """The scheduler's `rho`, so that editing uses the sampling grid's shape."""
        return self.scheduler.config.rho

    def solver(self, name: str) -> SchedulerMixin:
        """One of `qac_diffusers.schedulers.SOLVERS` ("ipndm", "euler", "dpmsolver2", ...): [`solver_from_config`]."""
        return solver_from_config(name, self.scheduler.config)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The scheduler's Karras schedule, whose `num_inference_steps` are the UNet calls (DESIGN.md section 5)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)

    def initial_sample(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents scaled to the scheduler's first noise level (`init_noise_sigma`)."""
        return latents * self.scheduler.init_noise_sigma

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """c_in * x, the scheduler's `scale_model_input`."""
        return self.scheduler.scale_model_input(sample, timestep)
