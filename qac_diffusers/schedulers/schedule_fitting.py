# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Sampling schedules fitted to one trained model (beyond the paper), for the sampler that will use them.

EDM models sample with iPNDM (`IPNDMScheduler`, schedules in sigma), rectified-flow models with Euler or Heun
(`FittedFlowMatchEulerDiscreteScheduler`, `FittedFlowMatchHeunDiscreteScheduler`, time grids in t); the search below
is the same for all.

GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", zju-pi/diff-sampler
`gits-main`) searches a time schedule against teacher trajectories of the model itself with a one-step Euler cost and
dynamic programming. Two measurements on our digits models (DESIGN.md section 11, README "Fitted schedules") made us
depart from it: a one-step cost does not predict what the fourth-order multistep iPNDM does on the chosen grid, and
a per-sample distance to the teacher (GITS' cost, or the L2 distance of the final samples) prefers schedules that end
with one long denoising step, whose samples are close to the teacher on average but blurred (the Frechet distance of
classifier features rose 3x at NFE 3). So the search here runs the real sampler, with its history and its analytical
first step, on every candidate schedule, and scores the *distribution* of its samples: the Frechet distance between
the samples and the teacher's samples from the same noise and codes, in (pooled) pixel space, which a blurred set of
samples pays for through its covariance. The search is a coordinate descent on log sigma that starts from the
closest of the formula schedule and a few variants of it (Karras after a longer free first step; rectified flow's
shifted grids) and accepts only improvements, so a fitted schedule never scores worse than the formula; a second
descent starts from the schedule fitted for one NFE less with one point inserted, when that is closer. The default
search ("bounded") runs one descent by the smallest step only, stopped after 52 / NFE moves (40 / NFE after a warm
start), from the closest of the starts and of the schedule fitted for one NFE less stretched to one more point (its
warm start): the first moves gain the most, the fit one below is often closer than any formula, from the closest
start the larger steps mostly fail and would spend the moves, and on our digits models this cut the search's model
calls 3-4x for most of the gain (README "Fitted schedules").
A search that accepts every improvement on one set of noise draws also fits that set's chance: each fitted schedule is
therefore scored again, with the formula's, on fresh noise and codes, and kept only where it is still closer to the
teacher there ([`validate_schedules`]); elsewhere the scheduler keeps the formula.
"""

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ..formulations import formulation_from_name
from ..metrics.frechet import frechet_distance
from ..models.fingerprint import model_fingerprint
from .fitted_schedules import own_settings
from .scheduling_flow_match_euler_fitted import FittedFlowMatchEulerDiscreteScheduler
from .scheduling_flow_match_heun_fitted import FittedFlowMatchHeunDiscreteScheduler
from .scheduling_ipndm import IPNDMScheduler


# The NFE `fit_schedules` fits by default (train_qac.py too): the few-step range, where the formula has its holes.
DEFAULT_FIT_NFE = (3, 4, 5, 6, 7, 8, 9, 10)
DEFAULT_TEACHER_STEPS = 64
# Noise draws of the search and of the validation, and the search's steps in log sigma (README "Fitted schedules").
DEFAULT_SEARCH_SAMPLES = 64
DEFAULT_VALIDATION_SAMPLES = 128
DEFAULT_LOG_STEPS = (0.5, 0.2)
# The search's starts besides the formula (README "Fitted schedules"). EDM: the free first step (the analytical one;
# without it, the first call's step) lands at sigma_max divided by each of these, and a Karras schedule (the config's
# rho) runs from there to the last point: trajectories of trained models are nearly straight at high noise, where
# Karras spends most of its steps (GITS' finding; our fits jump from 80 to 3-16). Rectified flow: the uniform grid with
# diffusers' time shift t -> s t / (1 + (s - 1) t) (SD3's schedules), i.e. every sigma = t / (1 - t) times s, for these
# s (the uniform grid, unlike Karras' rho = 7, is not tuned to few steps). The descent starts from the closest of the
# formula and these. (A first step to 80 / 2 was never the closest start on our six digits models, at any NFE from 3
# to 10: left out since stop 23.)
FIRST_STEP_DIVISORS = (4, 8, 16, 32)
FLOW_START_SHIFTS = (0.25, 0.5, 2.0)
# "bounded" (the default): the coordinate descent by the smallest log step from the closest start (the fit for one
# call fewer, stretched to one more point, among them), stopped after `bounded_descent_trials(nfe)` moved schedules
# (stop 25: by the larger step first, 38 of the 42 moves a trace scored at NFE 4-10 failed and the budget ran out
# before the smaller step; DESIGN.md section 11); "descent": the descent from the closest formula start until no move
# improves, and a second one from the fit for one call fewer with a point inserted (the full search, 3-4x the model
# calls).
SEARCHES = ("bounded", "descent")
DEFAULT_SEARCH = "bounded"
# The bounded descent's moves times the NFE: a move re-runs the sampler from the moved point, up to NFE model calls,
# so the low NFE, where moves are cheap, get more moves (17 at NFE 3, 5 at NFE 10; stop 23's budget, 4.5-4.6% of the
# training in `make demo`). Where the fit one NFE below gives a warm start, scoring it is paid for with moves: 40 / NFE
# (10 at NFE 4, 4 at NFE 10) costs as many model calls over NFE 4-10, and its fits were closer to the teacher on fresh
# draws (README "Fitted schedules"). The first NFE of a fit, and Heun (odd NFE only), have no warm start.
# `fit_schedules(bounded_budget=...)` sets the first, and the second in proportion (40 / 52 of it).
BOUNDED_DESCENT_BUDGET = 52
WARM_START_DESCENT_BUDGET = 40
# Sampler states kept for runs that share their first points (each: the sample, up to 4 derivatives, a model output).
MAX_KEPT_STATES = 32
# Pixel features are average-pooled to at most this many dimensions, so that a covariance stays cheap to compare.
MAX_FEATURE_DIM = 1024


@dataclass
class ScheduleFitOutput(BaseOutput):
    """
    Output of [`fit_schedules`].

    Args:
        scheduler (see [`fitted_scheduler_class`]):
            The pipeline's scheduler with the fitted schedules (`fitted_sigmas`) and the model's fingerprint in its
            config: `pipe.scheduler = output.scheduler`, then `pipe.save_pretrained(...)` keeps them.
        formula_distances (`dict[int, float]`):
            For each NFE, the Frechet distance to the teacher's samples on the formula schedule (Karras; RNE's uniform
            grid for rectified flow), on the noise draws of the search.
        fitted_distances (`dict[int, float]`):
            The same on the fitted schedule (never larger).
        validation_formula_distances (`dict[int, float]`), validation_fitted_distances (`dict[int, float]`):
            Both again on fresh noise draws; the scheduler holds the fitted schedules of the NFEs where the fitted
            one is closer there (`scheduler.fitted_num_inference_steps`). Empty when the fit was not validated.
        num_model_calls (`int`):
            The UNet calls of the search, its teacher included, each on a batch of `num_samples` images.
        num_validation_model_calls (`int`):
            The UNet calls of the validation, its teacher included, each on a batch of `num_validation_samples`
            images (0 when the fit was not validated).
    """

    scheduler: IPNDMScheduler | FittedFlowMatchEulerDiscreteScheduler | FittedFlowMatchHeunDiscreteScheduler
    formula_distances: dict[int, float]
    fitted_distances: dict[int, float]
    validation_formula_distances: dict[int, float]
    validation_fitted_distances: dict[int, float]
    num_model_calls: int
    num_validation_model_calls: int


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """
    Images as feature vectors: average-pooled by the smallest integer factor that leaves at most `MAX_FEATURE_DIM`
    values per image, then flattened.

    Args:
        images (`torch.Tensor` of shape `(batch, channels, height, width)`)

    Returns:
        `torch.Tensor` of shape `(batch, feature_dim)`, float64.
    """
    channels, height, width = images.shape[1:]
    factor = 1
    while channels * (height // factor) * (width // factor) > MAX_FEATURE_DIM:
        factor += 1
    if factor > 1:
        images = F.avg_pool2d(images, factor)
    return images.flatten(1).to(torch.float64)


class ScheduleDistance:
    """
    The criterion of the search: the Frechet distance, in [`pixel_features`], between the images the pipeline's
    sampler makes on a candidate schedule and the images of a converged teacher, from the same noise and codes.

    The sampler is the pipeline's scheduler with the candidate as its only fitted schedule
    ([`fitted_scheduler_class`]): EDM's [`IPNDMScheduler`] or rectified flow's Euler or Heun. The teacher runs on
    `num_samples` noise draws and codes drawn from the encoder's code weights (Gaussian conditions from their prior;
    none for an unconditional pipeline), as the pipeline draws them: EDM's teacher is the variable-step iPNDM of the
    scheduler's config, rectified flow's is Heun on RNE's uniform grid (second order; the formulation's
    `FlowMatchHeunDiscreteScheduler`), both at `teacher_steps` model calls.

    Args:
        pipeline ([`QACPipeline`]): A trained pipeline whose scheduler [`fit_schedules`] can fit.
        num_samples (`int`): Noise draws the distance is measured on.
        teacher_steps (`int`): Model calls of the teacher.
        generator (`torch.Generator`, *optional*): The random source of the noise and the codes.
    """

    def __init__(self, pipeline, num_samples: int, teacher_steps: int, generator: torch.Generator | None = None):
        self.pipeline = pipeline
        self.fitted_class = fitted_scheduler_class(pipeline.scheduler)
        # the noise, then the conditions (codes from the code weights, or Gaussian conditions), as the pipeline draws
        self.latents, self.code, _ = pipeline._noise_and_conditions(num_samples, generator, None, None)
        self.config = own_settings(self.fitted_class, pipeline.scheduler.config)
        self.num_model_calls = 0
        # the sampler's state before each model call of recent runs, by the schedule's points up to there
        self._states = OrderedDict()
        # the distance of every schedule scored so far: a descent's last sweep re-scores schedules it has seen
        self._distances = {}
        self.teacher = pixel_features(self._teacher_samples(teacher_steps))

    def __call__(self, sigmas: Sequence[float]) -> float:
        """
        The distance of the sampler on the schedule `sigmas` (the pipeline's scheduler config); a schedule scored
        before is not run again.
        """
        key = tuple(sigmas)
        if key not in self._distances:
            scheduler = self._scheduler(fitted_sigmas=[list(sigmas)])
            samples = self.samples(scheduler, scheduler.fitted_num_inference_steps[0])
            self._distances[key] = frechet_distance(pixel_features(samples), self.teacher)
        return self._distances[key]

    def num_calls(self, sigmas: Sequence[float]) -> int:
        """The model calls of the pipeline's sampler on the schedule `sigmas` (one fewer with the analytical step)."""
        return self._scheduler()._num_calls(len(sigmas))

    def formula_sigmas(self, num_inference_steps: int) -> list[float]:
        """The formula schedule of the pipeline's scheduler config (Karras; RNE's uniform grid for flows)."""
        return self._scheduler()._formula_sigmas(num_inference_steps).tolist()

    # The search moves points in log sigma of EDM for both formulations: rectified flow's t is sigma / (1 + sigma),
    # t = 1 is sigma = infinity (DESIGN.md section 11).

    def to_search(self, points: Sequence[float]) -> list[float]:
        """A schedule in the search's coordinates: EDM's sigmas as they are, rectified flow's t as t / (1 - t)."""
        if self.fitted_class is IPNDMScheduler:
            return list(points)
        return [math.inf if t == 1 else t / (1 - t) for t in points]

    def from_search(self, sigmas: Sequence[float]) -> list[float]:
        """The schedule of the search's coordinates `sigmas` (the inverse of [`to_search`])."""
        if self.fitted_class is IPNDMScheduler:
            return list(sigmas)
        return [1.0 if math.isinf(sigma) else sigma / (1 + sigma) for sigma in sigmas]

    def search_distance(self, sigmas: Sequence[float]) -> float:
        """The distance of the schedule whose search coordinates are `sigmas`."""
        return self(self.from_search(sigmas))

    def search_starts(self, num_inference_steps: int) -> list[list[float]]:
        """
        The starts of the search, in its coordinates: the formula first, then EDM's Karras schedules after a first step
        to sigma_max / `FIRST_STEP_DIVISORS` ([`karras_starts`]) or rectified flow's grids shifted by
        `FLOW_START_SHIFTS`.
        """
        if self.fitted_class is IPNDMScheduler:
            return karras_starts(self._scheduler(), num_inference_steps)
        formula = self.to_search(self.formula_sigmas(num_inference_steps))
        return [formula] + [[formula[0], *(sigma * shift for sigma in formula[1:-1]), formula[-1]]
                            for shift in FLOW_START_SHIFTS]

    @torch.no_grad()
    def samples(self, scheduler, num_inference_steps: int, reuse_states: bool = True) -> torch.Tensor:
        """
        The images in [-1, 1] that `pipeline(latents=..., code_indices=...)` makes with `scheduler` (its loop, steps
        2-4). The model call at a point depends only on the schedule up to that point, so with `reuse_states` a run
        whose first points are those of a recent run takes that run's state and model output at the last shared
        point: the search moves one point at a time, and this saves about half of its model calls.
        """
        pipeline, device, dtype = self.pipeline, self.pipeline._execution_device, self.pipeline.unet.dtype
        formulation = formulation_from_name(pipeline.config.formulation, scheduler)
        formulation.set_timesteps(num_inference_steps, device=device)
        sample = formulation.initial_sample(self.latents.to(device=device, dtype=torch.float32))
        points = tuple(scheduler.sigmas.tolist())
        offset = scheduler._sigma_offset() if reuse_states else 0
        start, model_output = 0, None
        for index in range(len(scheduler.timesteps) - 1, -1, -1) if reuse_states else ():
            state = self._states.get(points[: index + offset + 1])
            if state is not None:
                sample, solver_state, model_output = state
                _restore_solver_state(scheduler, solver_state, index)
                start = index
                break
        for index, t in enumerate(scheduler.timesteps[start:], start):
            if model_output is None:
                state = (sample, _solver_state(scheduler))
                model_input = formulation.scale_model_input(sample, t).to(dtype)
                model_output = pipeline.unet(model_input, t, code=self.code).sample
                self.num_model_calls += 1
                if reuse_states:
                    self._keep(points[: index + offset + 1], (*state, model_output))
            sample = scheduler.step(model_output, t, sample).prev_sample
            model_output = None
        return pipeline.image_processor.postprocess(sample, output_type="pt") * 2 - 1

    def _scheduler(self, **changes):
        """The pipeline's scheduler config as a scheduler that can hold fitted schedules, with `changes`."""
        return self.fitted_class.from_config(
            {**self.config, "fitted_sigmas": None, "fitted_model_fingerprint": None, **changes}
        )

    def _teacher_samples(self, teacher_steps: int) -> torch.Tensor:
        """
        The teacher's images in [-1, 1] from the same noise and codes: EDM's variable-step iPNDM, rectified flow's Heun
        on RNE's grid, at `teacher_steps` model calls (Heun takes an odd number: one fewer for an even count).
        """
        if self.fitted_class is IPNDMScheduler:
            return self.samples(self._scheduler(variable_step=True), teacher_steps, reuse_states=False)
        heun = self.pipeline.formulation.solver("heun")
        return self.samples(heun, teacher_steps - 1 + teacher_steps % 2, reuse_states=False)

    def _keep(self, points: tuple[float, ...], state: tuple) -> None:
        """Remember a state, forgetting the least recently used beyond `MAX_KEPT_STATES`."""
        self._states[points] = state
        self._states.move_to_end(points)
        if len(self._states) > MAX_KEPT_STATES:
            self._states.popitem(last=False)


def _solver_state(scheduler) -> dict:
    """
    What a scheduler carries from one model call to the next besides the sample: iPNDM's derivatives, Heun's first
    stage; Euler nothing.
    """
    if isinstance(scheduler, IPNDMScheduler):
        return {"derivatives": list(scheduler.derivatives), "lower_order_nums": scheduler.lower_order_nums}
    if isinstance(scheduler, FlowMatchHeunDiscreteScheduler):
        sample = getattr(scheduler, "sample", None)  # set from the first step on
        return {"prev_derivative": scheduler.prev_derivative, "dt": scheduler.dt, "sample": sample}
    return {}


def _restore_solver_state(scheduler, state: dict, step_index: int) -> None:
    """Put a scheduler whose timesteps are set back to a kept state, before its model call at `step_index`."""
    for name, value in state.items():
        setattr(scheduler, name, list(value) if isinstance(value, list) else value)
    scheduler._step_index = step_index
    if isinstance(scheduler, IPNDMScheduler):
        scheduler.is_scale_input_called = True  # the kept model output was made from the scaled input


def fitted_scheduler_class(scheduler) -> type:
    """
    The scheduler class that carries fitted schedules for a pipeline sampling with `scheduler`: [`IPNDMScheduler`]
    (EDM), [`FittedFlowMatchEulerDiscreteScheduler`] or [`FittedFlowMatchHeunDiscreteScheduler`] (rectified flow with
    diffusers' flow-matching Euler or Heun).

    Raises:
        `ValueError`: For any other scheduler, naming the one to set.
    """
    if isinstance(scheduler, IPNDMScheduler):
        return IPNDMScheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FittedFlowMatchEulerDiscreteScheduler
    if isinstance(scheduler, FlowMatchHeunDiscreteScheduler):
        return FittedFlowMatchHeunDiscreteScheduler
    raise ValueError(
        f"Schedules are fitted for the IPNDMScheduler (EDM) and for FlowMatchEuler/HeunDiscreteScheduler (rectified "
        f"flow), got {type(scheduler).__name__}: set `pipe.scheduler = solver_from_config('ipndm', "
        "pipe.scheduler.config)` or, for a rectified-flow model, `pipe.scheduler = pipe.formulation.solver('euler')` "
        "first."
    )


def check_fit_nfe(num_inference_steps: Sequence[int], teacher_steps: int | None = DEFAULT_TEACHER_STEPS) -> None:
    """
    Refuse NFE that [`fit_schedules`] cannot fit: not a non-empty list of distinct integers >= 1 (and < `teacher_steps`
    unless that is `None`: a search without a teacher).
    """
    steps = list(num_inference_steps)
    if not steps or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in steps):
        raise ValueError(f"The NFE to fit must be a non-empty list of integers >= 1, got {steps!r}.")
    if len(set(steps)) != len(steps):
        raise ValueError(f"The NFE to fit list one twice: {steps}.")
    if teacher_steps is not None and teacher_steps <= max(steps):
        raise ValueError(
            f"The teacher's {teacher_steps} model calls must exceed the largest NFE fitted ({max(steps)}): the "
            "teacher is the converged sampler the fitted ones are compared to."
        )


