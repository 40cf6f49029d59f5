"""Fitted sampling schedules against the Karras schedule on the digits few-step benchmark (README "Fitted schedules").

For every model of benchmarks/few_step_quality.py (QAC and the baseline, 3 seeds; trained if missing), fit its iPNDM
schedule with `fit_schedules` (NFE 3..10) by its two searches, the bounded descent (the default, also train_qac.py's)
and the full descent, then measure the Frechet distance (FD) of 2000 samples to the held-out split, in the digits-
classifier features, for: iPNDM on the fitted schedules, and today's three solvers on the Karras schedule (fixed-
weight iPNDM, variable-step iPNDM, DPM++2M). Also measured: the FD's own sampling noise (the fitted sampler resampled
with other seeds), whether the fitted FD rises from one NFE to the next by more than that noise, the baseline with
the Karras schedule at 5x the NFE (the moonshot), and the seconds each fit took next to the model's training time.
And the converged sampler: the fit's teacher (variable-step iPNDM at 64 calls) from the same noise, with its own
distance to the same sampler at 4x the calls, which a fitted schedule approaches as it approaches the teacher. And
every sampler's FD again in feature spaces no fit uses (`OTHER_FEATURE_SPACES`), to tell a ranking of samplers from
one classifier's taste. And how much of the FD is contrast: each sampler's pixel std against the teacher's from the
same noise, and the FD of the teacher's samples with their contrast changed by 1-2%.

    python benchmarks/fitted_schedules.py --work_dir benchmarks/work     # reuses few_step_quality.py's models

Writes benchmarks/results/fitted_schedules_digits.{md,json,png}. Resumable: each fit is saved beside its model
(fitted_scheduler/, bounded_scheduler/) and each measurement in the model's benchmark_measurements.json (the FDs under
the keys few_step_quality.py uses; a fitted sampler's keys also name a digest of its schedule: delete a fit's folder
to refit and measure it anew).
"""

import argparse
import functools
import hashlib
import itertools
import json
import time
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import few_step_quality as few_step  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qac_diffusers import QACPipeline  # noqa: E402
from qac_diffusers.metrics import extract_features, frechet_distance, train_feature_classifier  # noqa: E402
from qac_diffusers.schedulers import solver_from_config  # noqa: E402
from qac_diffusers.schedulers.schedule_fitting import (  # noqa: E402
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_FIT_NFE,
    DEFAULT_LOG_STEPS,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_TEACHER_STEPS,
    DEFAULT_VALIDATION_SAMPLES,
    WARM_START_DESCENT_BUDGET,
    ScheduleDistance,
    fit_schedules,
    fitted_scheduler_class,
    pixel_features,
)


KARRAS_SOLVERS = ["ipndm", "ipndm_variable", "dpmsolver2"]
FITTED = "ipndm_fitted"  # fit_schedules(search="descent"), the full search
BOUNDED = "ipndm_bounded"  # fit_schedules(search="bounded"), its default
FIT_FOLDERS = {FITTED: "fitted_scheduler", BOUNDED: "bounded_scheduler"}
# Each fit's search and validation draws: the descent's fits were made (and cached) when the validation's default was
# 256 draws, before stop 23; the bounded search runs with the library's defaults.
FIT_SETTINGS = {FITTED: {"search": "descent", "num_validation_samples": 256},
                BOUNDED: {"search": "bounded", "num_validation_samples": DEFAULT_VALIDATION_SAMPLES}}
TEACHER = "teacher"  # the fit's teacher, at DEFAULT_TEACHER_STEPS calls
TEACHER_CHECK_DRAWS = 256  # noise draws of the teacher's convergence check
# Feature spaces besides the benchmark's classifier, for the same samples: is a ranking of samplers the classifier's
# own? Classifiers trained as the benchmark's (`train_feature_classifier`) with other seeds and a smaller network, and
# the pixels themselves (the fits' criterion is pixel-based: 8x8 digits are not pooled). None is used by the fits.
OTHER_FEATURE_SPACES = {
    "classifier, seed 1": {"seed": 1},
    "classifier, seed 2": {"seed": 2},
    "small classifier (16, 32 channels; 32-d), seed 5": {"seed": 5, "block_out_channels": (16, 32), "feature_dim": 32},
    "pixels": None,
}
CLASSIFIER = "classifier (the benchmark's)"
# The teacher's samples with their intensities scaled about mid-gray by these factors: how much FD a change of
# contrast alone makes, next to each sampler's contrast against the teacher (stop 26, README "Fitted schedules").
CONTRAST_SCALES = (0.98, 0.99, 1.01, 1.02, 1.03, 1.05)


def parse_args() -> argparse.Namespace:
    parser = measurement_parser(__doc__)
    parser.add_argument("--moonshot_factor", type=int, default=5, help="Baseline on Karras at this times the NFE.")
    parser.add_argument("--moonshot_nfe", type=int, nargs="+", default=[3, 4, 5, 6, 10])
    return parse_over_training_settings(parser)


