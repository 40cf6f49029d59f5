"""Fitted sampling schedules: the search, the scheduler config that carries them, and the pipeline that uses them."""

import functools
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchHeunDiscreteScheduler

from conftest import count_unet_calls, make_rf_pipeline, make_tiny_models, make_tiny_pipeline, seeded
from qac_diffusers import IPNDMScheduler, QACPipeline
from qac_diffusers.models.fingerprint import model_fingerprint
from qac_diffusers.schedulers import (
    FittedFlowMatchEulerDiscreteScheduler,
    FittedFlowMatchHeunDiscreteScheduler,
    solver_from_config,
)
from qac_diffusers.schedulers.schedule_fitting import (
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_LOG_STEPS,
    FLOW_START_SHIFTS,
    SEARCHES,
    ScheduleDistance,
    _fit_nfe,
    _fit_one,
    _insertions,
    _stretched,
    bounded_descent_trials,
    closest_start,
    coordinate_descent,
    fit_schedules,
    karras_starts,
    pixel_features,
    search_schedules,
    validate_schedules,
)
from qac_diffusers.schedulers.scheduling_ipndm import karras_sigmas


FIT_NFES = [1, 2]
FIT_SETTINGS = {"num_samples": 6, "teacher_steps": 3}
FIT_KWARGS = {**FIT_SETTINGS, "num_validation_samples": 6}  # fit_schedules: the validation on 6 draws too


@pytest.fixture(scope="module")
def fitted():
    """
    A tiny pipeline, its schedules fitted at NFE 1 and 2 by the full descent (run until no move improves), and the
    number of UNet calls the fit made.
    """
    pipe = make_tiny_pipeline()
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    output = fit_schedules(
        pipe, FIT_NFES, **FIT_SETTINGS, generator=seeded(0), search="descent", validate=False, progress_bar=False
    )
    hook.remove()
    return pipe, output, len(calls)


def test_descent_finds_the_brute_force_minimum_of_its_lattice():
    # A distance with a known optimum: the search may only reach start * exp(k / 8) per interior point; among those
    # points, brute force over the lattice gives the best ordered schedule, and the descent must end there.
    start = [80.0, 10.0, 1.0, 0.002]
    target = [80.0, 3.3, 0.07, 0.002]

    def distance(sigmas):
        return sum((math.log(s) - math.log(t)) ** 2 for s, t in zip(sigmas[1:-1], target[1:-1]))

    found, best = coordinate_descent(distance, start, (0.5, 0.25, 0.125))
    lattice = [[start[i] * math.exp(k / 8) for k in range(-60, 40)] for i in (1, 2)]
    candidates = [[80.0, a, b, 0.002] for a, b in itertools.product(*lattice) if 80.0 > a > b > 0.002]
    brute_force = min(candidates, key=distance)
    assert found == pytest.approx(brute_force, rel=1e-9) and best == pytest.approx(distance(brute_force))


def test_descent_keeps_the_schedule_ordered():
    # The optimum of this distance is out of order (the second point above the first): the descent must stop short.
    found, _ = coordinate_descent(lambda s: (s[1] - 0.5) ** 2 + (s[2] - 5.0) ** 2, [80.0, 10.0, 1.0, 0.002], (0.5,))
    assert found[0] > found[1] > found[2] > found[3]


def test_descent_scores_at_most_max_trials_moves():
    # The unbounded descent on this distance scores many moves; bounded, it scores the start and `max_trials` moves,
    # and returns the best of those, which is the unbounded descent's path cut short.
    def distance(sigmas):
        scored.append(list(sigmas))
        return sum((math.log(s) - math.log(t)) ** 2 for s, t in zip(sigmas[1:-1], [3.3, 0.07]))

    start = [80.0, 10.0, 1.0, 0.002]
    scored = []
    unbounded = coordinate_descent(distance, start, (0.5, 0.2))
    path = list(scored)
    assert len(path) > 12
    for max_trials in (0, 1, 5, 12):
        scored = []
        found, best = coordinate_descent(distance, start, (0.5, 0.2), max_trials)
        assert scored == path[: max_trials + 1]
        assert best == min(distance(sigmas) for sigmas in path[: max_trials + 1]) > unbounded[1]
        assert best == distance(found)


def test_insertions_add_one_geometric_mean_per_gap():
    first, second = _insertions([80.0, 1.0, 0.002])
    assert first == pytest.approx([80.0, math.sqrt(80.0), 1.0, 0.002])
    assert second == pytest.approx([80.0, 1.0, math.sqrt(0.002), 0.002])
    (only,) = _insertions([80.0, 1.0, 0.0])  # none in the gap to 0
    assert only == pytest.approx([80.0, math.sqrt(80.0), 1.0, 0.0])
    (only,) = _insertions([math.inf, 1.0, 0.25])  # none from infinity (rectified flow's t = 1)
    assert only == pytest.approx([math.inf, 1.0, 0.5, 0.25])


# Two basins of a distance: a poor one (0.3 at its bottom) around Karras-like schedules, a good one (0 at its bottom)
# at a schedule fitted one NFE below with one point inserted.
GOOD_BASIN = [80.0, 9.0, 0.9, math.sqrt(0.9 * 0.002), 0.002]
POOR_BASIN = [80.0, 60.0, 40.0, 20.0, 0.002]


def two_basin_distance(sigmas):
    def log_distance(target):
        return sum(abs(math.log(s) - math.log(t)) for s, t in zip(sigmas[1:-1], target[1:-1]))

    return min(log_distance(GOOD_BASIN), 0.3 + log_distance(POOR_BASIN))