def check_sample_counts(sample_counts: dict[str, int]) -> None:
    """Refuse noise-draw counts [`fit_schedules`] cannot use, by name: not an integer >= 2 (a covariance needs two)."""
    for name, count in sample_counts.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 2:
            raise ValueError(f"`{name}` must be an integer >= 2 (a covariance needs two), got {count!r}.")


def check_search(search: str) -> None:
    """Refuse a search [`fit_schedules`] does not know (one of `SEARCHES`)."""
    if search not in SEARCHES:
        raise ValueError(f"The search must be one of {', '.join(map(repr, SEARCHES))}, got {search!r}.")


def check_bounded_budget(bounded_budget: int, name: str = "bounded_budget") -> None:
    """Refuse a budget of moves for the bounded search that is not an integer >= 1 (`name`: the option's name)."""
    if not isinstance(bounded_budget, int) or isinstance(bounded_budget, bool) or bounded_budget < 1:
        raise ValueError(
            f"`{name}` (the bounded search's moves times the NFE) must be an integer >= 1, got {bounded_budget!r}."
        )


def _check_fit_inputs(
    pipeline, num_inference_steps: Sequence[int], teacher_steps: int, sample_counts: dict, search: str,
    bounded_budget: int,
) -> None:
    fitted_scheduler_class(pipeline.scheduler)
    check_fit_nfe(num_inference_steps, teacher_steps)
    check_sample_counts(sample_counts)
    check_search(search)
    check_bounded_budget(bounded_budget)