def measurement_parser(description: str) -> argparse.ArgumentParser:
    """The options of this benchmark's measurements (benchmarks/bounded_search_budget.py's too)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nfe", type=int, nargs="+", default=list(range(3, 11)))
    parser.add_argument("--resample_seeds", type=int, default=1, help="Extra sampling seeds for the FD's own noise.")
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--work_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--results_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "results"))
    return parser


def parse_over_training_settings(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """
    The command line's options over few_step_quality.py's settings (data, preset, steps, checkpoints) for the digits
    models the benchmark reuses or trains.
    """
    training = vars(few_step.build_parser().parse_args([]))
    return argparse.Namespace(**{**training, **vars(parser.parse_args())})


def fitted_scheduler(model_dir: Path, pipe: QACPipeline, seed: int, name: str = FIT_FOLDERS[FITTED], nfe=None,
                     settings: dict | None = None):
    """
    The pipeline's scheduler fitted to the model (iPNDM; Euler or Heun for rectified flow) at `nfe` (the library's
    default NFE when `None`) with `settings` (`fit_schedules` arguments, among them `num_validation_samples`; by
    default `FIT_SETTINGS[FITTED]`) and otherwise the library's defaults: fitted once and kept in model_dir/`name`.
    """
    settings = settings or FIT_SETTINGS[FITTED]
    folder = model_dir / name
    if not (folder / "scheduler_config.json").is_file():
        started = time.perf_counter()
        fit = fit_schedules(pipe, nfe or DEFAULT_FIT_NFE, generator=torch.Generator().manual_seed(seed), **settings)
        seconds = time.perf_counter() - started
        facts = {"seconds": seconds, "num_model_calls": fit.num_model_calls,
                 "num_validation_model_calls": fit.num_validation_model_calls,
                 "images_denoised": images_denoised(fit, settings["num_validation_samples"]),
                 "formula_distances": fit.formula_distances, "fitted_distances": fit.fitted_distances,
                 "validation_formula_distances": fit.validation_formula_distances,
                 "validation_fitted_distances": fit.validation_fitted_distances}

        def save(partial: Path) -> None:  # the scheduler and its facts together: a kill between them leaves neither
            fit.scheduler.save_pretrained(partial)
            (partial / "fit_facts.json").write_text(json.dumps(facts, indent=1))

        few_step.write_atomically(folder, save)
    return fitted_scheduler_class(pipe.scheduler).from_pretrained(folder)


def images_denoised(fit, validation_samples: int) -> int:
    """The images the fit's UNet calls denoised: the search's at the default draws, the validation's at its own."""
    return fit.num_model_calls * DEFAULT_SEARCH_SAMPLES + fit.num_validation_model_calls * validation_samples


def measure_model(args, model_dir: Path, seed: int, classifier, heldout_features, spaces: dict) -> dict:
    """
    FD[solver][nfe] of one model, its fitted FD resampled with other seeds, its fit facts, each sampler's FD to the
    teacher, its FD to the data in the other feature spaces (`spaces`, see `feature_spaces`) and its contrast against
    the teacher (`teacher_comparisons`), and the teacher's FD with its contrast changed (`contrast_sensitivity`).
    """
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    karras_config = pipe.scheduler.config
    samplers = {solver: (solver_from_config(solver, karras_config), args.nfe) for solver in KARRAS_SOLVERS}
    samplers[TEACHER] = (solver_from_config("ipndm_variable", karras_config), [DEFAULT_TEACHER_STEPS])
    karras = pipe.scheduler
    samplers[FITTED] = (fitted_scheduler(model_dir, pipe, seed), args.nfe)
    results = measure_samplers(args, model_dir, pipe, seed, samplers, FITTED, classifier, heldout_features)
    pipe.scheduler = karras
    bounded_fit = fitted_scheduler(model_dir, pipe, seed, FIT_FOLDERS[BOUNDED], settings=FIT_SETTINGS[BOUNDED])
    bounded = {BOUNDED: (bounded_fit, args.nfe)}
    results["bounded"] = measure_samplers(
        args, model_dir, pipe, seed, bounded, BOUNDED, classifier, heldout_features, FIT_FOLDERS[BOUNDED]
    )
    results["fd"][BOUNDED] = results["bounded"]["fd"][BOUNDED]
    teacher = teacher_samples(args, pipe, samplers[TEACHER][0], seed, classifier)
    results.update(teacher_comparisons(args, model_dir, pipe, seed, {**samplers, **bounded}, classifier, spaces,
                                       teacher))
    everywhere = {CLASSIFIER: (classifier, heldout_features), **spaces}
    results["contrast_sensitivity"] = contrast_sensitivity(args, model_dir, teacher, everywhere)
    pipe.scheduler = karras
    key = f"teacher pixel frechet_distance to {4 * DEFAULT_TEACHER_STEPS} calls {TEACHER_CHECK_DRAWS} draws"
    results["teacher_error"] = few_step.cached(model_dir, key, teacher_error, pipe)
    return results