def test_fit_one_keeps_the_better_of_the_two_descents():
    # The descent from the formula stays in the poor basin; the second start finds the good one. A second start no
    # better than where the first descent ended is not descended from.
    good, distance = GOOD_BASIN, two_basin_distance
    formula = [80.0, 50.0, 30.0, 15.0, 0.002]
    assert coordinate_descent(distance, formula, (0.5,))[1] >= 0.3  # in the poor basin
    fitted, best = _fit_one(distance, [formula], [80.0, 9.0, 0.9, 0.002], (0.5,))
    assert fitted == pytest.approx(good) and best == pytest.approx(0.0)
    assert _fit_one(distance, [good], [80.0, 60.0, 40.0, 0.002], (0.5,)) == coordinate_descent(distance, good, (0.5,))
    # with several starts, the descent starts from the closest (there: the good basin without a second start)
    assert _fit_one(distance, [formula, good], None, (0.5,)) == coordinate_descent(distance, good, (0.5,))


def test_distance_runs_the_pipelines_sampler_also_when_resuming_a_shared_prefix():
    pipe = make_tiny_pipeline()
    distance = ScheduleDistance(pipe, **FIT_SETTINGS, generator=seeded(3))
    # NFE 3 (with the analytical first step, calls at 20, 3 and 0.5 or 0.2): the last call's point differs
    first, second = [80.0, 20.0, 3.0, 0.5, 0.002], [80.0, 20.0, 3.0, 0.2, 0.002]
    runs = []
    for sigmas in (first, second):
        calls = distance.num_model_calls
        scheduler = IPNDMScheduler(fitted_sigmas=[sigmas])
        runs.append((distance.samples(scheduler, 3), distance.num_model_calls - calls))
    assert [calls for _, calls in runs] == [3, 1]  # the second run reused the calls at 20 and 3

    generator = seeded(3)
    latents = torch.randn((6, 1, 8, 8), generator=generator)  # as ScheduleDistance draws them: noise, then codes
    code_indices = pipe.encoder.sample_indices(6, generator)
    for sigmas, (samples, _) in zip((first, second), runs):
        pipeline = QACPipeline(unet=pipe.unet, scheduler=IPNDMScheduler(fitted_sigmas=[sigmas]), encoder=pipe.encoder)
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(batch_size=6, num_inference_steps=3, latents=latents, code_indices=code_indices,
                          output_type="pt").images
        assert torch.equal(samples, images * 2 - 1)


def test_distance_scores_a_schedule_once():
    distance = ScheduleDistance(make_tiny_pipeline(), **FIT_SETTINGS, generator=seeded(3))
    sigmas = [80.0, 20.0, 3.0, 0.5, 0.002]
    first = distance(sigmas)
    calls = distance.num_model_calls
    assert distance(tuple(sigmas)) == first and distance.num_model_calls == calls
    assert distance([80.0, 20.0, 3.0, 0.2, 0.002]) != first and distance.num_model_calls == calls + 1


def test_fit_is_deterministic_and_never_worse_than_the_formula(fitted):
    pipe, output, calls = fitted
    again = fit_schedules(make_tiny_pipeline(), FIT_NFES, **FIT_SETTINGS, generator=seeded(0), search="descent",
                          validate=False, progress_bar=False)
    assert again.scheduler.config.fitted_sigmas == output.scheduler.config.fitted_sigmas
    # the default, bounded search: deterministic too, and never worse than the formula (at NFE 1, with no fit below
    # for a warm start, its descent is the full one's first, cut short: between the two)
    bounded = [fit_schedules(make_tiny_pipeline(), FIT_NFES, **FIT_SETTINGS, generator=seeded(0), validate=False,
                             progress_bar=False) for _ in range(2)]
    assert bounded[0].scheduler.config.fitted_sigmas == bounded[1].scheduler.config.fitted_sigmas
    for nfe in FIT_NFES:
        assert bounded[0].fitted_distances[nfe] <= output.formula_distances[nfe]
    assert output.fitted_distances[1] <= bounded[0].fitted_distances[1]
    assert bounded[0].num_model_calls < output.num_model_calls == calls


def test_fitted_schedule_is_locally_optimal(fitted):
    # No single move of the smallest search step improves a fitted schedule: re-scored with the same noise, codes and
    # teacher (the same seed), each neighbour is at least as far from the teacher.
    pipe, output, _ = fitted
    distance = ScheduleDistance(pipe, **FIT_SETTINGS, generator=seeded(0))
    for nfe, sigmas in zip(FIT_NFES, output.scheduler.config.fitted_sigmas):
        assert len(sigmas) == nfe + 2  # with the analytical first step
        assert distance(sigmas) == pytest.approx(output.fitted_distances[nfe])
        smallest = DEFAULT_LOG_STEPS[-1]
        for index, factor in itertools.product(range(1, nfe + 1), (math.exp(smallest), math.exp(-smallest))):
            neighbour = list(sigmas)
            neighbour[index] *= factor
            if neighbour[index - 1] > neighbour[index] > neighbour[index + 1]:
                assert distance(neighbour) >= output.fitted_distances[nfe]


