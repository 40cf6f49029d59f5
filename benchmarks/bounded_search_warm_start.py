"""The bounded search with and without its warm start, at the same model calls, scored out of sample (README).

On the six digits models of benchmarks/few_step_quality.py (QAC and the baseline, seeds 0-2), fit NFE 3-10 without
the validation, on the same 64 search draws (seed 0), by:

- "stop 23": the bounded search as it was at stop 23, the descent from the closest of Karras and Karras after a first
  step to 80 / 4, 8, 16, 32, stopped after `BOUNDED_DESCENT_BUDGET` / NFE moves (52);
- "warm start": `fit_schedules`' default search since stop 24, the same with the fit for one NFE fewer stretched to
  one more point among the starts, stopped after `WARM_START_DESCENT_BUDGET` / NFE moves (40) where it has one (not
  at the first NFE);

and score every fitted schedule and Karras on 1,024 fresh draws (seed 4242): the fit's criterion (pixel Frechet
distance to the teacher's samples from the same noise and codes), out of sample.

    python benchmarks/bounded_search_warm_start.py --work_dir benchmarks/work

Writes benchmarks/results/bounded_search_warm_start.{md,json}; each model's result is kept as it finishes, and a
rerun skips it.
"""

import argparse
import json
from pathlib import Path

import few_step_quality as few_step
import numpy as np
import torch

from qac_diffusers import QACPipeline
from qac_diffusers.schedulers.schedule_fitting import (
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_LOG_STEPS,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_TEACHER_STEPS,
    WARM_START_DESCENT_BUDGET,
    ScheduleDistance,
    _fit_nfe,
    fit_schedules,
)


NFES = list(range(3, 11))
SEARCH_SEED, SCORE_SEED, SCORE_SAMPLES = 0, 4242, 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+",
                        default=[f"{model}-seed{seed}" for model in ("qac", "baseline") for seed in range(3)])
    parser.add_argument("--work_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--results_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "results"))
    return parser.parse_args()


def stop_23_fit(pipe: QACPipeline) -> tuple[list[list[float]], int]:
    """
    Stop 23's bounded search, i.e. today's without the warm start (`_fit_nfe` with no fit below): the schedules for
    `NFES` and the model calls of the search, its teacher included.
    """
    distance = ScheduleDistance(pipe, DEFAULT_SEARCH_SAMPLES, DEFAULT_TEACHER_STEPS,
                                torch.Generator().manual_seed(SEARCH_SEED))
    fitted = []
    for nfe in NFES:
        starts = distance.search_starts(nfe)
        distance.search_distance(starts[0])  # the formula first, as fit_schedules scores it
        sigmas, _ = _fit_nfe(distance.search_distance, starts, None, "bounded", DEFAULT_LOG_STEPS, nfe)
        fitted.append(distance.from_search(sigmas))
    return fitted, distance.num_model_calls


def measure(model_dir: Path) -> dict:
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    score = ScheduleDistance(pipe, SCORE_SAMPLES, DEFAULT_TEACHER_STEPS, torch.Generator().manual_seed(SCORE_SEED))
    warm = fit_schedules(pipe, NFES, generator=torch.Generator().manual_seed(SEARCH_SEED), validate=False,
                         progress_bar=False)
    fits = {"stop 23": stop_23_fit(pipe),
            "warm start": (warm.scheduler.config.fitted_sigmas, warm.num_model_calls),
            "Karras": ([score.formula_sigmas(nfe) for nfe in NFES], 0)}
    return {name: {"model_calls": calls, "distance": {nfe: score(sigmas) for nfe, sigmas in zip(NFES, schedules)},
                   "sigmas": schedules}
            for name, (schedules, calls) in fits.items()}


def markdown(results: dict) -> str:
    lines = ["# The bounded search with and without its warm start (digits models, NFE 3-10, no validation)", "",
             "Command: `python benchmarks/bounded_search_warm_start.py --work_dir benchmarks/work` (see its header). "
             f"Pixel FD to the teacher on {SCORE_SAMPLES} fresh draws (the fit's criterion, out of sample; lower is "
             f"better). Model calls: the search's, its {DEFAULT_TEACHER_STEPS}-call teacher included, on "
             f"{DEFAULT_SEARCH_SAMPLES} images each. \"stop 23\": {BOUNDED_DESCENT_BUDGET} / NFE moves without the "
             f"warm start; \"warm start\": the default since stop 24, {WARM_START_DESCENT_BUDGET} / NFE moves after "
             "the warm start (none at NFE 3).", "",
             "| model | search | model calls | " + " | ".join(f"NFE {nfe}" for nfe in NFES) + " |",
             "|---" * (len(NFES) + 3) + "|"]
    for model, fits in results.items():
        for name, fit in fits.items():
            lines.append(f"| {model} | {name} | {fit['model_calls'] or ''} | "
                         + " | ".join(f"{fit['distance'][str(nfe)]:.4f}" for nfe in NFES) + " |")
    lines += ["", "Warm start / stop 23, geometric mean over the seeds (below 1: closer to the teacher):", "",
              "| models | " + " | ".join(f"NFE {nfe}" for nfe in NFES) + " | all NFE | model calls |",
              "|---" * (len(NFES) + 3) + "|"]
    for kind in ("qac", "baseline"):
        runs = [fits for model, fits in results.items() if model.startswith(f"{kind}-")]
        if not runs:
            continue
        ratios = np.log([[fits["warm start"]["distance"][str(nfe)] / fits["stop 23"]["distance"][str(nfe)]
                          for nfe in NFES] for fits in runs])
        calls = [fits["warm start"]["model_calls"] - fits["stop 23"]["model_calls"] for fits in runs]
        lines.append(f"| {kind} ({len(runs)} seeds) | " + " | ".join(f"{np.exp(column.mean()):.2f}"
                                                                    for column in ratios.T)
                     + f" | {np.exp(ratios.mean()):.2f} | {', '.join(f'{call:+d}' for call in calls)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    path = Path(args.results_dir) / "bounded_search_warm_start.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for model in args.models:
        if model not in results:
            results[model] = json.loads(json.dumps(measure(Path(args.work_dir) / model)))  # NFE keys as in the file
            few_step.write_atomically(path, lambda partial: partial.write_text(json.dumps(results, indent=1)))
            print(f"{model} done", flush=True)
    report = markdown({model: results[model] for model in args.models if model in results})
    path.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