def teacher_samples(args, pipe: QACPipeline, teacher_scheduler, seed: int, classifier):
    """
    A function returning the teacher's `args.num_samples` images (at `DEFAULT_TEACHER_STEPS` calls, the benchmark's
    noise and codes) and their classifier features, sampled on its first call only: when a measurement is not cached.
    """
    @functools.cache
    def teacher() -> tuple[torch.Tensor, torch.Tensor]:
        images = scheduler_images(pipe, teacher_scheduler, args.num_samples, DEFAULT_TEACHER_STEPS, seed)
        return images, extract_features(classifier, images)

    return teacher


def teacher_comparisons(args, model_dir: Path, pipe: QACPipeline, seed: int, samplers: dict, classifier, spaces: dict,
                        teacher) -> dict:
    """
    For each sampler and NFE, from one set of its samples (the noise and codes of its FD to the data):
    "to_teacher", its FD to the teacher's samples in the classifier features (how far it is from the solution of the
    model's ODE, which the fits approach, without the data's side); "other_spaces", its FD to the held-out split in
    each of `spaces` (`feature_spaces`); "contrast", the std of its pixels over the teacher's. `teacher()`: the
    teacher's samples and their classifier features. Each (sampler, NFE) cached in the model's folder.
    """
    comparisons = {part: {} for part in ("to_teacher", "other_spaces", "contrast")}
    for name, (scheduler, nfes) in samplers.items():
        for nfe in nfes:
            key = f"teacher comparisons {cache_name(name, scheduler, nfe)} nfe {nfe} {args.num_samples} samples"
            images = (lambda: teacher()[0]) if name == TEACHER else functools.partial(
                scheduler_images, pipe, scheduler, args.num_samples, nfe, seed)
            measured = few_step.cached(model_dir, key, compare_to_teacher, images, teacher, classifier, spaces)
            for part in ("other_spaces",) if name == TEACHER else comparisons:  # not the teacher against itself
                comparisons[part].setdefault(name, {})[nfe] = measured[part]
    return comparisons


def compare_to_teacher(sample, teacher, classifier, spaces: dict) -> dict:
    """`teacher_comparisons`' three measurements of the samples `sample()`."""
    images = sample()
    teacher_images, teacher_features = teacher()
    return {"to_teacher": frechet_distance(extract_features(classifier, images), teacher_features),
            "other_spaces": {space: frechet_distance(extract_features(network, images), heldout)
                             for space, (network, heldout) in spaces.items()},
            "contrast": contrast_ratio(images, teacher_images)}


def contrast_sensitivity(args, model_dir: Path, teacher, spaces: dict) -> dict:
    """
    {scale: {"contrast": ..., "fd": {space: FD}}}: the teacher's samples with their intensities scaled by each of
    `CONTRAST_SCALES` about mid-gray and clipped to [-1, 1], their contrast against the teacher's (the pixel std
    ratio, below the scale where pixels clip) and their FD to the held-out split in each of `spaces` (the benchmark's
    classifier among them): how much FD a change of contrast alone makes. Cached in the model's folder.
    """
    def measure() -> dict:
        images = teacher()[0]
        scaled = {scale: (images * scale).clamp(-1, 1) for scale in CONTRAST_SCALES}
        return {scale: {"contrast": contrast_ratio(changed, images),
                        "fd": {space: frechet_distance(extract_features(network, changed), heldout)
                               for space, (network, heldout) in spaces.items()}}
                for scale, changed in scaled.items()}

    key = f"teacher contrast scaled {' '.join(map(str, CONTRAST_SCALES))} {args.num_samples} samples"
    return {float(scale): distances for scale, distances in few_step.cached(model_dir, key, measure).items()}


def contrast_ratio(images: torch.Tensor, reference: torch.Tensor) -> float:
    """The contrast of `images` against `reference`: the std of their pixels over the reference's."""
    return float(images.std() / reference.std())


def cache_name(name: str, scheduler, nfe: int) -> str:
    """
    `name` in the cache keys of the measurements of `scheduler` at `nfe`: followed by a digest of its fitted schedule
    there, so that a refit is measured anew; alone on the formula (a Karras solver, or a fit the validation dropped).
    """
    if nfe not in getattr(scheduler, "fitted_num_inference_steps", []):
        return name
    digest = hashlib.sha256(json.dumps(scheduler.fitted_schedule(nfe)).encode()).hexdigest()
    return f"{name} {digest[:12]}"


def scheduler_images(pipe: QACPipeline, scheduler, num_samples: int, nfe: int, seed: int) -> torch.Tensor:
    """few_step_quality.py's `sample_images` with `scheduler` set on the pipeline."""
    pipe.scheduler = scheduler
    return few_step.sample_images(pipe, num_samples, nfe, seed)


