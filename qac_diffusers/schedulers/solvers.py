# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The EDM solvers a QAC pipeline can sample with, by name, each built from a saved scheduler config."""

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .fitted_schedules import without_fitted_schedules
from .scheduling_ipndm import IPNDMScheduler


class _EndsAtSigmaMin:
    """
    Gives diffusers' EDM schedulers the `final_sigmas_type` of [`IPNDMScheduler`]: with `"sigma_min"`, `N` model calls
    take `N` steps over the `N + 1` points of the Karras schedule from `sigma_max` to `sigma_min`, as the samplers of
    the paper's code do (zju-pi/diff-sampler, `diff-solvers-main/solvers.py`). diffusers' own `"sigma_min"` appends
    `sigma_min` once more after the `N` points, so its last call takes a step of length 0. `"zero"` is unchanged and
    means the same in both: `N` points and a final 0, the last call denoising from `sigma_min` to 0.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """
        Sets the schedule for `num_inference_steps` model calls (to be run before inference).

        Args:
            num_inference_steps (`int`):
                The number of model calls, each followed by a step to a lower noise level.
            device (`str` or `torch.device`, *optional*):
                The device to which the timesteps should be moved to. If `None`, the timesteps are not moved.
        """
        if self.config.final_sigmas_type == "zero":
            super().set_timesteps(num_inference_steps, device=device)
            return
        super().set_timesteps(num_inference_steps + 1, device=device)
        # drop the repeated sigma_min and the call that would start there
        self.sigmas = self.sigmas[:-1]
        self.timesteps = self.timesteps[:-1]
        self.num_inference_steps = num_inference_steps


class EDMEulerSigmaMinScheduler(_EndsAtSigmaMin, EDMEulerScheduler):
    """diffusers' [`EDMEulerScheduler`] with the `final_sigmas_type` of [`IPNDMScheduler`] (see `_EndsAtSigmaMin`)."""


class EDMDPMSolverMultistepSigmaMinScheduler(_EndsAtSigmaMin, EDMDPMSolverMultistepScheduler):
    """
    diffusers' [`EDMDPMSolverMultistepScheduler`] with the `final_sigmas_type` of [`IPNDMScheduler`] (see
    `_EndsAtSigmaMin`).
    """


def _explicit(config) -> dict:
    """
    The settings every solver gets explicitly: diffusers' `from_config` drops the keys that a config built in memory
    holds at their default values, so a fresh `IPNDMScheduler().config` would otherwise give diffusers' default
    `final_sigmas_type="zero"` and the same config loaded from disk `"sigma_min"`.
    """
    return {"final_sigmas_type": config.get("final_sigmas_type", "sigma_min")}


def _for_diffusers(scheduler_class: type[SchedulerMixin], config) -> dict:
    """
    `config` without the settings only [`IPNDMScheduler`] has (its fitted schedules included): diffusers' `from_config`
    would warn that they "are not expected and will be ignored", as it does not for its own schedulers' configs.
    """
    ipndm_only = IPNDMScheduler._get_init_keys(IPNDMScheduler) - scheduler_class._get_init_keys(scheduler_class)
    return {key: value for key, value in config.items() if key not in ipndm_only}


def _ipndm(config, variable_step: bool) -> IPNDMScheduler:
    """iPNDM with fixed or variable-step weights; it keeps fitted schedules only if they were fitted for it."""
    if config.get("variable_step", False) != variable_step:
        config = without_fitted_schedules(config)
    return IPNDMScheduler.from_config(config, **_explicit(config), variable_step=variable_step)


SOLVERS = {
    "ipndm": lambda config: _ipndm(config, variable_step=False),
    "ipndm_variable": lambda config: _ipndm(config, variable_step=True),
    "euler": lambda config: EDMEulerSigmaMinScheduler.from_config(
        _for_diffusers(EDMEulerSigmaMinScheduler, config), **_explicit(config)
    ),
    "dpmsolver2": lambda config: EDMDPMSolverMultistepSigmaMinScheduler.from_config(
        _for_diffusers(EDMDPMSolverMultistepSigmaMinScheduler, config), **_explicit(config), solver_order=2
    ),
    "dpmsolver3": lambda config: EDMDPMSolverMultistepSigmaMinScheduler.from_config(
        _for_diffusers(EDMDPMSolverMultistepSigmaMinScheduler, config), **_explicit(config), solver_order=3
    ),
}


def solver_from_config(name: str, config) -> SchedulerMixin:
    """
    The scheduler `name` (one of `SOLVERS`: "ipndm", "ipndm_variable", "euler", "dpmsolver2", "dpmsolver3") with the
    sigma range, `sigma_data`, `rho` and `final_sigmas_type` of `config`, e.g. `pipe.scheduler =
    solver_from_config("ipndm_variable", pipe.scheduler.config)`.

    Every solver spends its `N` model calls on `N` steps of one Karras schedule, whatever the origin of `config` (built
    in memory or loaded from disk): with `final_sigmas_type="sigma_min"` (the default) over the `N + 1` points from
    `sigma_max` to `sigma_min`; with `"zero"` over `N` such points and a final 0. "euler" and "dpmsolver2/3" are
    diffusers' `EDMEulerScheduler` and `EDMDPMSolverMultistepScheduler` (`dpmsolver++`, otherwise their defaults)
    made to end that way; "ipndm" and "ipndm_variable" keep the config's analytical first step, which takes one more
    step, free, at the start. Schedules fitted to a model (`fitted_sigmas`) are kept only by the solver they were
    fitted for (the iPNDM of `config`, fixed or variable-step weights); every other solver gets the Karras schedule.
    """
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}: choose one of {sorted(SOLVERS)}.")
    return SOLVERS[name](config)
