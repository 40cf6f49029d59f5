"""Fitted Euler and Heun time grids against RNE's uniform grid, for rectified-flow models on digits (README).

For the rectified-flow models of benchmarks/rectified_flow_tables.py ("rectified_flow": no condition; "qac": FSQ L =
2, d = 12; 3 seeds; trained if missing), fit the Euler grid with `fit_schedules` (NFE 3..10) by its two searches (the
bounded descent, its default, and the full descent), and the Heun grid at the odd NFE, then measure the Frechet
distance (FD) of 2000 samples to the held-out split, in the digits-classifier features, for: Euler and Heun on the
fitted grids and on RNE's uniform grid (what the pipeline uses without a fit). Also measured: the FD's own sampling
noise (the fitted sampler resampled with another seed), whether the fitted FD rises from one NFE to the next by more
than twice that noise, the seconds each fit took next to the model's training time, and how far the fit's teacher
(Heun, 63 calls) is from the adaptive RK45 reference (RNE's), in the fit's own criterion.

    python benchmarks/fitted_schedules_rectified_flow.py --seeds 0     # one process per seed, then all seeds

Writes benchmarks/results/fitted_schedules_rectified_flow.{md,json,png}. Resumable: each fit is saved beside its
model (fitted_scheduler/, fitted_heun_scheduler/, bounded_scheduler/) and each FD in the model's
benchmark_measurements.json (a fitted sampler's keys name a digest of its schedule: delete a fit's folder to refit and
measure it anew).
"""

import argparse
import json
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import few_step_quality as few_step  # noqa: E402
import fitted_schedules  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import rectified_flow_tables  # noqa: E402
import torch  # noqa: E402

from qac_diffusers import QACPipeline  # noqa: E402
from qac_diffusers.metrics import frechet_distance  # noqa: E402
from qac_diffusers.schedulers.schedule_fitting import (  # noqa: E402
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_LOG_STEPS,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_TEACHER_STEPS,
    DEFAULT_VALIDATION_SAMPLES,
    WARM_START_DESCENT_BUDGET,
    ScheduleDistance,
    pixel_features,
)