def test_validation_keeps_the_schedules_that_are_closer_on_fresh_draws(fitted):
    pipe, output, _ = fitted
    fitted_sigmas = output.scheduler.config.fitted_sigmas
    # on the search's own draws (the same seed) every fitted schedule that improved is closer: all are kept
    assert all(output.fitted_distances[nfe] < output.formula_distances[nfe] for nfe in FIT_NFES)
    kept, formula, fitted_distances = validate_schedules(pipe, fitted_sigmas, **FIT_SETTINGS, generator=seeded(0))
    assert kept == fitted_sigmas
    assert formula == output.formula_distances and fitted_distances == output.fitted_distances
    # the formula itself is not closer than the formula: not kept
    distance = ScheduleDistance(pipe, **FIT_SETTINGS, generator=seeded(5))
    assert validate_schedules(pipe, [distance.formula_sigmas(2)], **FIT_SETTINGS, generator=seeded(5))[0] == []

    validated = fit_schedules(pipe, FIT_NFES, **FIT_KWARGS, generator=seeded(0), search="descent", progress_bar=False)
    assert validated.fitted_distances == output.fitted_distances  # the same search, then the validation
    closer = [nfe for nfe in FIT_NFES
              if validated.validation_fitted_distances[nfe] < validated.validation_formula_distances[nfe]]
    assert validated.scheduler.fitted_num_inference_steps == closer
    assert validated.scheduler.config.fitted_sigmas == ([fitted_sigmas[nfe - 1] for nfe in closer] or None)
    assert validated.validation_formula_distances != output.formula_distances  # fresh draws


def test_validation_draws_its_own_number_of_samples_after_the_search():
    pipe = make_tiny_pipeline()
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    output = fit_schedules(pipe, FIT_NFES, **FIT_SETTINGS, num_validation_samples=7, generator=seeded(0),
                           progress_bar=False)
    hook.remove()
    assert calls.count(6) == output.num_model_calls and calls.count(7) == output.num_validation_model_calls > 0
    generator = seeded(0)
    ScheduleDistance(pipe, **FIT_SETTINGS, generator=generator)  # the search's draws come first
    fitted_sigmas = fit_schedules(pipe, FIT_NFES, **FIT_SETTINGS, generator=seeded(0), validate=False,
                                  progress_bar=False).scheduler.config.fitted_sigmas
    _, formula, fitted_distances = validate_schedules(pipe, fitted_sigmas, 7, 3, generator)
    assert formula == output.validation_formula_distances and fitted_distances == output.validation_fitted_distances


def test_validation_counts_calls_without_the_analytical_first_step():
    pipe = make_tiny_pipeline()
    pipe.scheduler = IPNDMScheduler(analytical_first_step=False)  # NFE n: n + 1 sigmas, not n + 2
    output = fit_schedules(pipe, [1, 2], **FIT_KWARGS, generator=seeded(0), progress_bar=False)
    assert sorted(output.validation_formula_distances) == sorted(output.validation_fitted_distances) == [1, 2]
    distance = ScheduleDistance(pipe, **FIT_SETTINGS, generator=seeded(0))
    assert output.formula_distances[2] == distance(distance.formula_sigmas(2))
    assert set(output.scheduler.fitted_num_inference_steps) <= {1, 2}


def test_scheduler_uses_fitted_schedules_only_at_their_nfe(fitted):
    _, output, _ = fitted
    scheduler = output.scheduler
    assert scheduler.fitted_num_inference_steps == FIT_NFES
    for nfe, sigmas in zip(FIT_NFES, scheduler.config.fitted_sigmas):
        scheduler.set_timesteps(nfe)
        assert scheduler.sigmas.tolist() == pytest.approx(sigmas, rel=1e-6)
        assert len(scheduler.timesteps) == nfe
    scheduler.set_timesteps(3)
    formula = IPNDMScheduler()
    formula.set_timesteps(3)
    assert torch.equal(scheduler.sigmas, formula.sigmas)


def test_pipeline_samples_saves_and_loads_fitted_schedules(fitted, tmp_path):
    pipe, output, _ = fitted
    with_fit = QACPipeline(unet=pipe.unet, scheduler=output.scheduler, encoder=pipe.encoder)
    with_fit.set_progress_bar_config(disable=True)
    images = with_fit(batch_size=2, num_inference_steps=2, generator=seeded(), output_type="pt").images
    formula_images = pipe(batch_size=2, num_inference_steps=2, generator=seeded(), output_type="pt").images
    assert not torch.allclose(images, formula_images)

    with_fit.save_pretrained(tmp_path)
    loaded = QACPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.fitted_sigmas == output.scheduler.config.fitted_sigmas
    reloaded_images = loaded(batch_size=2, num_inference_steps=2, generator=seeded(), output_type="pt").images
    assert torch.equal(reloaded_images, images)


def test_pipeline_refuses_schedules_fitted_to_another_model(fitted):
    _, output, _ = fitted
    other_unet, other_encoder = make_tiny_models(seed=1)
    assert output.scheduler.config.fitted_model_fingerprint != model_fingerprint(other_unet, other_encoder)
    with pytest.raises(ValueError, match="fitted to another model: refit them"):
        QACPipeline(unet=other_unet, scheduler=output.scheduler, encoder=other_encoder)


def test_other_solvers_drop_the_fitted_schedules(fitted):
    _, output, _ = fitted
    config = output.scheduler.config
    assert solver_from_config("ipndm", config).config.fitted_sigmas == config.fitted_sigmas
    assert solver_from_config("ipndm_variable", config).config.fitted_sigmas is None
    dpm = solver_from_config("dpmsolver2", config)
    assert "fitted_sigmas" not in dpm.config


