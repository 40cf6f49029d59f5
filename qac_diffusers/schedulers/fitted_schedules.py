# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Schedules fitted to one trained model, carried in a scheduler's config (see `schedule_fitting.fit_schedules`)."""

import math

import torch


# The config entries of fitted schedules.
FITTED_SCHEDULE_KEYS = ("fitted_sigmas", "fitted_model_fingerprint")


def without_fitted_schedules(config) -> dict:
    """`config` without fitted schedules, for another solver: they were fitted for the one whose config it is."""
    return {key: value for key, value in config.items() if key not in FITTED_SCHEDULE_KEYS}


def own_settings(scheduler_class: type, config) -> dict:
    """The entries of `config` that `scheduler_class` takes (diffusers' `from_config` warns about the others)."""
    keys = scheduler_class._get_init_keys(scheduler_class)
    return {key: value for key, value in config.items() if key in keys}


class FittedSchedulesMixin:
    """
    The part of a scheduler that holds schedules fitted to one trained model: `fitted_sigmas` in its config, at most
    one full list of points per NFE, from the first point of the scheduler's config to its last, and
    `fitted_model_fingerprint`, the model they belong to. `set_timesteps(n)` of the scheduler uses the schedule
    fitted for `n` model calls and its formula at any other `n`.

    A scheduler using it defines `_schedule_ends()` (the first and last point every schedule shares),
    `_sigma_offset()` (the index of the first point with a model call) and `_formula_sigmas(n)` (the schedule without a
    fit, float64).
    """

    @property
    def fitted_num_inference_steps(self) -> list[int]:
        """The NFEs that have a fitted schedule in the config (`fitted_sigmas`), in increasing order."""
        return sorted(self._num_calls(len(schedule)) for schedule in self.config.fitted_sigmas or [])

    def fitted_schedule(self, num_inference_steps: int) -> list[float]:
        """The fitted schedule for `num_inference_steps` model calls (one of `fitted_num_inference_steps`)."""
        schedules = self.config.fitted_sigmas or []
        return next(sigmas for sigmas in schedules if self._num_calls(len(sigmas)) == num_inference_steps)

    def _schedule(self, num_inference_steps: int) -> torch.Tensor:
        """The fitted schedule for `num_inference_steps` calls if there is one, else the formula's; float64."""
        if num_inference_steps in self.fitted_num_inference_steps:
            return torch.tensor(self.fitted_schedule(num_inference_steps), dtype=torch.float64)
        return self._formula_sigmas(num_inference_steps)

    def _num_calls(self, num_points: int) -> int:
        """The number of model calls of a schedule of `num_points` points."""
        return num_points - 1 - self._sigma_offset()

    def _check_fitted_sigmas(self, schedules: list[list[float]]) -> None:
        """Refuse fitted schedules that this scheduler cannot run: wrong ends, not decreasing, two for one NFE."""
        first, last = self._schedule_ends()
        fix = "refit them for this scheduler's config (`fit_schedules`) or pass `fitted_sigmas=None`"
        for sigmas in schedules:
            if self._num_calls(len(sigmas)) < 1:
                raise ValueError(f"A fitted schedule needs at least {2 + self._sigma_offset()} points, got {sigmas}.")
            if not (math.isclose(sigmas[0], first, rel_tol=1e-6) and math.isclose(sigmas[-1], last, rel_tol=1e-6)):
                raise ValueError(
                    f"The fitted schedule {sigmas} does not run from {first} to {last}, the first and last points of "
                    f"this scheduler's config: {fix}."
                )
            if any(later >= earlier for earlier, later in zip(sigmas, sigmas[1:])):
                raise ValueError(f"The fitted schedule {sigmas} is not strictly decreasing: {fix}.")
        num_calls = [self._num_calls(len(sigmas)) for sigmas in schedules]
        if len(set(num_calls)) != len(num_calls):
            raise ValueError(f"`fitted_sigmas` holds more than one schedule for one NFE (NFEs {num_calls}): {fix}.")


class FittedTimeGridsMixin(FittedSchedulesMixin):
    """
    [`FittedSchedulesMixin`] for rectified flow's schedulers: every grid runs from t = 1 (noise) to t = 0, every point
    but the last has a model call, and [`grid`] gives the points that `set_timesteps(sigmas=...)` takes. A scheduler
    using it defines `_formula_sigmas(n)` (RNE's uniform grid for its solver).
    """

    def grid(self, num_inference_steps: int) -> list[float]:
        """
        The points before the final 0 for `num_inference_steps` model calls, for `set_timesteps(sigmas=...)`: the grid
        fitted for that NFE, else RNE's uniform grid.
        """
        return self._schedule(num_inference_steps)[:-1].tolist()

    def _schedule_ends(self) -> tuple[float, float]:
        """Every grid runs from t = 1 (noise) to t = 0."""
        return 1.0, 0.0

    def _sigma_offset(self) -> int:
        """Every point but the last has a model call."""
        return 0
