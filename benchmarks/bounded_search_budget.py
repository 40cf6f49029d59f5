"""The bounded search's budget of moves (`fit_schedules(bounded_budget=...)`): the default and larger ones, on digits.

On the six digits models of benchmarks/few_step_quality.py (QAC and the baseline, seeds 0-2; trained if missing),
fit NFE 3-10 by the default search ("bounded") with each budget, everything else the library's defaults (the
validation included), and measure each fit as benchmarks/fitted_schedules.py measures its bounded one: the Frechet
distance (FD) of 2000 samples to the held-out split in the digits-classifier features, again with a second sampling
seed (the FD's own noise), where the FD rises from one NFE to the next (on either sampling seed) by more than that
noise, the FD to the converged sampler (the fit's teacher) from the same noise, and the contrast against it (the
std of the pixels over the teacher's); and the fit's UNet calls and images against the training's. Fit seconds of
one run on a shared machine are listed, not compared (the README's "Cost" gives `make demo`'s).

    python benchmarks/bounded_search_budget.py --work_dir benchmarks/work

Writes benchmarks/results/bounded_search_budget.{md,json}. Resumable: each fit is kept beside its model (the default
budget's in bounded_scheduler/, shared with benchmarks/fitted_schedules.py; the others in
bounded_budget_<budget>_scheduler/), and each measurement in the model's benchmark_measurements.json under
fitted_schedules.py's keys, so that a schedule measured by either script is not sampled again.
"""

import argparse
import json
from pathlib import Path

import few_step_quality as few_step
import fitted_schedules as fs
import numpy as np

from qac_diffusers import QACPipeline
from qac_diffusers.schedulers import solver_from_config
from qac_diffusers.schedulers.schedule_fitting import BOUNDED_DESCENT_BUDGET, DEFAULT_TEACHER_STEPS