@pytest.mark.parametrize(
    "fitted_sigmas, message",
    [
        ([[80.0, 5.0, 5.0, 0.002]], "not strictly decreasing"),
        ([[70.0, 5.0, 1.0, 0.002]], "does not run from 80.0 to 0.002"),
        ([[80.0, 5.0, 1.0, 0.0]], "does not run from 80.0 to 0.002"),
        ([[80.0, 0.002]], "needs at least 3 points"),
        ([[80.0, 5.0, 1.0, 0.002], [80.0, 7.0, 2.0, 0.002]], "more than one schedule for one NFE"),
    ],
)
def test_scheduler_refuses_bad_fitted_schedules(fitted_sigmas, message):
    with pytest.raises(ValueError, match=message):
        IPNDMScheduler(fitted_sigmas=fitted_sigmas)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": []}, "non-empty list of integers >= 1"),
        ({"num_inference_steps": [0, 3]}, "non-empty list of integers >= 1"),
        ({"num_inference_steps": [3, 3]}, "list one twice"),
        ({"num_inference_steps": [5], "teacher_steps": 5}, "must exceed the largest NFE fitted"),
        ({"num_inference_steps": [3], "num_samples": 1}, "`num_samples` must be an integer >= 2"),
        ({"num_inference_steps": [3], "num_validation_samples": 1.5}, "`num_validation_samples` must be an integer"),
        ({"num_inference_steps": [3], "search": "grid"}, "must be one of 'bounded', 'descent', got 'grid'"),
        ({"num_inference_steps": [3], "bounded_budget": 0}, "`bounded_budget` .* must be an integer >= 1, got 0"),
        ({"num_inference_steps": [3], "bounded_budget": 52.0}, "`bounded_budget` .* must be an integer >= 1"),
    ],
)
def test_fit_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_schedules(make_tiny_pipeline(), **kwargs)


def test_fit_refuses_another_scheduler():
    pipe = make_tiny_pipeline()
    pipe.scheduler = solver_from_config("dpmsolver2", pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"fitted for the IPNDMScheduler \(EDM\) and for FlowMatchEuler/Heun"):
        fit_schedules(pipe, [3])


def test_pixel_features_pool_large_images_to_at_most_1024_values():
    assert pixel_features(torch.zeros(2, 1, 8, 8)).shape == (2, 64)
    assert pixel_features(torch.zeros(2, 1, 28, 28)).shape == (2, 784)
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    features = pixel_features(images)
    assert features.shape == (2, 768) and features.dtype == torch.float64
    assert features[0, 0] == images[0, 0, :2, :2].mean()


def load_script(name: str):
    path = Path(__file__).resolve().parents[2] / "pipelines" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_schedule_script_writes_the_model_folders_scheduler(fitted, tmp_path, capsys):
    pipe, _, _ = fitted
    pipe.save_pretrained(tmp_path / "model")
    script = load_script("fit_schedule")
    script.main(["--model", str(tmp_path / "model"), "--nfe", "2", "1", "--num_samples", "6", "--teacher_steps", "3",
                 "--validation_samples", "6", "--device", "cpu"])
    loaded = QACPipeline.from_pretrained(tmp_path / "model")
    validated = fit_schedules(pipe, [1, 2], **FIT_KWARGS, generator=seeded(0), progress_bar=False)
    assert loaded.scheduler.config.fitted_sigmas == validated.scheduler.config.fitted_sigmas  # same seed, same fit
    printed = capsys.readouterr().out
    assert "UNet calls" in printed and f"{validated.fitted_distances[2]:<10.4g}" in printed
    assert f"{validated.validation_fitted_distances[2]:<10.4g}" in printed

    with pytest.raises(SystemExit, match="pass --output_dir"):
        script.main(["--model", "user/not-a-folder"])
    # bad NFE and draw counts are refused before the model loads, with the library's messages
    for flags, message in ((["--nfe", "3", "70"], "must exceed the largest NFE fitted (70)"),
                           (["--num_samples", "1"], "`--num_samples` must be an integer >= 2"),
                           (["--bounded_budget", "0"], "`--bounded_budget` (the bounded search's moves times the NFE) "
                                                       "must be an integer >= 1, got 0")):
        with pytest.raises(SystemExit):
            script.main(["--model", str(tmp_path / "no-such-model"), *flags])
        assert message in capsys.readouterr().err
    script.main(["--model", str(tmp_path / "model"), "--nfe", "2", "--num_samples", "6", "--teacher_steps", "3",
                 "--validation_samples", "6", "--device", "cpu", "--search", "descent", "--output_dir",
                 str(tmp_path / "descent")])
    descent = fit_schedules(pipe, [2], **FIT_KWARGS, generator=seeded(0), search="descent", progress_bar=False)
    assert QACPipeline.from_pretrained(tmp_path / "descent").scheduler.config.fitted_sigmas == (
        descent.scheduler.config.fitted_sigmas
    )