def coordinate_descent(
    distance, sigmas: list[float], log_steps: Sequence[float], max_trials: int | None = None
) -> tuple[list[float], float]:
    """
    Minimise `distance(sigmas)` over the interior points: sweep them in order, moving each by a factor exp(+step) or,
    if that does not improve, exp(-step) in sigma, keeping the schedule strictly decreasing; sweep again while a move
    improves, then go on with the next (smaller) step. The end points stay.

    Args:
        distance (`Callable[[list[float]], float]`): The criterion of a schedule (lower is better).
        sigmas (`list[float]`): The start, strictly decreasing.
        log_steps (`Sequence[float]`): The moves in log sigma, largest first.
        max_trials (`int`, *optional*): Stop after scoring this many moved schedules (the first moves gain the most:
            README "Fitted schedules"); `None` runs until no move of the smallest step improves.

    Returns:
        `tuple` `(sigmas, distance)`: the closest schedule found and its distance.
    """
    best, trials = distance(sigmas), 0
    for log_step in log_steps:
        improved = True
        while improved:
            improved = False
            for index in range(1, len(sigmas) - 1):
                for direction in (1, -1):
                    trial = list(sigmas)
                    trial[index] = sigmas[index] * math.exp(direction * log_step)
                    if not trial[index - 1] > trial[index] > trial[index + 1]:
                        continue
                    if trials == max_trials:
                        return sigmas, best
                    trial_distance, trials = distance(trial), trials + 1
                    if trial_distance < best:
                        sigmas, best, improved = trial, trial_distance, True
                        break
    return sigmas, best


