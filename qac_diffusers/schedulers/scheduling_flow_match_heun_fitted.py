# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""diffusers' flow-matching Heun scheduler on RNE's grids, with time grids fitted to one model (beyond the paper)."""

import numpy as np
import torch
from diffusers import FlowMatchHeunDiscreteScheduler
from diffusers.configuration_utils import register_to_config

# diffusers' loader finds a component's loading methods by looking up its base classes by name in the component's
# module (pipeline_loading_utils.load_sub_model): this import is for it.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .fitted_schedules import FittedTimeGridsMixin
from .scheduling_flow_match_euler_fitted import euler_grid


def heun_steps(num_inference_steps: int) -> int:
    """
    The steps of Heun's method with `num_inference_steps` model calls in RNE's convention: (N + 1) / 2 steps on
    RNE's uniform grid, each of two calls but the last, which is an Euler step (so N is odd).
    """
    if num_inference_steps % 2 == 0:
        raise ValueError(
            f"Heun takes an odd number of model calls (RNE's convention: (N + 1) / 2 steps, the last one Euler), got "
            f"num_inference_steps={num_inference_steps}: pass {num_inference_steps - 1} or {num_inference_steps + 1}."
        )
    return (num_inference_steps + 1) // 2


class FittedFlowMatchHeunDiscreteScheduler(FittedTimeGridsMixin, FlowMatchHeunDiscreteScheduler):
    """
    diffusers' [`FlowMatchHeunDiscreteScheduler`] that also takes a time grid (`set_timesteps(sigmas=...)`, which
    diffusers' lacks) and carries grids fitted to one trained rectified-flow model (see [`fit_schedules`]):
    `RectifiedFlowFormulation` runs it on the grid fitted for the NFE asked for, and on RNE's uniform grid at any other
    odd NFE. N model calls take (N + 1) / 2 steps, the last one Euler ([`heun_steps`]).

    Args:
        num_train_timesteps (`int`, defaults to 1000), shift (`float`, defaults to 1.0): As in
            [`FlowMatchHeunDiscreteScheduler`].
        fitted_sigmas (`list[list[float]]`, *optional*):
            Time grids fitted to one model, at most one per NFE: each the points t of its steps, strictly decreasing
            from 1 to 0 (`(N + 1) / 2 + 1` points for N calls).
        fitted_model_fingerprint (`str`, *optional*):
            [`model_fingerprint`] of the model the grids were fitted to; `QACPipeline` refuses a scheduler whose
            fitted grids belong to another model.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        fitted_sigmas: list[list[float]] | None = None,
        fitted_model_fingerprint: str | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift)
        self._check_fitted_sigmas(fitted_sigmas or [])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """
        diffusers' `set_timesteps(num_inference_steps)`, or, with `sigmas` (the points before the final 0), the same
        schedule on those points: shifted as diffusers shifts its own, a 0 appended, every inner point twice (the two
        calls of a Heun step).
        """
        if sigmas is None:
            super().set_timesteps(num_inference_steps, device=device)
            return
        points = np.asarray(sigmas, dtype=np.float64)
        points = self.config.shift * points / (1 + (self.config.shift - 1) * points)
        points = torch.from_numpy(points).to(dtype=torch.float32, device=device)
        self.num_inference_steps = len(points)
        timesteps = points * self.config.num_train_timesteps
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device=device)
        points = torch.cat([points, torch.zeros(1, device=points.device)])
        self.sigmas = torch.cat([points[:1], points[1:-1].repeat_interleave(2), points[-1:]])
        self.prev_derivative = None
        self.dt = None
        self._step_index = None
        self._begin_index = None

    def _formula_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """RNE's uniform grid of (N + 1) / 2 steps with its final 0, float64."""
        return torch.from_numpy(np.append(euler_grid(heun_steps(num_inference_steps)), 0.0))

    def _num_calls(self, num_points: int) -> int:
        """Two calls a step but the last: 2 (points - 1) - 1."""
        return 2 * (num_points - 1) - 1