def test_fit_schedule_script_saves_a_rectified_flow_model_with_its_new_scheduler(flow_fitted, tmp_path):
    pipe, _ = flow_fitted
    pipe.save_pretrained(tmp_path / "model")  # with diffusers' FlowMatchEulerDiscreteScheduler
    load_script("fit_schedule").main(["--model", str(tmp_path / "model"), "--nfe", "2", "--num_samples", "6",
                                      "--teacher_steps", "6", "--validation_samples", "6", "--device", "cpu"])
    loaded = QACPipeline.from_pretrained(tmp_path / "model")
    validated = fit_schedules(pipe, [2], **FLOW_FIT_SETTINGS, num_validation_samples=6, generator=seeded(0),
                              progress_bar=False)
    assert type(loaded.scheduler) is FittedFlowMatchEulerDiscreteScheduler  # model_index.json names the new class
    assert loaded.scheduler.config.fitted_sigmas == validated.scheduler.config.fitted_sigmas
    load_script("fit_schedule").main(["--model", str(tmp_path / "model"), "--scheduler", "heun", "--nfe", "3",
                                      "--num_samples", "6", "--teacher_steps", "6", "--validation_samples", "6"])
    assert type(QACPipeline.from_pretrained(tmp_path / "model").scheduler) is FittedFlowMatchHeunDiscreteScheduler


def test_fit_works_for_the_unconditional_baseline():
    pipe = make_tiny_pipeline(code_dim=0)
    output = fit_schedules(pipe, [2], **FIT_SETTINGS, generator=seeded(0), validate=False, progress_bar=False)
    assert output.fitted_distances[2] <= output.formula_distances[2]
    assert output.scheduler.config.fitted_model_fingerprint == model_fingerprint(pipe.unet)
    baseline = QACPipeline(unet=pipe.unet, scheduler=output.scheduler, encoder=None)
    baseline.scheduler.set_timesteps(2)
    assert baseline.scheduler.sigmas.tolist() == pytest.approx(output.scheduler.config.fitted_sigmas[0], rel=1e-6)


# Rectified flow: Euler on time grids fitted to the model (FittedFlowMatchEulerDiscreteScheduler), Heun as the teacher.


@pytest.fixture(scope="module")
def flow_fitted():
    """A tiny rectified-flow pipeline and its Euler grids fitted at NFE 2 and 3 (no validation)."""
    pipe = make_rf_pipeline()
    output = fit_schedules(pipe, [2, 3], **FLOW_FIT_SETTINGS, generator=seeded(0), validate=False, progress_bar=False)
    return pipe, output


FLOW_FIT_SETTINGS = {"num_samples": 6, "teacher_steps": 6}


def test_flow_fit_keeps_its_grids_in_the_euler_scheduler(flow_fitted):
    pipe, output = flow_fitted
    scheduler = output.scheduler
    assert type(scheduler) is FittedFlowMatchEulerDiscreteScheduler
    assert scheduler.config.fitted_model_fingerprint == model_fingerprint(pipe.unet, pipe.encoder)
    assert scheduler.fitted_num_inference_steps == [2, 3]
    for nfe, grid in zip((2, 3), scheduler.config.fitted_sigmas):
        assert len(grid) == nfe + 1 and grid[0] == 1.0 and grid[-1] == 0.0
        assert output.fitted_distances[nfe] <= output.formula_distances[nfe]
    again = fit_schedules(make_rf_pipeline(), [2, 3], **FLOW_FIT_SETTINGS, generator=seeded(0), validate=False,
                          progress_bar=False)
    assert again.scheduler.config.fitted_sigmas == scheduler.config.fitted_sigmas


def test_flow_search_moves_edm_sigmas_and_starts_from_shifted_grids():
    distance = ScheduleDistance(make_rf_pipeline(), num_samples=6, teacher_steps=3, generator=seeded(0))
    grid = [1.0, 0.75, 0.5, 0.2, 0.0]
    assert distance.to_search(grid) == pytest.approx([math.inf, 3.0, 1.0, 0.25, 0.0])
    assert distance.from_search(distance.to_search(grid)) == pytest.approx(grid)
    uniform, *shifted = distance.search_starts(2)
    assert distance.from_search(uniform) == [1.0, 0.5, 0.0]
    # each shift s is diffusers' time shift s t / (1 + (s - 1) t) of the uniform grid
    assert [distance.from_search(start)[1] for start in shifted] == pytest.approx(
        [shift * 0.5 / (1 + (shift - 1) * 0.5) for shift in FLOW_START_SHIFTS]
    )


def test_edm_search_starts_from_karras_schedules_after_longer_first_steps():
    distance = ScheduleDistance(make_tiny_pipeline(), num_samples=6, teacher_steps=3, generator=seeded(0))
    assert distance.to_search([80.0, 1.0]) == [80.0, 1.0]
    formula, *others = distance.search_starts(2)
    assert formula == distance.formula_sigmas(2) == pytest.approx([80.0, 9.7232, 0.47, 0.002], abs=1e-4)
    # the free first step lands at 80 / q, then Karras (rho 7) from there: 2 calls on 3 points
    expected = [[80.0, *karras_sigmas(3, 0.002, 80.0 / q, 7.0).tolist()] for q in (4, 8, 16, 32)]
    assert others == [pytest.approx(start) for start in expected]
    assert others[-1] == pytest.approx([80.0, 2.5, 0.1690, 0.002], abs=1e-4)
    # without the analytical first step the first call is at sigma_max, and the formula is the only start at 1 call
    no_afs = IPNDMScheduler(analytical_first_step=False)
    assert karras_starts(no_afs, 2)[1] == pytest.approx([80.0, 20.0, 0.002])
    assert karras_starts(no_afs, 1) == [pytest.approx([80.0, 0.002])]