def _insertions(sigmas: list[float]) -> list[list[float]]:
    """
    `sigmas` with one more point, the geometric mean of two neighbours: one schedule per gap (not a gap to 0 or from
    infinity).
    """
    return [
        sigmas[: index + 1] + [math.sqrt(high * low)] + sigmas[index + 1 :]
        for index, (high, low) in enumerate(zip(sigmas, sigmas[1:]))
        if low > 0 and math.isfinite(high)
    ]


def karras_starts(scheduler: IPNDMScheduler, num_inference_steps: int) -> list[list[float]]:
    """
    The starts of EDM's search for `num_inference_steps` model calls: the Karras schedule of `scheduler`, then for
    each divisor q of `FIRST_STEP_DIVISORS` the schedule whose first step (free with the analytical first step) goes
    from sigma_max to sigma_max / q, followed by the scheduler's Karras schedule from sigma_max / q with one step fewer
    (same rho, same last points). Each has the formula's ends and number of points; none when that first step would
    be the only one.
    """
    config = scheduler.config
    formula = scheduler._formula_sigmas(num_inference_steps).tolist()
    calls_after_first_step = num_inference_steps - (0 if config.analytical_first_step else 1)
    if calls_after_first_step < 1:
        return [formula]
    tails = [
        IPNDMScheduler.from_config(config, sigma_max=config.sigma_max / divisor, analytical_first_step=False,
                                   fitted_sigmas=None)._formula_sigmas(calls_after_first_step).tolist()
        for divisor in FIRST_STEP_DIVISORS if config.sigma_max / divisor > config.sigma_min
    ]
    return [formula] + [[config.sigma_max, *tail] for tail in tails]