MODELS = ["rectified_flow", "qac"]
FITTED, HEUN_FITTED = "euler_fitted", "heun_fitted"
BOUNDED = "euler_bounded"  # fit_schedules' default search, "bounded"
SOLVERS = ["euler", "heun", FITTED, HEUN_FITTED, BOUNDED]
FORMULA_OF = {FITTED: "euler", HEUN_FITTED: "heun", BOUNDED: "euler"}  # each fit against its sampler on RNE's grid
# Where each model's fitted Heun scheduler is kept (the fitted Euler one: fitted_scheduler/).
HEUN_FOLDER = "fitted_heun_scheduler"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nfe", type=int, nargs="+", default=list(range(3, 11)))
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--teacher_check_samples", type=int, default=256)
    parser.add_argument("--work_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "work-rectified-flow"))
    parser.add_argument("--results_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "results"))
    # rectified_flow_tables.py's settings (data, preset, 1200 steps) for the models this benchmark reuses or trains
    training = vars(rectified_flow_tables.parse_args([]))
    return argparse.Namespace(**{**training, **vars(parser.parse_args()), "models": MODELS, "resample_seeds": 1})


def teacher_error(pipe: QACPipeline, num_samples: int, seed: int) -> dict:
    """
    The fit's criterion (pixel FD) between its teacher (Heun, `DEFAULT_TEACHER_STEPS` calls) and the adaptive RK45
    reference from the same noise and codes, beside that of Euler at NFE 10 on RNE's grid to the same teacher.
    """
    distance = ScheduleDistance(pipe, num_samples, DEFAULT_TEACHER_STEPS, torch.Generator().manual_seed(seed))
    latents = distance.latents.to(pipe._execution_device)
    reference, reference_calls = pipe.formulation.reference_solve(pipe.unet, latents, distance.code)
    reference_images = pipe.image_processor.postprocess(reference, output_type="pt") * 2 - 1
    return {"teacher_vs_rk45": frechet_distance(pixel_features(reference_images), distance.teacher),
            "euler10_vs_teacher": distance(distance.formula_sigmas(10)), "rk45_calls": reference_calls}


def measure_model(args, model_dir: Path, seed: int, classifier, heldout_features) -> dict:
    """FD[solver][nfe] of one model, its fitted FD resampled with another seed, its fit facts, its teacher's error."""
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    odd = [nfe for nfe in args.nfe if nfe % 2]  # Heun takes an odd NFE
    # both on RNE's grid: the saved scheduler holds no fitted grids
    samplers = {"euler": (pipe.formulation.solver("euler"), args.nfe), "heun": (pipe.formulation.solver("heun"), odd)}
    samplers[FITTED] = (fitted_schedules.fitted_scheduler(model_dir, pipe, seed), args.nfe)
    pipe.scheduler = samplers["heun"][0]
    samplers[HEUN_FITTED] = (fitted_schedules.fitted_scheduler(model_dir, pipe, seed, HEUN_FOLDER, odd), odd)
    results = fitted_schedules.measure_samplers(
        args, model_dir, pipe, seed, samplers, FITTED, classifier, heldout_features
    )
    pipe.scheduler = samplers["euler"][0]
    folder = fitted_schedules.FIT_FOLDERS[fitted_schedules.BOUNDED]
    bounded = fitted_schedules.fitted_scheduler(
        model_dir, pipe, seed, folder, settings=fitted_schedules.FIT_SETTINGS[fitted_schedules.BOUNDED]
    )
    bounded = {BOUNDED: (bounded, args.nfe)}
    results["bounded"] = fitted_schedules.measure_samplers(
        args, model_dir, pipe, seed, bounded, BOUNDED, classifier, heldout_features, folder
    )
    results["fd"][BOUNDED] = results["bounded"]["fd"][BOUNDED]
    results["heun_fit"] = json.loads((model_dir / HEUN_FOLDER / "fit_facts.json").read_text())
    results["heun_fitted_nfe"] = samplers[HEUN_FITTED][0].fitted_num_inference_steps
    results["heun_fitted_sigmas"] = samplers[HEUN_FITTED][0].config.fitted_sigmas
    key = f"teacher error {args.teacher_check_samples} samples"
    pipe.scheduler = samplers["euler"][0]
    results["teacher"] = few_step.cached(model_dir, key, teacher_error, pipe, args.teacher_check_samples, seed)
    return results


def markdown(args, results: dict, floor: float, accuracy: float) -> str:
    mean_std = few_step.mean_std
    lines = [
        "# Fitted schedules for rectified flow on digits: Euler and Heun on grids fitted to each model vs RNE's "
        "uniform grid",
        "",
        "Command: `PYTHONPATH=. python benchmarks/fitted_schedules_rectified_flow.py` (see the header of the script "
        "for what it measures).",
        "",
        f"Models: benchmarks/rectified_flow_tables.py's (preset {args.preset}, {args.max_train_steps} steps at batch "
        f"{args.train_batch_size}, seeds {args.seeds}). FD of {args.num_samples} samples to the held-out split in the "
        f"digits-classifier features (held-out accuracy {accuracy:.3f}), mean ± std over seeds; real training split "
        f"vs held-out: {floor:.2f}. Fits: `fit_schedules` ({DEFAULT_SEARCH_SAMPLES} noise draws in the search, a "
        f"Heun teacher of {DEFAULT_TEACHER_STEPS - 1} calls); {FITTED} and {HEUN_FITTED} (Heun fitted at the odd "
        "NFE): `search=\"descent\"`, the full search (fitted before stop 23, validation on "
        f"{fitted_schedules.FIT_SETTINGS[fitted_schedules.FITTED]['num_validation_samples']} draws); {BOUNDED}: the "
        "default search, \"bounded\" (the descent from the closest of RNE's grid, its shifts and the fit for one NFE "
        "fewer stretched to one more point, by log step "
        f"{DEFAULT_LOG_STEPS[-1]} (since stop 25), stopped after "
        f"{BOUNDED_DESCENT_BUDGET} / NFE moves ({WARM_START_DESCENT_BUDGET} after the warm start); validation on "
        f"{DEFAULT_VALIDATION_SAMPLES} draws). "
        "Seeds on RNE's grid: where the fit's validation kept the uniform grid, by fit.",
        "",
    ]
    for model in MODELS:
        runs = results[model]
        kept = {FITTED: [run["fitted_nfe"] for run in runs], HEUN_FITTED: [run["heun_fitted_nfe"] for run in runs],
                BOUNDED: [run["bounded"]["fitted_nfe"] for run in runs]}
        lines += [f"## {model}", "", "| NFE | " + " | ".join(SOLVERS) + " | ≤ RNE's grid? (Euler fitted, Heun fitted, "
                  "Euler bounded) | seeds on RNE's grid (by fit) |", "|---" * (len(SOLVERS) + 3) + "|"]
        for nfe in args.nfe:
            cells = {solver: [run["fd"][solver][nfe] for run in runs if nfe in run["fd"][solver]]
                     for solver in SOLVERS}
            row = [mean_std(cells[solver]) if cells[solver] else "" for solver in SOLVERS]
            fits = [fitted for fitted in FORMULA_OF if cells[fitted]]  # Heun: odd NFE only
            verdicts = [("yes" if np.mean(cells[fitted]) <= np.mean(cells[FORMULA_OF[fitted]]) else "**no**")
                        if fitted in fits else "–" for fitted in FORMULA_OF]
            on_formula = {fitted: ", ".join(str(seed) for seed, nfes in zip(args.seeds, kept[fitted])
                                            if nfe not in nfes) for fitted in fits}
            on_formula_text = "; ".join(f"{fitted}: {seeds}" for fitted, seeds in on_formula.items() if seeds)
            lines.append(f"| {nfe} | " + " | ".join(row) + f" | {', '.join(verdicts)} | {on_formula_text} |")
        for fitted, fitted_runs in ((FITTED, runs), (BOUNDED, [run["bounded"] for run in runs])):
            lines += ["", *fitted_schedules.no_hole_lines(args, fitted_runs, fitted)]
        lines.append("")
    lines += ["## The fit's teacher against RK45 (pixel FD, the fit's criterion, on "
              f"{args.teacher_check_samples} draws)", "",
              "| model | Heun teacher vs RK45 | Euler NFE 10 (RNE's grid) vs teacher | RK45 calls |",
              "|---|---|---|---|"]
    for model in MODELS:
        for seed, run in zip(args.seeds, results[model]):
            check = run["teacher"]
            lines.append(f"| {model}-seed{seed} | {check['teacher_vs_rk45']:.2e} | {check['euler10_vs_teacher']:.2e} "
                         f"| {check['rk45_calls']} |")
    lines += ["", *fitted_schedules.cost_table(args, results)]
    heun_fits = {f"{model}-seed{seed}": run["heun_fit"]
                 for model in MODELS for seed, run in zip(args.seeds, results[model])}
    lines += ["", "Heun's fits (odd NFE): " + ", ".join(
        f"{name} {fit['seconds']:.0f} s ({fit['num_model_calls']} + {fit['num_validation_model_calls']} calls)"
        for name, fit in heun_fits.items()) + "."]
    lines += ["", "Fitted grids of seed 0 (t from 1 to 0):", ""]
    for model in MODELS:
        run = results[model][0]
        for solver, nfes, key in (("Euler", run["fitted_nfe"], "fitted_sigmas"),
                                  ("Heun", run["heun_fitted_nfe"], "heun_fitted_sigmas")):
            for nfe, grid in zip(nfes, run[key] or []):
                lines.append(f"- {model} {solver} NFE {nfe}: " + ", ".join(f"{t:.3g}" for t in grid))
    return "\n".join(lines) + "\n"


def plot(args, results: dict, floor: float, path: Path) -> None:
    figure, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4.2), sharey=True)
    for axis, model in zip(axes, MODELS):
        for solver in SOLVERS:
            nfes = [nfe for nfe in args.nfe if nfe in results[model][0]["fd"][solver]]
            values = np.array([[run["fd"][solver][nfe] for nfe in nfes] for run in results[model]])
            style = {FITTED: {"linewidth": 2.5, "color": "black"}, BOUNDED: {"linewidth": 2, "color": "gray"}}
            axis.errorbar(nfes, values.mean(0), yerr=values.std(0), label=solver, capsize=3, **style.get(solver, {}))
        axis.axhline(floor, color="gray", linestyle="--", label="real vs held-out")
        axis.set(title=f"rectified flow: {model}", xlabel="NFE (UNet calls)", yscale="log")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("FD (digits classifier), lower is better")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)
    work_dir.mkdir(parents=True, exist_ok=True), results_dir.mkdir(parents=True, exist_ok=True)
    train_split, heldout_split, data_folder = few_step.split_dataset(args, work_dir)
    rectified_flow_tables.train_all(args, MODELS, data_folder, work_dir)
    classifier, heldout_features, floor, accuracy = fitted_schedules.digits_classifier(train_split, heldout_split)

    results = {}
    for seed in args.seeds:
        for model in MODELS:
            model_dir = work_dir / f"{model}-seed{seed}"
            results.setdefault(model, []).append(measure_model(args, model_dir, seed, classifier, heldout_features))

    stem = results_dir / "fitted_schedules_rectified_flow"
    report = markdown(args, results, floor, accuracy) + f"\n![FD against NFE]({stem.name}.png)\n"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "results": results, "real_vs_heldout": floor}, indent=1))
    plot(args, results, floor, stem.with_suffix(".png"))
    print(report)


if __name__ == "__main__":
    main()
