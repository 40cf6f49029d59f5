# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""What a formulation (EDM, rectified flow) owns, so that the trainer, the pipelines and the metrics need no branch.

A formulation is the math of one way to train and sample a denoiser, in the shape of facebookresearch/flow_matching's
`AffineProbPath` (noising and target) plus its sampler family: the noise levels training draws, the noising, the loss,
the denoised estimate, and the schedulers that can solve its ODE, with how to set them up for a number of model
evaluations (NFE). Each formulation lives in its own file; it refuses the other's schedulers.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..schedulers.scheduling_ipndm import karras_sigmas


class Formulation(ABC):
    """
    The interface of a formulation. `level` is its noise level: sigma for EDM, the time t in [0, 1] for rectified flow,
    a tensor of shape `(batch, 1, ..., 1)` (or a float) broadcastable against the images.

    Args:
        scheduler ([`SchedulerMixin`]): A scheduler of this formulation's kind (`scheduler_classes`): it solves the
            ODE, and its config holds the formulation's constants (EDM's `sigma_data`, flow matching's
            `num_train_timesteps`).
    """

    # The name a pipeline's config stores.
    name: ClassVar[str]
    # The schedulers that solve this formulation's ODE.
    scheduler_classes: ClassVar[tuple[type[SchedulerMixin], ...]]
    # What to do with a scheduler of another kind, appended to the error.
    scheduler_fix: ClassVar[str]

    def __init__(self, scheduler: SchedulerMixin):
        self.check_scheduler(scheduler)
        self.scheduler = scheduler

    @classmethod
    def check_scheduler(cls, scheduler: SchedulerMixin) -> None:
        """Raise a `ValueError` naming the fix unless `scheduler` is of this formulation's kind."""
        # By class name along the MRO, not `isinstance`: plain diffusers loads a saved pipeline's scheduler from the
        # copy of its module shipped in scheduler/ and this module's imports from the copies at the folder's root,
        # two distinct classes of one name.
        names = {kind.__name__ for kind in cls.scheduler_classes}
        if not any(kind.__name__ in names for kind in type(scheduler).__mro__):
            kinds = ", ".join(kind.__name__ for kind in cls.scheduler_classes)
            raise ValueError(
                f"A model of the {cls.name!r} formulation cannot be sampled with {type(scheduler).__name__}: it needs "
                f"one of {kinds}. {cls.scheduler_fix}"
            )

    # ----- training ------------------------------------------------------------------------------------------------

    @abstractmethod
    def sample_noise(self, shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The random draws of one training batch, on the generator's device, levels first: `(levels, noise)`, levels of
        shape `(B, 1, 1, 1)` and standard normal noise of `shape` `(B, C, H, W)`.
        """

    @abstractmethod
    def add_noise(self, images: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The noisy images x_level of clean `images` and unit `noise`."""

    @abstractmethod
    def loss(
        self,
        unet: torch.nn.Module,
        images: torch.Tensor,
        levels: torch.Tensor,
        noise: torch.Tensor,
        code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The scalar training loss of a batch, from the draws of [`sample_noise`] (or a coupled `noise`)."""

    # ----- the model -----------------------------------------------------------------------------------------------

    @abstractmethod
    def denoise(
        self,
        unet: torch.nn.Module,
        sample: torch.Tensor,
        level: float | torch.Tensor,
        code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's estimate of the clean image from `sample` at `level`, in the data space."""

    @abstractmethod
    def denoise_edm(
        self,
        unet: torch.nn.Module,
        sample: torch.Tensor,
        sigma: float | torch.Tensor,
        code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        The same estimate in EDM coordinates, D(x; sigma) with x = x0 + sigma * n: the denoiser the editing pipeline
        and `qac_diffusers.metrics.trajectory` take, whatever the formulation.
        """

    @property
    @abstractmethod
    def sigma_range(self) -> tuple[float, float]:
        """
        `(sigma_min, sigma_max)`: the EDM noise levels on which [`denoise_edm`] is used, by the editing grid
        ([`edit_sigmas`]) and by the metrics of `qac_diffusers.metrics.trajectory`.
        """

    @property
    @abstractmethod
    def rho(self) -> float:
        """The exponent of the Karras grid of [`edit_sigmas`]."""

    def edit_sigmas(self, num_steps: int) -> torch.Tensor:
        """
        The noise levels of zero-shot editing (paper Algorithm 2), in EDM coordinates: the Karras grid of `num_steps`
        points from `sigma_max` to `sigma_min` of [`sigma_range`], float64.
        """
        return karras_sigmas(num_steps, *self.sigma_range, self.rho)

    # ----- sampling ------------------------------------------------------------------------------------------------

    def reference_solve(
        self, unet: torch.nn.Module, latents: torch.Tensor, code: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int]:
        """
        An adaptive reference solve of the ODE from standard normal `latents`: `(samples, nfe)`, float32 samples and
        the number of UNet calls. Refused unless the formulation has one.
        """
        raise ValueError(
            f"The {self.name!r} formulation has no adaptive reference solver (the RK45 of the paper's tables is "
            "rectified flow's): sample with the pipeline's scheduler and a large `num_inference_steps` instead."
        )

    @abstractmethod
    def solver(self, name: str) -> SchedulerMixin:
        """The scheduler `name` of this formulation's family, with this formulation's scheduler config."""

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the scheduler's schedule so that exactly `num_inference_steps` model calls each do a real step."""

    @abstractmethod
    def initial_sample(self, latents: torch.Tensor) -> torch.Tensor:
        """The start of the ODE solve from standard normal `latents`."""

    @abstractmethod
    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The UNet's input at a scheduler timestep."""

    def solve(
        self,
        unet: torch.nn.Module,
        latents: torch.Tensor,
        code: torch.Tensor | None,
        num_inference_steps: int,
        progress_bar: Callable[[Iterable], Iterable] = iter,
    ) -> torch.Tensor:
        """
        Solve the probability-flow ODE with the scheduler, from standard normal `latents` to images, in
        `num_inference_steps` UNet calls.

        Args:
            unet ([`QACUNet2DModel`]): The network.
            latents (`torch.Tensor` of shape `(batch, channels, height, width)`): Standard normal noise.
            code (`torch.Tensor` of shape `(batch, code_dim)`, *optional*): The condition; `None` for the baseline.
            num_inference_steps (`int`): The number of UNet calls (NFE).
            progress_bar (`Callable`, defaults to `iter`): Wraps the timesteps (e.g. a pipeline's `progress_bar`).

        Returns:
            `torch.Tensor` of the latents' shape, float32: the samples in the data space.
        """
        self.set_timesteps(num_inference_steps, device=latents.device)
        sample = self.initial_sample(latents.to(torch.float32))
        for t in progress_bar(self.scheduler.timesteps):
            model_input = self.scale_model_input(sample, t).to(unet.dtype)
            model_output = unet(model_input, t, code=code).sample
            sample = self.scheduler.step(model_output, t, sample).prev_sample
        return sample