def closest_start(distance, starts: list[list[float]]) -> tuple[list[float], float]:
    """The closest of `starts` to the teacher by `distance`, and its distance; the first (the formula) wins ties."""
    start = min(starts, key=distance)
    return start, distance(start)


def _fit_one(distance, starts: list[list[float]], below: list[float] | None, log_steps: Sequence[float],
             max_trials: int | None = None):
    """
    The schedule fitted for one NFE: the descent from the closest of `starts` (the formula schedule first, which wins
    ties), and, when a schedule was fitted for one model call less (`below`), also the descent from the best of its
    one-point insertions if that one starts closer to the teacher than the first descent ended; the closer of the two.
    Each descent scores at most `max_trials` moves ([`coordinate_descent`]).
    """
    fitted = coordinate_descent(distance, closest_start(distance, starts)[0], log_steps, max_trials)
    insertions = [(distance(sigmas), sigmas) for sigmas in _insertions(below)] if below is not None else []
    if insertions:  # none where `below` has no gap between two finite, positive points
        start_distance, start = min(insertions, key=lambda pair: pair[0])
        if start_distance < fitted[1]:
            fitted = min(fitted, coordinate_descent(distance, start, log_steps, max_trials), key=lambda pair: pair[1])
    return fitted


def warm_start_budget(bounded_budget: int = BOUNDED_DESCENT_BUDGET) -> float:
    """
    The bounded search's moves times the NFE where a warm start was scored: `bounded_budget` times
    `WARM_START_DESCENT_BUDGET` / `BOUNDED_DESCENT_BUDGET` (40 / 52; 40 for the default).
    """
    return bounded_budget * WARM_START_DESCENT_BUDGET / BOUNDED_DESCENT_BUDGET