def teacher_error(pipe: QACPipeline) -> float:
    """The pixel FD between the fit's teacher and the same sampler at 4x its calls, from the same noise and codes."""
    distance = ScheduleDistance(pipe, TEACHER_CHECK_DRAWS, DEFAULT_TEACHER_STEPS, torch.Generator().manual_seed(77))
    reference = solver_from_config("ipndm_variable", pipe.scheduler.config)
    samples = distance.samples(reference, 4 * DEFAULT_TEACHER_STEPS, reuse_states=False)
    return frechet_distance(pixel_features(samples), distance.teacher)


def measure_samplers(
    args, model_dir: Path, pipe: QACPipeline, seed: int, samplers: dict, fitted: str, classifier, heldout_features,
    fit_folder: str = FIT_FOLDERS[FITTED],
) -> dict:
    """
    FD[sampler][nfe] of one model for each `samplers[name] = (scheduler, nfes)`, the FD of the fitted one (`fitted`)
    resampled with `args.resample_seeds` other seeds, and the facts of its fit (kept in model_dir/`fit_folder`); each
    FD cached in the model's folder.
    """
    measure = few_step.sample_frechet_distance
    results = {"fd": {}, "resampled": {}}
    for name, (scheduler, nfes) in samplers.items():
        pipe.scheduler = scheduler
        for nfe in nfes:
            key = f"frechet_distance {cache_name(name, scheduler, nfe)} nfe {nfe} {args.num_samples} samples"
            distance = few_step.cached(
                model_dir, key, measure, pipe, args.num_samples, nfe, seed, classifier, heldout_features
            )
            results["fd"].setdefault(name, {})[nfe] = distance
            print(f"seed {seed} {model_dir.name:22s} {name:15s} NFE {nfe:3d}: FD {distance:8.2f}", flush=True)
    scheduler, nfes = samplers[fitted]
    pipe.scheduler = scheduler
    for nfe in nfes:
        for draw in range(1, args.resample_seeds + 1):
            key = (f"frechet_distance {cache_name(fitted, scheduler, nfe)} nfe {nfe} {args.num_samples} samples "
                   f"draw {draw}")
            distance = few_step.cached(
                model_dir, key, measure, pipe, args.num_samples, nfe, 100 * draw + seed, classifier, heldout_features
            )
            results["resampled"].setdefault(nfe, []).append(distance)
    results["fit"] = json.loads((model_dir / fit_folder / "fit_facts.json").read_text())
    results["training_seconds"] = float((model_dir / "benchmark_training_seconds.txt").read_text())
    results["fitted_sigmas"] = scheduler.config.fitted_sigmas
    results["fitted_nfe"] = scheduler.fitted_num_inference_steps  # where the validation kept the fit
    return results


def moonshot(args, model_dir: Path, seed: int, classifier, heldout_features) -> dict:
    """The baseline's FD with iPNDM on the Karras schedule at `moonshot_factor` times each NFE."""
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    distances = {}
    for nfe in args.moonshot_nfe:
        many = args.moonshot_factor * nfe
        key = f"frechet_distance ipndm nfe {many} {args.num_samples} samples"
        distances[nfe] = few_step.cached(
            model_dir, key, few_step.sample_frechet_distance, pipe, args.num_samples, many, seed, classifier,
            heldout_features,
        )
    return distances


def sampling_noise(model_results: list[dict], nfes: list[int], fitted: str = FITTED) -> float:
    """The FD's sampling noise of the fitted sampler: the pooled std over sampling seeds, over models and NFE."""
    variances = [
        np.var([result["fd"][fitted][nfe], *result["resampled"][nfe]], ddof=1)
        for result in model_results
        for nfe in nfes
    ]
    return float(np.sqrt(np.mean(variances)))


def rises(fd: dict, nfes: list[int]) -> list[tuple[int, int, float]]:
    """(NFE, next NFE, rise) for each step up in `nfes` where the FD (`fd[nfe]`) rises."""
    return [(low, high, fd[high] - fd[low]) for low, high in zip(nfes, nfes[1:]) if fd[high] > fd[low]]