def test_bounded_descent_gives_the_low_nfe_more_moves():
    # a move re-runs the sampler from the moved point, up to NFE calls: the moves scale as 1 / NFE, at least one; after
    # a warm start, fewer (scoring it is paid for with moves)
    nfes = (1, 3, 4, 5, 8, 10, 52, 200)
    assert [bounded_descent_trials(nfe) for nfe in nfes] == [52, 17, 13, 10, 6, 5, 1, 1]
    assert [bounded_descent_trials(nfe, warm_start=True) for nfe in nfes] == [40, 13, 10, 8, 5, 4, 1, 1]
    # a budget twice the default: twice the moves, after a warm start 40 / 52 of them (80 / NFE), still at least one
    assert [bounded_descent_trials(nfe, False, 104) for nfe in nfes] == [104, 35, 26, 21, 13, 10, 2, 1]
    assert [bounded_descent_trials(nfe, True, 104) for nfe in nfes] == [80, 27, 20, 16, 10, 8, 2, 1]
    assert [bounded_descent_trials(nfe, True, 1) for nfe in nfes] == [1] * len(nfes)


def test_stretched_schedule_reads_the_log_sigmas_at_one_more_point():
    # EDM: sigma_max stays; the points after it, ends kept, at 3 evenly spaced positions instead of 2 in log sigma
    stretched = _stretched([80.0, 9.0, 0.9, 0.002])
    assert stretched == [80.0, 9.0, pytest.approx(9.0 * 10 ** (-2 / 3)), pytest.approx(0.9 * (0.002 / 0.9) ** (1 / 3)),
                         0.002]
    assert stretched[2:4] == pytest.approx([1.9389912, 0.1174460])
    assert stretched[1] == 9.0 and stretched[-1] == 0.002  # exactly
    # rectified flow in search coordinates: t = 1 (infinity) and t = 0 (0) stay, the points between are stretched
    assert _stretched([math.inf, 3.0, 0.2, 0.0]) == [math.inf, 3.0, pytest.approx(math.sqrt(0.6)), 0.2, 0.0]
    # fewer than two points to stretch: no schedule
    assert _stretched([80.0, 0.002]) is None and _stretched([math.inf, 1.0, 0.0]) is None


def test_bounded_search_descends_from_the_closest_start_the_stretched_fit_below_included():
    # Both formula starts are in the poor basin; the fit for one call fewer, stretched to one more point, starts
    # closer. Without it the bounded search descends from the closest formula start for the moves of its NFE (6 at
    # NFE 8); with it, from the warm start, for fewer moves (5), further down. The full descent takes `below` to the
    # good basin.
    distance, below = two_basin_distance, [80.0, 9.0, 0.9, 0.002]
    starts = [[80.0, 79.0, 78.0, 0.5, 0.002], [80.0, 79.5, 78.5, 0.4, 0.002]]
    closest = min(starts, key=distance)
    alone = _fit_nfe(distance, starts, None, "bounded", (0.5,), 8)
    assert alone == coordinate_descent(distance, closest, (0.5,), bounded_descent_trials(8))
    assert distance(closest) > alone[1] > coordinate_descent(distance, closest, (0.5,))[1] >= 0.3
    warm = _stretched(below)
    assert distance(warm) < distance(closest)
    bounded = _fit_nfe(distance, starts, below, "bounded", (0.5,), 8)
    assert bounded == coordinate_descent(distance, warm, (0.5,), bounded_descent_trials(8, warm_start=True))
    assert bounded != coordinate_descent(distance, warm, (0.5,), bounded_descent_trials(8))
    assert bounded[1] < min(distance(warm), alone[1])
    assert _fit_nfe(distance, starts, below, "descent", (0.5,), 8)[1] == pytest.approx(0.0)


def test_search_schedules_fits_each_nfe_from_the_fit_one_call_fewer():
    # On a criterion of schedules of any length, the search runs `_fit_nfe` NFE after NFE, smallest first, each with
    # the schedule it found for one call fewer (none after a gap in the NFE list), and reports the formula's distance.
    def distance(sigmas):
        target = torch.logspace(math.log10(80.0), math.log10(0.002), len(sigmas), dtype=torch.float64) ** 0.9
        return sum(abs(math.log(s) - math.log(t)) for s, t in zip(sigmas[1:-1], target[1:-1].tolist()))

    def starts(nfe):  # the formula (halving from 80, then the last point), then a closer start (a fifth each step)
        return [[80.0, *(80.0 * ratio ** (k + 1) for k in range(nfe - 1)), 0.002] for ratio in (0.5, 0.2)]

    for search in SEARCHES:
        schedules, formula, fitted = search_schedules(distance, starts, [5, 3, 6], search, (0.5, 0.2), False)
        assert list(schedules) == list(formula) == list(fitted) == [3, 5, 6]
        for nfe, below in ((3, None), (5, None), (6, schedules[5])):
            assert formula[nfe] == distance(starts(nfe)[0]) > distance(starts(nfe)[1]) > fitted[nfe]
            assert (schedules[nfe], fitted[nfe]) == _fit_nfe(distance, starts(nfe), below, search, (0.5, 0.2), nfe)
        if search == "bounded":  # the warm start from NFE 5 changed NFE 6's fit
            assert schedules[6] != _fit_nfe(distance, starts(6), None, search, (0.5, 0.2), 6)[0]
    with pytest.raises(ValueError, match="The search must be one of 'bounded', 'descent', got 'greedy'"):
        search_schedules(distance, starts, [3], "greedy")
    with pytest.raises(ValueError, match=r"The NFE to fit list one twice: \[3, 3\]"):
        search_schedules(distance, starts, [3, 3])
    karras = functools.partial(karras_starts, IPNDMScheduler())  # no teacher to stay below: NFE 70 is searched
    assert list(search_schedules(distance, karras, [70], progress_bar=False)[0]) == [70]