def parse_args() -> argparse.Namespace:
    parser = fs.measurement_parser(__doc__)
    parser.add_argument("--budgets", type=int, nargs="+",
                        default=[BOUNDED_DESCENT_BUDGET, 3 * BOUNDED_DESCENT_BUDGET // 2, 2 * BOUNDED_DESCENT_BUDGET])
    parser.add_argument("--models", nargs="+", choices=["qac", "baseline"], default=["qac", "baseline"])
    return fs.parse_over_training_settings(parser)


def budget_fit(budget: int) -> tuple[str, dict]:
    """The folder and `fit_schedules` settings of the bounded fit with `budget` (the default's: fitted_schedules')."""
    if budget == BOUNDED_DESCENT_BUDGET:
        return fs.FIT_FOLDERS[fs.BOUNDED], fs.FIT_SETTINGS[fs.BOUNDED]
    return f"bounded_budget_{budget}_scheduler", {**fs.FIT_SETTINGS[fs.BOUNDED], "bounded_budget": budget}


def measure_model(args, model_dir: Path, seed: int, classifier, heldout_features, spaces: dict) -> dict:
    """{budget: the bounded fit's measurements}: `fs.measure_samplers`' and `fs.teacher_comparisons`' results."""
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    karras = pipe.scheduler
    teacher = fs.teacher_samples(args, pipe, solver_from_config("ipndm_variable", karras.config), seed, classifier)
    results = {}
    for budget in args.budgets:
        folder, settings = budget_fit(budget)
        pipe.scheduler = karras
        # one sampler name for every budget: the cache keys name the schedule's digest, so a schedule that two
        # budgets share (or that fitted_schedules.py measured) is sampled once
        samplers = {fs.BOUNDED: (fs.fitted_scheduler(model_dir, pipe, seed, folder, settings=settings), args.nfe)}
        results[budget] = fs.measure_samplers(
            args, model_dir, pipe, seed, samplers, fs.BOUNDED, classifier, heldout_features, folder
        )
        results[budget].update(fs.teacher_comparisons(
            args, model_dir, pipe, seed, samplers, classifier, spaces, teacher
        ))
    return results


def rises_beyond(fd: dict, nfes: list[int], noise: float) -> list[str]:
    """'NFE low->high: +rise' for each step up in NFE where `fd` rises by more than `noise`."""
    return [f"{low}->{high}: +{rise:.2f}" for low, high, rise in fs.rises(fd, nfes) if rise > noise]


def markdown(args, results: dict, accuracy: float) -> str:
    mean_std = few_step.mean_std
    lines = [
        "# The bounded search's budget of moves on the digits models",
        "",
        "Command: `python benchmarks/bounded_search_budget.py --work_dir benchmarks/work` (see the header of the "
        "script for what it measures).",
        "",
        f"Models: benchmarks/few_step_quality.py's (preset tiny, {args.max_train_steps} steps at batch "
        f"{args.train_batch_size}, seeds {args.seeds}). Each fitted by `fit_schedules` with its defaults (the "
        f"bounded search, its validation included) and `bounded_budget` {', '.join(map(str, args.budgets))} (the "
        f"moves times the NFE; the default {BOUNDED_DESCENT_BUDGET}: 17 moves at NFE 3, 5 at NFE 10, after the warm "
        f"start 40 / 52 of them). FD of {args.num_samples} samples to the held-out split in the digits-classifier "
        f"features (held-out accuracy {accuracy:.3f}), mean ± std over seeds. Noise: the pooled std of the FD over "
        f"{args.resample_seeds + 1} sampling seeds, per model and budget. Rises: where the FD of a seed rises from "
        "one NFE to the next by more than the noise, on the benchmark's sampling seed and on the second one.",
        "",
    ]
    for model in args.models:
        runs = results[model]
        header = ["| budget | " + " | ".join(f"NFE {nfe}" for nfe in args.nfe) + " |",
                  "|---" * (len(args.nfe) + 1) + "|"]
        fd_rows, teacher_rows, contrast_rows, rise_lines = [], [], [], []
        for budget in args.budgets:
            fits = [run[budget] for run in runs]
            fd_rows.append(f"| {budget} | " + " | ".join(
                mean_std([fit["fd"][fs.BOUNDED][nfe] for fit in fits]) for nfe in args.nfe) + " |")
            teacher_rows.append(f"| {budget} | " + " | ".join(
                mean_std([fit["to_teacher"][fs.BOUNDED][nfe] for fit in fits], 2) for nfe in args.nfe) + " |")
            contrast_rows.append(f"| {budget} | " + " | ".join(
                f"{np.mean([fit['contrast'][fs.BOUNDED][nfe] for fit in fits]):.3f}" for nfe in args.nfe) + " |")
            noise = fs.sampling_noise(fits, args.nfe, fs.BOUNDED)
            for sampling, pick in (("the benchmark's", lambda fit, nfe: fit["fd"][fs.BOUNDED][nfe]),
                                   ("the second", lambda fit, nfe: fit["resampled"][nfe][0])):
                by_seed = {seed: rises_beyond({nfe: pick(fit, nfe) for nfe in args.nfe}, args.nfe, noise)
                           for seed, fit in zip(args.seeds, fits)}
                found = [f"seed {seed} " + ", ".join(rises) for seed, rises in by_seed.items() if rises]
                rise_lines.append(f"- budget {budget}, {sampling} sampling seed (noise {noise:.2f}): rises beyond "
                                  f"the noise: {'; '.join(found) or 'none'}.")
        lines += [f"## {model}", "", "FD to the data:", "", *header, *fd_rows, "", *rise_lines, "",
                  f"FD to the converged sampler (the fit's teacher, {DEFAULT_TEACHER_STEPS} calls) from the same "
                  "noise and codes:", "", *header, *teacher_rows, "",
                  "Contrast against the converged sampler (mean over seeds):", "", *header, *contrast_rows, ""]
    return "\n".join(lines + cost_lines(args, results)) + "\n"


def cost_lines(args, results: dict) -> list[str]:
    """Each fit's UNet calls, images against the training's, and seconds (one run, a shared machine)."""
    training_images = args.max_train_steps * args.train_batch_size
    lines = ["## Cost of each fit", "", "| model | budget | UNet calls: search + validation | images denoised / "
             "training images | fit seconds | training seconds |", "|---|---|---|---|---|---|"]
    for model in args.models:
        for seed, run in zip(args.seeds, results[model]):
            for budget in args.budgets:
                facts = run[budget]["fit"]
                lines.append(f"| {model}-seed{seed} | {budget} | {facts['num_model_calls']} + "
                             f"{facts['num_validation_model_calls']} | "
                             f"{facts['images_denoised'] / training_images:.3f} | {facts['seconds']:.0f} | "
                             f"{run[budget]['training_seconds']:.0f} |")
    return lines


def main() -> None:
    args = parse_args()
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    train_split, heldout_split, data_folder = few_step.split_dataset(args, work_dir)
    few_step.train_models(args, data_folder, work_dir)
    classifier, heldout_features, _, accuracy = fs.digits_classifier(train_split, heldout_split)
    # the other feature spaces too, so that the cached teacher comparisons stay those fitted_schedules.py reads
    spaces = fs.feature_spaces(train_split, heldout_split)
    results = {model: [measure_model(args, work_dir / f"{model}-seed{seed}", seed, classifier, heldout_features,
                                     spaces) for seed in args.seeds] for model in args.models}
    stem = results_dir / "bounded_search_budget"
    report = markdown(args, results, accuracy)
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