def markdown(args, results: dict, moon: dict, floor: float, accuracy: float) -> str:
    mean_std = few_step.mean_std
    lines = [
        "# Fitted schedules on digits: iPNDM on schedules fitted to each model vs today's solvers on Karras",
        "",
        "Command: `PYTHONPATH=. python benchmarks/fitted_schedules.py` (see the header of the script for what it "
        "measures).",
        "",
        f"Models: benchmarks/few_step_quality.py's (preset tiny, 2500 steps at batch 128, seeds {args.seeds}). FD of "
        f"{args.num_samples} samples to the held-out split in the digits-classifier features (held-out accuracy "
        f"{accuracy:.3f}), mean ± std over seeds; real training split vs held-out: {floor:.2f}. Fits: "
        f"`fit_schedules` ({DEFAULT_SEARCH_SAMPLES} noise draws in the search, {DEFAULT_TEACHER_STEPS}-call "
        f"teacher, log steps {'/'.join(map(str, DEFAULT_LOG_STEPS))}); {BOUNDED}: its default search, \"bounded\" "
        f"(the descent by log step {DEFAULT_LOG_STEPS[-1]} from the closest of Karras, Karras after a first step to "
        "80 / 4, 8, 16, 32 and the fit for one NFE fewer stretched to one more point, stopped after "
        f"{BOUNDED_DESCENT_BUDGET} / NFE moves ({WARM_START_DESCENT_BUDGET} after the warm start); validation on "
        f"{FIT_SETTINGS[BOUNDED]['num_validation_samples']} draws); "
        f"{FITTED}: `search=\"descent\"`, the full search (the descent run to its end, and a second one from the "
        "fit for one call fewer with a point inserted; validation on "
        f"{FIT_SETTINGS[FITTED]['num_validation_samples']} draws; the committed results reuse the fits of stop 22, "
        "whose starts included 80 / 2, which was never the closest). "
        f"Seeds on Karras: where the fit's validation kept the formula, so that {FITTED} or {BOUNDED} is iPNDM on "
        "the Karras schedule there.",
        "",
    ]
    solvers = [*KARRAS_SOLVERS, FITTED, BOUNDED]
    for model in args.models:
        runs = results[model]
        bounded_runs = [run["bounded"] for run in runs]
        lines += [f"## {model}", "", "| NFE | " + " | ".join(solvers) + " | best Karras | fitted ≤ best? | bounded "
                  "≤ best? | seeds on Karras (fitted; bounded) |", "|---" * (len(solvers) + 5) + "|"]
        for nfe in args.nfe:
            cells = {solver: [run["fd"][solver][nfe] for run in runs] for solver in solvers}
            best = best_karras(runs, nfe)
            verdicts = ["yes" if np.mean(cells[fit]) <= np.mean(cells[best]) else "**no**"
                        for fit in (FITTED, BOUNDED)]
            row = [mean_std(cells[solver]) for solver in solvers]
            on_karras = [", ".join(str(seed) for seed, run in zip(args.seeds, fit_runs)
                                   if nfe not in run["fitted_nfe"]) for fit_runs in (runs, bounded_runs)]
            on_karras = "; ".join(on_karras) if any(on_karras) else ""
            lines.append(f"| {nfe} | " + " | ".join(row) + f" | {best} | {' | '.join(verdicts)} | {on_karras} |")
        for fit, fit_runs in ((FITTED, runs), (BOUNDED, bounded_runs)):
            lines += ["", *no_hole_lines(args, fit_runs, fit)]
        lines += ["", *converged_lines(args, runs), "", *teacher_table(args, runs, solvers), ""]
    lines += ["## Moonshot: QAC fitted at NFE N vs the baseline (fixed iPNDM, Karras) at "
              f"{args.moonshot_factor}N", "", "| N | QAC fitted | baseline Karras at 5N |", "|---|---|---|"]
    for nfe in args.moonshot_nfe:
        qac = [run["fd"][FITTED][nfe] for run in results["qac"]]
        lines.append(f"| {nfe} | {mean_std(qac)} | {mean_std([m[nfe] for m in moon])} |")
    lines += ["", *feature_space_lines(args, results), *contrast_lines(args, results), *cost_table(args, results)]
    lines += ["", "Fitted schedules of seed 0 (sigma from sigma_max to sigma_min, the first step analytical):", ""]
    for model, (fit, key) in itertools.product(args.models, ((FITTED, None), (BOUNDED, "bounded"))):
        run = results[model][0] if key is None else results[model][0][key]
        for nfe, sigmas in zip(run["fitted_nfe"], run["fitted_sigmas"] or []):
            lines.append(f"- {model} {fit} NFE {nfe}: " + ", ".join(f"{sigma:.3g}" for sigma in sigmas))
    return "\n".join(lines) + "\n"


def teacher_table(args, runs: list[dict], solvers: list[str]) -> list[str]:
    """The markdown lines of each sampler's FD to the converged sampler (`teacher_comparisons`), mean ± std."""
    lines = [f"FD to the converged sampler ({TEACHER}, {DEFAULT_TEACHER_STEPS} calls) in the same classifier "
             f"features, from the same {args.num_samples} noise draws and codes:", "",
             "| NFE | " + " | ".join(solvers) + " | closest |", "|---" * (len(solvers) + 2) + "|"]
    for nfe in args.nfe:
        cells = {solver: [run["to_teacher"][solver][nfe] for run in runs] for solver in solvers}
        closest = min(solvers, key=lambda solver: np.mean(cells[solver]))
        lines.append(f"| {nfe} | " + " | ".join(few_step.mean_std(cells[solver], 3) for solver in solvers)
                     + f" | {closest} |")
    return lines


