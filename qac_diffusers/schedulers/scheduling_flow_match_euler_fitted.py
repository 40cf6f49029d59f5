# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""diffusers' flow-matching Euler scheduler on RNE's grids, with time grids fitted to one model (beyond the paper)."""

from typing import Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config

# diffusers' loader finds a component's loading methods by looking up its base classes by name in the component's
# module (pipeline_loading_utils.load_sub_model): this import is for it.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .fitted_schedules import FittedTimeGridsMixin


def euler_grid(num_steps: int) -> np.ndarray:
    """
    RNE's Euler grid before the final 0: t_i = 1 - i / N, i = 0..N-1 (the scheduler appends t_N = 0), so that `N`
    model calls take `N` steps of length 1 / N. diffusers' default grid ends its points at 1 / num_train_timesteps
    and so spends its last call on a near-empty step to 0 (DESIGN.md section 10).
    """
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


class FittedFlowMatchEulerDiscreteScheduler(FittedTimeGridsMixin, FlowMatchEulerDiscreteScheduler):
    """
    diffusers' [`FlowMatchEulerDiscreteScheduler`] that also carries time grids fitted to one trained rectified-flow
    model (see [`fit_schedules`]): `RectifiedFlowFormulation` runs it on the grid fitted for the NFE asked for, and on
    RNE's uniform grid ([`euler_grid`]) at any other NFE.

    Args:
        num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len, invert_sigmas, shift_terminal, use_karras_sigmas, use_exponential_sigmas,
            use_beta_sigmas, time_shift_type, stochastic_sampling: As in [`FlowMatchEulerDiscreteScheduler`].
        fitted_sigmas (`list[list[float]]`, *optional*):
            Time grids fitted to one model, at most one per NFE: each the `N + 1` points t of `N` Euler steps, strictly
            decreasing from 1 to 0, as passed (without the final 0) to `set_timesteps(sigmas=...)`, so that the
            scheduler's shift, if any, applies to them as it does to RNE's grid.
        fitted_model_fingerprint (`str`, *optional*):
            [`model_fingerprint`] of the model the grids were fitted to; `QACPipeline` refuses a scheduler whose
            fitted grids belong to another model.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        fitted_sigmas: list[list[float]] | None = None,
        fitted_model_fingerprint: str | None = None,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type, stochastic_sampling=stochastic_sampling,
        )
        self._check_fitted_sigmas(fitted_sigmas or [])

    def _formula_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """RNE's uniform grid of `num_inference_steps` steps with its final 0, float64."""
        return torch.from_numpy(np.append(euler_grid(num_inference_steps), 0.0))
