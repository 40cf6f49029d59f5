# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The EDM solvers a QAC pipeline can sample with, by name, each built from a saved scheduler config."""

from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .scheduling_ipndm import IPNDMScheduler

SOLVERS = {
    "ipndm": lambda config: IPNDMScheduler.from_config(config),
    "ipndm_variable": lambda config: IPNDMScheduler.from_config(config, variable_step=True),
    "euler": lambda config: EDMEulerScheduler.from_config(config),
    "dpmsolver2": lambda config: EDMDPMSolverMultistepScheduler.from_config(config, solver_order=2),
    "dpmsolver3": lambda config: EDMDPMSolverMultistepScheduler.from_config(config, solver_order=3),
}


def solver_from_config(name: str, config) -> SchedulerMixin:
    """
    The scheduler `name` (one of `SOLVERS`: "ipndm", "ipndm_variable", "euler", "dpmsolver2", "dpmsolver3") with the
    sigma range and `sigma_data` of `config`, e.g. `pipe.scheduler = solver_from_config("ipndm_variable",
    pipe.scheduler.config)`.
    """
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}: choose one of {sorted(SOLVERS)}.")
    return SOLVERS[name](config)