def no_hole_lines(args, runs: list[dict], fitted: str) -> list[str]:
    """The fitted sampler's FD noise, and on each seed where its FD rises with NFE, and by how much."""
    noise = sampling_noise(runs, args.nfe, fitted)
    lines = [f"Sampling noise of the {fitted} FD (pooled std over {args.resample_seeds + 1} sampling seeds): "
             f"{noise:.2f}."]
    for seed, run in zip(args.seeds, runs):
        found = rises(run["fd"][fitted], args.nfe)
        text = ", ".join(f"NFE {low}->{high}: +{rise:.2f}" for low, high, rise in found) or "none"
        beyond = [sum(rise > factor * noise for _, _, rise in found) for factor in (1, 2)]
        lines.append(f"- seed {seed}: {fitted} FD rises with NFE: {text}; beyond the noise: {beyond[0]}, beyond 2x "
                     f"the noise: {beyond[1]}.")
    return lines


def converged_lines(args, runs: list[dict]) -> list[str]:
    """The converged sampler's FD, and the NFE where the best Karras solver and the fitted one are below it."""
    teacher = [run["fd"][TEACHER][DEFAULT_TEACHER_STEPS] for run in runs]

    def below(solvers: list[str]) -> str:
        nfes = [nfe for nfe in args.nfe
                if min(np.mean([run["fd"][solver][nfe] for run in runs]) for solver in solvers) < np.mean(teacher)]
        return ", ".join(map(str, nfes)) or "none"

    return [f"Converged sampler (the fit's teacher: variable-step iPNDM on Karras at {DEFAULT_TEACHER_STEPS} calls, "
            f"same noise and codes; its pixel FD to the same sampler at {4 * DEFAULT_TEACHER_STEPS} calls, on "
            f"{TEACHER_CHECK_DRAWS} draws: at most {max(run['teacher_error'] for run in runs):.1g}): FD "
            f"{few_step.mean_std(teacher)}. Below it in the mean: the best Karras solver at NFE "
            f"{below(KARRAS_SOLVERS)}; the fitted one at NFE {below([FITTED])}; the bounded one at NFE "
            f"{below([BOUNDED])}."]


def digits_classifier(train_split, heldout_split) -> tuple:
    """
    The digits classifier trained on the training split (seed 0), the held-out split's features, the FD of the
    training split to them (the floor of the FD) and the classifier's held-out accuracy.
    """
    train_images, train_labels = few_step.to_tensor(train_split, 8)
    heldout_images, heldout_labels = few_step.to_tensor(heldout_split, 8)
    classifier = train_feature_classifier(train_images, train_labels, seed=0)
    heldout_features = extract_features(classifier, heldout_images)
    floor = frechet_distance(extract_features(classifier, train_images), heldout_features)
    return classifier, heldout_features, floor, classifier.accuracy(heldout_images, heldout_labels)


def feature_spaces(train_split, heldout_split) -> dict:
    """{space: (feature network, held-out features)} for `OTHER_FEATURE_SPACES`; the pixels flattened."""
    train_images, train_labels = few_step.to_tensor(train_split, 8)
    heldout_images, _ = few_step.to_tensor(heldout_split, 8)
    spaces = {}
    for space, settings in OTHER_FEATURE_SPACES.items():
        network = torch.nn.Flatten() if settings is None else train_feature_classifier(
            train_images, train_labels, **settings)
        spaces[space] = (network, extract_features(network, heldout_images))
    return spaces


def feature_space_lines(args, results: dict) -> list[str]:
    """
    The markdown lines of the other feature spaces: for each model, space and NFE, the mean FD of the fitted samplers
    against the best Karras solver's, and the NFE where the teacher (the ODE's solution) is above the best Karras.
    """
    lines = ["## The same samples in other feature spaces", "",
             "FD to the held-out split of the samples above (same noise and codes) in feature spaces no fit uses: "
             "classifiers trained as the benchmark's with other seeds and a smaller network, and the 64 pixels. "
             f"Each cell: {FITTED}, {BOUNDED} / the best Karras solver's mean FD over seeds (in brackets: the "
             "fitted samplers at most the best Karras, of 2). Last column: the NFE where the teacher, the ODE's own "
             "solution that both fits approach, has a higher mean FD than the best Karras solver: no sampler that "
             "follows the ODE beats the Karras solvers there except by chance.", ""]
    for model in args.models:
        runs = results[model]
        lines += [f"### {model}", "", "| feature space | teacher | " + " | ".join(f"NFE {nfe}" for nfe in args.nfe)
                  + " | teacher above best Karras at NFE |", "|---" * (len(args.nfe) + 3) + "|"]
        def mean(solver: str, nfe: int, space: str) -> float:
            return np.mean([run["other_spaces"][solver][nfe][space] for run in runs])

        for space in OTHER_FEATURE_SPACES:
            teacher = mean(TEACHER, DEFAULT_TEACHER_STEPS, space)
            cells, above = [], []
            for nfe in args.nfe:
                best = min(mean(solver, nfe, space) for solver in KARRAS_SOLVERS)
                fits = [mean(fit, nfe, space) for fit in (FITTED, BOUNDED)]
                wins = sum(fit <= best for fit in fits)
                cells.append(f"{fits[0]:.3g}, {fits[1]:.3g} / {best:.3g} ({wins})")
                above += [str(nfe)] if teacher > best else []
            lines.append(f"| {space} | {teacher:.3g} | " + " | ".join(cells) + f" | {', '.join(above) or 'none'} |")
        lines.append("")
    return lines