def bounded_descent_trials(
    num_inference_steps: int, warm_start: bool = False, bounded_budget: int = BOUNDED_DESCENT_BUDGET
) -> int:
    """
    The moved schedules the bounded search scores at `num_inference_steps` calls: `bounded_budget` / NFE, or, where a
    `warm_start` was scored among the starts, [`warm_start_budget`] / NFE; at least one.
    """
    moves = warm_start_budget(bounded_budget) if warm_start else bounded_budget
    return max(1, round(moves / num_inference_steps))


def _fit_nfe(distance, starts: list[list[float]], below: list[float] | None, search: str,
             log_steps: Sequence[float], num_inference_steps: int,
             bounded_budget: int = BOUNDED_DESCENT_BUDGET) -> tuple[list[float], float]:
    """
    The schedule fitted for `num_inference_steps` calls by `search`: with "descent" [`_fit_one`]'s (`below`: the fit
    for one call fewer, or `None`); with "bounded" the descent by the smallest of `log_steps` from the closest of
    `starts` and of `below` stretched to one more point ([`_stretched`], the warm start), scoring at most
    [`bounded_descent_trials`] moves for `bounded_budget` (fewer after a warm start).
    """
    if search == "bounded":
        warm_start = _stretched(below) if below is not None else None
        starts = starts if warm_start is None else [*starts, warm_start]
        trials = bounded_descent_trials(num_inference_steps, warm_start is not None, bounded_budget)
        return _fit_one(distance, starts, None, log_steps[-1:], trials)
    return _fit_one(distance, starts, below, log_steps)


def _stretched(sigmas: list[float]) -> list[float] | None:
    """
    `sigmas` (search coordinates) with one more point, the same shape: its positive, finite points after the first,
    read at one more evenly spaced position by linear interpolation in log sigma over their index, with both of their
    ends kept; the first point (EDM's sigma_max, rectified flow's t = 1) and a final 0 stay. `None` where fewer than
    two points can be stretched.
    """
    first, *rest = sigmas
    logs = [math.log(sigma) for sigma in rest if 0 < sigma < math.inf]
    count = len(logs)
    if count < 2:
        return None
    stretched = []
    for index in range(count + 1):
        position = index * (count - 1) / count
        low = min(int(position), count - 2)
        stretched.append(math.exp(logs[low] + (position - low) * (logs[low + 1] - logs[low])))
    stretched[0], stretched[-1] = rest[0], rest[count - 1]  # exactly, not through exp(log(.))
    return [first, *stretched, *rest[count:]]


@torch.no_grad()
def validate_schedules(
    pipeline,
    fitted_sigmas: Sequence[Sequence[float]],
    num_samples: int = DEFAULT_VALIDATION_SAMPLES,
    teacher_steps: int = DEFAULT_TEACHER_STEPS,
    generator: torch.Generator | None = None,
) -> tuple[list[list[float]], dict[int, float], dict[int, float]]:
    """
    Score fitted schedules and the formula's on noise draws of their own ([`ScheduleDistance`] on `num_samples` new
    draws of `generator`, with a new teacher), and keep the fitted schedules that are closer to the teacher there.

    Args:
        pipeline ([`QACPipeline`]): The pipeline the schedules were fitted to (see [`fitted_scheduler_class`]).
        fitted_sigmas (`Sequence[Sequence[float]]`): The fitted schedules, one per NFE.
        num_samples (`int`, defaults to 128), teacher_steps (`int`, defaults to 64): As in [`fit_schedules`].
        generator (`torch.Generator`, *optional*): The random source of the new noise and codes.

    Returns:
        `tuple` `(kept, formula_distances, fitted_distances)`: the schedules kept, and the distances of the formula
        and of each fitted schedule on the new draws, by NFE.
    """
    return _validate(ScheduleDistance(pipeline, num_samples, teacher_steps, generator), fitted_sigmas)