@pytest.mark.parametrize(
    "make_pipeline, nfes, settings, fit_improves, bounded_budget",
    [(make_tiny_pipeline, FIT_NFES, FIT_SETTINGS, True, BOUNDED_DESCENT_BUDGET),
     (make_tiny_pipeline, FIT_NFES, FIT_SETTINGS, True, 2),
     # its uniform grid is kept at NFE 3
     (make_rf_pipeline, [3, 4], {"num_samples": 6, "teacher_steps": 6}, False, BOUNDED_DESCENT_BUDGET)],
    ids=["edm", "edm_small_budget", "rectified_flow"],
)
def test_bounded_search_on_a_pipeline_descends_from_the_closest_start_within_its_trials(
    make_pipeline, nfes, settings, fit_improves, bounded_budget
):
    pipe = make_pipeline()
    output = fit_schedules(pipe, nfes, **settings, generator=seeded(0), validate=False, progress_bar=False,
                           bounded_budget=bounded_budget)
    # the same steps on a distance with the same draws, in the search's coordinates (rectified flow's t = 1 and t = 0
    # are infinity and 0 there): the formula scored first, then the bounded descent from the closest start (from the
    # second NFE on, the fit one below stretched among them, a valid schedule) by the smallest log step only; the same
    # schedules, distances and calls
    distance = ScheduleDistance(pipe, **settings, generator=seeded(0))
    below = None
    for nfe, fitted in zip(nfes, output.scheduler.config.fitted_sigmas):
        warm_start = below is not None
        starts = distance.search_starts(nfe) + ([_stretched(below)] if warm_start else [])
        for start in map(distance.from_search, starts):
            assert start[0] == distance.formula_sigmas(nfe)[0] and start[-1] == distance.formula_sigmas(nfe)[-1]
            assert len(start) == len(distance.formula_sigmas(nfe)) and all(a > b for a, b in zip(start, start[1:]))
        assert output.formula_distances[nfe] == distance.search_distance(starts[0])
        closest, _ = closest_start(distance.search_distance, starts)
        trials = bounded_descent_trials(nfe, warm_start, bounded_budget)
        sigmas, best = coordinate_descent(distance.search_distance, closest, DEFAULT_LOG_STEPS[-1:], trials)
        assert (distance.from_search(sigmas), best) == (fitted, output.fitted_distances[nfe])
        assert output.fitted_distances[nfe] < output.formula_distances[nfe] or (
            not fit_improves and output.fitted_distances[nfe] == output.formula_distances[nfe]
        )
        below = sigmas
    assert output.num_model_calls == distance.num_model_calls
    if bounded_budget != BOUNDED_DESCENT_BUDGET:  # the small budget stopped the descents early: fewer calls
        default = fit_schedules(pipe, nfes, **settings, generator=seeded(0), validate=False, progress_bar=False)
        assert output.num_model_calls < default.num_model_calls


def test_flow_distance_runs_the_pipelines_euler_and_a_heun_teacher():
    pipe = make_rf_pipeline()
    distance = ScheduleDistance(pipe, num_samples=6, teacher_steps=6, generator=seeded(3))
    assert distance.num_model_calls == 5  # Heun takes an odd number of calls: one fewer than 6
    assert distance.formula_sigmas(4) == [1.0, 0.75, 0.5, 0.25, 0.0]  # RNE's uniform grid
    first, second = [1.0, 0.6, 0.3, 0.0], [1.0, 0.6, 0.1, 0.0]
    runs = []
    for grid in (first, second):
        calls = distance.num_model_calls
        runs.append((distance.samples(FittedFlowMatchEulerDiscreteScheduler(fitted_sigmas=[grid]), 3),
                     distance.num_model_calls - calls))
    assert [calls for _, calls in runs] == [3, 1]  # the second run reused the calls at t = 1 and 0.6

    generator = seeded(3)
    latents = torch.randn((6, 1, 8, 8), generator=generator)
    code_indices = pipe.encoder.sample_indices(6, generator)
    for grid, (samples, _) in zip((first, second), runs):
        pipeline = make_rf_pipeline(FittedFlowMatchEulerDiscreteScheduler(fitted_sigmas=[grid]))
        pipeline.unet, pipeline.encoder = pipe.unet, pipe.encoder
        timesteps = count_unet_calls(pipeline)
        images = pipeline(batch_size=6, num_inference_steps=3, latents=latents, code_indices=code_indices,
                          output_type="pt").images
        assert torch.equal(samples, images * 2 - 1)
        assert [float(t) for t in timesteps] == pytest.approx([1000 * t for t in grid[:-1]])