def contrast_lines(args, results: dict) -> list[str]:
    """
    The markdown lines of the contrast measurements: the teacher's FD with its contrast changed
    (`contrast_sensitivity`) in each feature space, and each sampler's contrast against the teacher at each NFE with
    the part of its FD excess over the teacher that this contrast explains (`contrast_excess`).
    """
    solvers = [*KARRAS_SOLVERS, FITTED, BOUNDED]
    lines = ["## How much of the FD is contrast", "",
             "The teacher's samples (above) with their intensities scaled about mid-gray and clipped to [-1, 1] (so "
             "x 0.98 also lifts the black background from -1 to -0.98), their FD to the held-out split in each "
             "feature space, mean over seeds (in the header: their pixel std over the teacher's, minus 1, which "
             "clipping keeps below the scale). Then each sampler's contrast against the teacher from the same noise "
             "and codes (the std of its pixels over the teacher's, minus 1, in %; mean ± std over seeds), and in "
             "brackets its FD excess over the teacher's in the benchmark's classifier that this contrast alone "
             "explains (the teacher's curve above at that contrast, per seed, linearly interpolated; - outside its "
             "range) / its actual excess, means over seeds. Figure: fitted_schedules_digits_contrast.png.", ""]
    for model in args.models:
        runs = results[model]
        curves = {space: [teacher_curve(run, space) for run in runs] for space in [CLASSIFIER, *OTHER_FEATURE_SPACES]}
        columns = list(zip(*curves[CLASSIFIER]))  # per scale, the (scale, contrast, FD) of each seed
        headers = ["teacher" if points[0][0] == 1 else
                   f"x {points[0][0]} ({100 * (np.mean([point[1] for point in points]) - 1):+.1f}%)"
                   for points in columns]
        lines += [f"### {model}", "", "| feature space | " + " | ".join(headers) + " |",
                  "|---" * (len(headers) + 1) + "|"]
        for space, space_curves in curves.items():
            cells = [np.mean([point[2] for point in points]) for points in zip(*space_curves)]
            lines.append(f"| {space} | " + " | ".join(f"{cell:.3g}" for cell in cells) + " |")
        lines += ["", "| NFE | " + " | ".join(solvers) + " | best Karras by FD |", "|---" * (len(solvers) + 2) + "|"]
        for nfe in args.nfe:
            cells = []
            for solver in solvers:
                contrast = [100 * (run["contrast"][solver][nfe] - 1) for run in runs]
                explained = np.mean([contrast_excess(run, run["contrast"][solver][nfe]) for run in runs])
                actual = np.mean([run["fd"][solver][nfe] - teacher_distance(run, CLASSIFIER) for run in runs])
                explained = "-" if np.isnan(explained) else f"{explained:.1f}"
                cells.append(f"{np.mean(contrast):+.1f} ± {np.std(contrast):.1f} ({explained} / {actual:.1f})")
            lines.append(f"| {nfe} | " + " | ".join(cells) + f" | {best_karras(runs, nfe)} |")
        lines.append("")
    return lines


def teacher_curve(run: dict, space: str) -> list[tuple[float, float, float]]:
    """
    (scale, contrast, FD) of the teacher's samples with their contrast changed (`contrast_sensitivity`) and of the
    teacher itself (1, 1, its FD), by scale, in `space` (the benchmark's classifier or one of the other spaces).
    """
    changed = [(scale, measured["contrast"], measured["fd"][space])
               for scale, measured in run["contrast_sensitivity"].items()]
    return sorted([*changed, (1.0, 1.0, teacher_distance(run, space))])


def contrast_excess(run: dict, contrast: float) -> float:
    """The FD excess over the teacher in the benchmark's classifier that `contrast` alone gives, on the teacher's
    curve (`teacher_curve`, linearly interpolated); NaN outside the curve's range."""
    _, contrasts, distances = zip(*teacher_curve(run, CLASSIFIER))
    if not min(contrasts) <= contrast <= max(contrasts):
        return float("nan")
    return float(np.interp(contrast, contrasts, distances)) - teacher_distance(run, CLASSIFIER)


def teacher_distance(run: dict, space: str) -> float:
    """The teacher's FD to the held-out split in `space` (the benchmark's classifier or one of the other spaces)."""
    if space == CLASSIFIER:
        return run["fd"][TEACHER][DEFAULT_TEACHER_STEPS]
    return run["other_spaces"][TEACHER][DEFAULT_TEACHER_STEPS][space]


def best_karras(runs: list[dict], nfe: int) -> str:
    """The Karras solver with the lowest mean FD over `runs` (seeds) at `nfe`."""
    return min(KARRAS_SOLVERS, key=lambda solver: np.mean([run["fd"][solver][nfe] for run in runs]))