def _validate(distance: ScheduleDistance, fitted_sigmas: Sequence[Sequence[float]]):
    kept, formula_distances, fitted_distances = [], {}, {}
    for sigmas in fitted_sigmas:
        nfe = distance.num_calls(sigmas)
        formula_distances[nfe] = distance(distance.formula_sigmas(nfe))
        fitted_distances[nfe] = distance(list(sigmas))
        if fitted_distances[nfe] < formula_distances[nfe]:
            kept.append(list(sigmas))
    return kept, formula_distances, fitted_distances


def search_schedules(
    distance: Callable[[list[float]], float],
    search_starts: Callable[[int], list[list[float]]],
    num_inference_steps: Sequence[int],
    search: str = DEFAULT_SEARCH,
    log_steps: Sequence[float] = DEFAULT_LOG_STEPS,
    progress_bar: bool = True,
    bounded_budget: int = BOUNDED_DESCENT_BUDGET,
) -> tuple[dict[int, list[float]], dict[int, float], dict[int, float]]:
    """
    The search of [`fit_schedules`] on any criterion: for each NFE of `num_inference_steps`, smallest first, the
    schedule `search` finds from `search_starts(nfe)`. Where the NFE one below is searched in the same call, its
    schedule is one more start: "bounded" adds it stretched to one more point (the warm start), "descent" descends
    again from its best one-point insertion. [`fit_schedules`] runs it on a pipeline's [`ScheduleDistance`];
    benchmarks/fitted_schedules_exact_denoiser.py on closed-form denoisers.

    Args:
        distance (`Callable[[list[float]], float]`):
            The criterion of a schedule in the search's coordinates (lower is better), e.g.
            [`ScheduleDistance.search_distance`]. It is called again on schedules it has scored, so it should
            remember them.
        search_starts (`Callable[[int], list[list[float]]]`):
            The starts for an NFE, the formula schedule first, e.g. [`ScheduleDistance.search_starts`] or
            [`karras_starts`].
        num_inference_steps (`Sequence[int]`):
            The NFEs to search: distinct integers >= 1.
        search (`str`, defaults to `"bounded"`):
            `"bounded"` or `"descent"`, as in [`fit_schedules`].
        log_steps (`Sequence[float]`, defaults to `(0.5, 0.2)`):
            The descent's steps in log sigma, largest first; the bounded search moves by the last only.
        progress_bar (`bool`, defaults to `True`):
            Show one bar step per NFE.
        bounded_budget (`int`, defaults to 52):
            The bounded search's moves times the NFE, as in [`fit_schedules`].

    Returns:
        `tuple` `(schedules, formula_distances, fitted_distances)`, each by NFE: the schedules found (search
        coordinates), and the distances of the formula and of the schedule found.
    """
    check_fit_nfe(num_inference_steps, teacher_steps=None)
    check_search(search)
    check_bounded_budget(bounded_budget)
    schedules, formula_distances, fitted_distances = {}, {}, {}
    bar = tqdm(sorted(num_inference_steps), desc="Fitting schedules", disable=not progress_bar)
    for nfe in bar:
        starts = search_starts(nfe)
        formula_distances[nfe] = distance(starts[0])
        below = schedules.get(nfe - 1)  # the fit for one call fewer
        schedules[nfe], fitted_distances[nfe] = _fit_nfe(distance, starts, below, search, log_steps, nfe,
                                                         bounded_budget)
        bar.set_postfix(nfe=nfe, formula=f"{formula_distances[nfe]:.3g}", fitted=f"{fitted_distances[nfe]:.3g}")
    return schedules, formula_distances, fitted_distances