def test_flow_scheduler_uses_fitted_grids_only_at_their_nfe():
    pipe = make_rf_pipeline(FittedFlowMatchEulerDiscreteScheduler(fitted_sigmas=[[1.0, 0.6, 0.2, 0.0]]))
    pipe.formulation.set_timesteps(3)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.6, 0.2, 0.0])
    pipe.formulation.set_timesteps(4)
    plain = make_rf_pipeline()
    plain.formulation.set_timesteps(4)
    assert torch.equal(pipe.scheduler.sigmas, plain.scheduler.sigmas)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize(
    "fitted_sigmas, message",
    [
        ([[0.9, 0.5, 0.0]], "does not run from 1.0 to 0.0"),
        ([[1.0, 0.5, 0.1]], "does not run from 1.0 to 0.0"),
        ([[1.0, 0.5, 0.5, 0.0]], "not strictly decreasing"),
        ([[1.0]], "needs at least 2 points"),
    ],
)
def test_flow_scheduler_refuses_bad_grids(fitted_sigmas, message):
    with pytest.raises(ValueError, match=message):
        FittedFlowMatchEulerDiscreteScheduler(fitted_sigmas=fitted_sigmas)


def test_flow_pipeline_saves_and_loads_fitted_grids_also_with_plain_diffusers(flow_fitted, tmp_path):
    pipe, output = flow_fitted
    with_fit = make_rf_pipeline(output.scheduler)
    with_fit.unet, with_fit.encoder = pipe.unet, pipe.encoder
    images = with_fit(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images
    with_fit.save_pretrained(tmp_path)
    loaded = QACPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is FittedFlowMatchEulerDiscreteScheduler
    assert loaded.scheduler.config.fitted_sigmas == output.scheduler.config.fitted_sigmas
    reloaded = loaded(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images
    assert torch.equal(reloaded, images)
    plain = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    plain.set_progress_bar_config(disable=True)
    assert type(plain.scheduler).__name__ == "FittedFlowMatchEulerDiscreteScheduler"
    assert torch.equal(plain(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images, images)
    other_unet, other_encoder = make_tiny_models(code_dim=6, seed=1)
    with pytest.raises(ValueError, match="fitted to another model: refit them"):
        QACPipeline(unet=other_unet, scheduler=output.scheduler, encoder=other_encoder, formulation="rectified_flow")


def test_flow_solvers_keep_only_their_own_fitted_grids(flow_fitted):
    _, output = flow_fitted
    formulation = make_rf_pipeline(output.scheduler).formulation
    euler, heun = formulation.solver("euler"), formulation.solver("heun")
    assert type(euler) is FittedFlowMatchEulerDiscreteScheduler
    assert euler.config.fitted_sigmas == output.scheduler.config.fitted_sigmas
    # Euler's grids mean nothing to Heun (two calls a step): dropped, without diffusers' "not expected" warning
    assert type(heun) is FittedFlowMatchHeunDiscreteScheduler
    assert heun.config.fitted_sigmas is None and heun.config.fitted_model_fingerprint is None
    heun_grids = FittedFlowMatchHeunDiscreteScheduler(fitted_sigmas=[[1.0, 0.4, 0.0]])
    assert make_rf_pipeline(heun_grids).formulation.solver("heun").config.fitted_sigmas == [[1.0, 0.4, 0.0]]
    assert make_rf_pipeline(heun_grids).formulation.solver("euler").config.fitted_sigmas is None


def test_flow_heun_fit_runs_heun_on_fitted_grids_of_odd_nfe():
    pipe = make_rf_pipeline(FlowMatchHeunDiscreteScheduler())
    output = fit_schedules(pipe, [3, 5], **FLOW_FIT_SETTINGS, generator=seeded(0), validate=False, progress_bar=False)
    scheduler = output.scheduler
    assert type(scheduler) is FittedFlowMatchHeunDiscreteScheduler and scheduler.fitted_num_inference_steps == [3, 5]
    for nfe in (3, 5):
        assert output.fitted_distances[nfe] <= output.formula_distances[nfe]
    three, five = scheduler.config.fitted_sigmas
    assert len(three) == 3 and len(five) == 4  # (N + 1) / 2 steps and the final 0
    # the pipeline runs Heun on the fitted grid: 3 calls at t0, t1 (second stage), t1 (the last, Euler step)
    fitted = make_rf_pipeline(scheduler)
    fitted.unet, fitted.encoder = pipe.unet, pipe.encoder
    timesteps = count_unet_calls(fitted)
    fitted(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt")
    assert [float(t) for t in timesteps] == pytest.approx([1000 * three[0], 1000 * three[1], 1000 * three[1]])
    # the search's samples on a grid are the pipeline's, also when resuming a shared prefix
    distance = ScheduleDistance(pipe, num_samples=6, teacher_steps=6, generator=seeded(3))
    first, second = [1.0, 0.7, 0.3, 0.0], [1.0, 0.7, 0.2, 0.0]
    calls = []
    for grid in (first, second):
        before = distance.num_model_calls
        samples = distance.samples(FittedFlowMatchHeunDiscreteScheduler(fitted_sigmas=[grid]), 5)
        calls.append(distance.num_model_calls - before)
    assert calls == [5, 2]  # the second run reused the calls at t = 1, 0.7 and 0.7
    generator = seeded(3)
    latents = torch.randn((6, 1, 8, 8), generator=generator)
    code_indices = pipe.encoder.sample_indices(6, generator)
    pipeline = make_rf_pipeline(FittedFlowMatchHeunDiscreteScheduler(fitted_sigmas=[second]))
    pipeline.unet, pipeline.encoder = pipe.unet, pipe.encoder
    images = pipeline(batch_size=6, num_inference_steps=5, latents=latents, code_indices=code_indices,
                      output_type="pt").images
    assert torch.equal(samples, images * 2 - 1)
    with pytest.raises(ValueError, match="Heun takes an odd number of model calls"):
        fit_schedules(pipe, [4], **FLOW_FIT_SETTINGS, progress_bar=False)