def cost_table(args, results: dict) -> list[str]:
    """The markdown lines of the fits' cost: seconds, UNet calls and images against each model's training."""
    lines = ["## Cost of fitting (2-core CPU, shared machine)", "",
             f"| model | fit seconds | UNet calls: search (batch {DEFAULT_SEARCH_SAMPLES}) + validation (batch "
             f"{FIT_SETTINGS[FITTED]['num_validation_samples']}; bounded: "
             f"{FIT_SETTINGS[BOUNDED]['num_validation_samples']}) | images denoised / training images | training "
             "seconds | ratio |",
             "|---|---|---|---|---|---|"]
    training_images = args.max_train_steps * args.train_batch_size
    for model in args.models:
        for seed, run in zip(args.seeds, results[model]):
            for search, facts in (("", run["fit"]), (", bounded", run["bounded"]["fit"])):
                ratio = facts["seconds"] / run["training_seconds"]
                lines.append(f"| {model}-seed{seed}{search} | {facts['seconds']:.0f} | {facts['num_model_calls']} + "
                             f"{facts['num_validation_model_calls']} | "
                             f"{facts['images_denoised'] / training_images:.3f} | {run['training_seconds']:.0f} | "
                             f"{ratio:.3f} |")
    return lines


def plot(args, results: dict, moon: dict, floor: float, path: Path) -> None:
    figure, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4.2), sharey=True)
    for axis, model in zip(np.atleast_1d(axes), args.models):
        for solver in [*KARRAS_SOLVERS, FITTED, BOUNDED]:
            values = np.array([[run["fd"][solver][nfe] for nfe in args.nfe] for run in results[model]])
            style = {FITTED: {"linewidth": 2.5, "color": "black"}, BOUNDED: {"linewidth": 2, "color": "gray"}}
            style = style.get(solver, {})
            axis.errorbar(args.nfe, values.mean(0), yerr=values.std(0), label=solver, capsize=3, **style)
        if model == "baseline":
            values = np.array([[m[nfe] for nfe in args.moonshot_nfe] for m in moon])
            axis.plot(args.moonshot_nfe, values.mean(0), ":", label=f"ipndm at {args.moonshot_factor}x NFE")
        axis.axhline(floor, color="gray", linestyle="--", label="real vs held-out")
        axis.set(title=model, xlabel="NFE (UNet calls)", yscale="log")
        axis.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("FD (digits classifier), lower is better")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_contrast(args, results: dict, path: Path) -> None:
    """
    Per model: the FD to the data against the contrast, both relative to the teacher, of every sampler at NFE 6-10
    (where QAC's misses are) on each seed, and of the teacher's samples with their contrast changed (the line).
    """
    figure, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4.2), sharey=True)
    for axis, model in zip(np.atleast_1d(axes), args.models):
        runs = results[model]
        line = np.mean([[(contrast - 1, distance - teacher_distance(run, CLASSIFIER))
                         for _, contrast, distance in teacher_curve(run, CLASSIFIER)] for run in runs], axis=0)
        axis.plot(100 * line[:, 0], line[:, 1], "k-o", label="teacher, contrast changed")
        for solver in [*KARRAS_SOLVERS, FITTED, BOUNDED]:
            points = np.array([(run["contrast"][solver][nfe] - 1, run["fd"][solver][nfe] - teacher_distance(
                run, CLASSIFIER)) for run in runs for nfe in args.nfe if nfe >= 6])
            axis.scatter(100 * points[:, 0], points[:, 1], s=14, label=solver)
        axis.axhline(0, color="gray", linewidth=0.5)
        axis.set(title=f"{model}, NFE 6-10, {len(runs)} seeds (holes beyond the axes left out)", xlim=(-4, 4),
                 ylim=(-4, 8), xlabel="contrast against the teacher (pixel std ratio - 1, %)")
        axis.legend(fontsize=8, loc="lower left")
    np.atleast_1d(axes)[0].set_ylabel("FD to the data minus the teacher's (digits classifier)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    train_split, heldout_split, data_folder = few_step.split_dataset(args, work_dir)
    few_step.train_models(args, data_folder, work_dir)
    classifier, heldout_features, floor, accuracy = digits_classifier(train_split, heldout_split)
    spaces = feature_spaces(train_split, heldout_split)

    results, moon = {}, []
    for seed in args.seeds:
        for model in args.models:
            model_dir = work_dir / f"{model}-seed{seed}"
            results.setdefault(model, []).append(measure_model(args, model_dir, seed, classifier, heldout_features,
                                                                     spaces))
        moon.append(moonshot(args, work_dir / f"baseline-seed{seed}", seed, classifier, heldout_features))

    stem = results_dir / "fitted_schedules_digits"
    report = markdown(args, results, moon, floor, accuracy) + f"\n![FD against NFE]({stem.name}.png)\n"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "results": results, "moonshot_baseline": moon, "real_vs_heldout": floor}, indent=1))
    plot(args, results, moon, floor, stem.with_suffix(".png"))
    plot_contrast(args, results, stem.with_name(f"{stem.name}_contrast.png"))
    print(report)


if __name__ == "__main__":
    main()