@torch.no_grad()
def fit_schedules(
    pipeline,
    num_inference_steps: Sequence[int] = DEFAULT_FIT_NFE,
    num_samples: int = DEFAULT_SEARCH_SAMPLES,
    teacher_steps: int = DEFAULT_TEACHER_STEPS,
    generator: torch.Generator | None = None,
    search: str = DEFAULT_SEARCH,
    log_steps: Sequence[float] = DEFAULT_LOG_STEPS,
    validate: bool = True,
    num_validation_samples: int = DEFAULT_VALIDATION_SAMPLES,
    progress_bar: bool = True,
    bounded_budget: int = BOUNDED_DESCENT_BUDGET,
) -> ScheduleFitOutput:
    """
    Fit the schedule of the pipeline's sampler to its trained model, for each NFE in `num_inference_steps` (see the
    module docstring for the method and why): the sigma schedule of EDM's [`IPNDMScheduler`], or the time grid of
    rectified flow's Euler or Heun (diffusers' `FlowMatchEulerDiscreteScheduler` or `FlowMatchHeunDiscreteScheduler`,
    returned as [`FittedFlowMatchEulerDiscreteScheduler`] or [`FittedFlowMatchHeunDiscreteScheduler`]; Heun at odd
    NFE only).

    For each NFE, a coordinate descent starts from the closest of the formula schedule and its variants (Karras from
    sigma_max, and Karras after a first step to sigma_max / `FIRST_STEP_DIVISORS`; for rectified flow RNE's uniform
    grid and its shifts, `FLOW_START_SHIFTS`; see [`ScheduleDistance.search_starts`]) and moves one point at a time by
    a factor `exp(+-log_step)` in sigma (in t / (1 - t), EDM's sigma, for rectified flow), keeping a move when
    [`ScheduleDistance`] (the Frechet distance between the sampler's images and a converged teacher's) drops. When
    the NFE one below is fitted in the same call, the best of its schedules with one point inserted (the geometric
    mean of two neighbours) is a second start if it is already closer than the first descent ended, and the closer
    result is kept. So a fitted schedule is never further from the teacher than the formula; a second start alone
    could waste the new call (a point inserted next to sigma_min changes nothing, and the descent from there stayed
    put on our digits baseline at NFE 5 and 6). With `search="bounded"` (the default) each NFE runs one descent, by
    the smallest of `log_steps` only, from the closest of the starts and, when the NFE one below is fitted in the same
    call, of its schedule stretched to one more point (the warm start), and stops it after
    [`bounded_descent_trials`] moved schedules (`bounded_budget` / NFE, 17 at NFE 3 by default; after a warm start
    40 / 52 of that, 10 at NFE 4, 4 at NFE 10).
    Then, with `validate`, [`validate_schedules`] scores every fitted schedule and the formula again on
    `num_validation_samples` fresh draws of `generator`, and the scheduler keeps only the fitted schedules that are
    closer there: a schedule that won on the search's draws by their chance alone goes back to the formula.
    Everything is deterministic given `generator`.

    Args:
        pipeline ([`QACPipeline`]): A trained pipeline whose scheduler is an [`IPNDMScheduler`] (EDM) or a
            `FlowMatchEulerDiscreteScheduler` or `FlowMatchHeunDiscreteScheduler` (rectified flow).
        num_inference_steps (`Sequence[int]`): The NFEs to fit; `set_timesteps` keeps the formula at any other.
        num_samples (`int`, defaults to 64): Noise draws the search measures its distances on.
        teacher_steps (`int`, defaults to 64): Model calls of the teacher (see [`ScheduleDistance`]); more than the
            largest NFE.
        generator (`torch.Generator`, *optional*): The random source of the noise and the codes.
        search (`str`, defaults to `"bounded"`): `"bounded"` (the descent from the closest start, the warm start
            included, stopped after [`bounded_descent_trials`] moves) or `"descent"` (both descents, until no move
            improves; README "Fitted schedules" compares the two).
        log_steps (`Sequence[float]`, defaults to `(0.5, 0.2)`): The step sizes of the descent in log sigma (of t / (1
            - t) for rectified flow), largest first; the bounded search moves by the last only.
        validate (`bool`, defaults to `True`): Keep only the fitted schedules that are closer than the formula on
            fresh noise draws too.
        num_validation_samples (`int`, defaults to 128): The fresh noise draws of the validation.
        progress_bar (`bool`, defaults to `True`): Show one bar step per NFE.
        bounded_budget (`int`, defaults to 52): The bounded search's moves times the NFE (40 / 52 of it after a warm
            start). More moves cost more model calls and let the descent go further: on our six digits models
            twice the default (104) left no rise of the FD from one NFE to the next beyond its sampling noise on the
            benchmark's draws (one on a second sampling seed), where the default left one (two), for 1.15-1.2x the
            fit's images (benchmarks/bounded_search_budget.py).

    Returns:
        [`ScheduleFitOutput`]: the scheduler to set on the pipeline, with the distances before and after.
    """
    _check_fit_inputs(
        pipeline, num_inference_steps, teacher_steps,
        {"num_samples": num_samples, "num_validation_samples": num_validation_samples}, search, bounded_budget,
    )
    distance = ScheduleDistance(pipeline, num_samples, teacher_steps, generator)
    searched, formula_distances, fitted_distances = search_schedules(
        distance.search_distance, distance.search_starts, num_inference_steps, search, log_steps, progress_bar,
        bounded_budget,
    )
    fitted = [distance.from_search(searched[nfe]) for nfe in sorted(searched)]
    validation, num_validation_model_calls = ({}, {}), 0
    if validate:
        check = ScheduleDistance(pipeline, num_validation_samples, teacher_steps, generator)
        fitted, *validation = _validate(check, fitted)
        num_validation_model_calls = check.num_model_calls
    fingerprint = model_fingerprint(pipeline.unet, pipeline.encoder) if fitted else None
    scheduler = distance._scheduler(fitted_sigmas=fitted or None, fitted_model_fingerprint=fingerprint)
    return ScheduleFitOutput(
        scheduler=scheduler, formula_distances=formula_distances, fitted_distances=fitted_distances,
        validation_formula_distances=validation[0], validation_fitted_distances=validation[1],
        num_model_calls=distance.num_model_calls, num_validation_model_calls=num_validation_model_calls,
    )
