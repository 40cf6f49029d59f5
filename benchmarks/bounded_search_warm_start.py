"""The bounded search as it was at stops 23 and 24 and as it is, at about the same model calls, scored out of sample.

On the six digits models of benchmarks/few_step_quality.py (QAC and the baseline, seeds 0-2), fit NFE 3-10 without
the validation, on the same 64 search draws (seed 0), by:

- "stop 23": the descent from the closest of Karras and Karras after a first step to 80 / 4, 8, 16, 32, by log steps
  0.5 then 0.2 (`DEFAULT_LOG_STEPS`), stopped after 52 / NFE moves (`STOPS_23_TO_25_BUDGET`);
- "stop 24": the same with the warm start, the fit for one NFE fewer stretched to one more point among the starts,
  stopped after 40 / NFE moves where it has one (not at the first NFE);
- "stop 25": `fit_schedules`' default search since stop 25, stop 24's by the smallest log step (0.2) only, at the
  same budget of moves;

and score every fitted schedule and Karras on 1,024 fresh draws (seed 4242): the fit's criterion (pixel Frechet
distance to the teacher's samples from the same noise and codes), out of sample.

    python benchmarks/bounded_search_warm_start.py --work_dir benchmarks/work

Writes benchmarks/results/bounded_search_warm_start.{md,json}; each model's searches are kept as they finish, and a
rerun skips them.
"""

import argparse
import json
from pathlib import Path

import few_step_quality as few_step
import numpy as np
import torch

from qac_diffusers import QACPipeline
from qac_diffusers.schedulers.schedule_fitting import (
    DEFAULT_LOG_STEPS,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_TEACHER_STEPS,
    ScheduleDistance,
    _fit_one,
    _stretched,
    bounded_descent_trials,
    fit_schedules,
    warm_start_budget,
)


NFES = list(range(3, 11))
SEARCH_SEED, SCORE_SEED, SCORE_SAMPLES = 0, 4242, 1024
SEARCHES = ("stop 23", "stop 24", "stop 25", "Karras")
# The bounded search's budget of moves at stops 23-25 (`fit_schedules(bounded_budget=...)`), kept here should the
# library's default change.
STOPS_23_TO_25_BUDGET = 52


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+",
                        default=[f"{model}-seed{seed}" for model in ("qac", "baseline") for seed in range(3)])
    parser.add_argument("--work_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--results_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "results"))
    return parser.parse_args()


def earlier_fit(pipe: QACPipeline, warm_start: bool) -> tuple[list[list[float]], int]:
    """
    The bounded search of stop 23 (no `warm_start`) or stop 24, both by `DEFAULT_LOG_STEPS`: the schedules for `NFES`
    and the model calls of the search, its teacher included.
    """
    distance = ScheduleDistance(pipe, DEFAULT_SEARCH_SAMPLES, DEFAULT_TEACHER_STEPS,
                                torch.Generator().manual_seed(SEARCH_SEED))
    fitted, below = [], None
    for nfe in NFES:
        starts = distance.search_starts(nfe)
        distance.search_distance(starts[0])  # the formula first, as fit_schedules scores it
        stretched = _stretched(below) if warm_start and below is not None else None
        starts = starts if stretched is None else [*starts, stretched]
        trials = bounded_descent_trials(nfe, stretched is not None, STOPS_23_TO_25_BUDGET)
        below, _ = _fit_one(distance.search_distance, starts, None, DEFAULT_LOG_STEPS, trials)
        fitted.append(distance.from_search(below))
    return fitted, distance.num_model_calls


def fit(pipe: QACPipeline, search: str, score: ScheduleDistance) -> tuple[list[list[float]], int]:
    """The schedules of `search` (one of `SEARCHES`) for `NFES`, and the model calls of its search."""
    if search == "stop 25":
        output = fit_schedules(pipe, NFES, generator=torch.Generator().manual_seed(SEARCH_SEED), validate=False,
                               progress_bar=False, bounded_budget=STOPS_23_TO_25_BUDGET)
        return output.scheduler.config.fitted_sigmas, output.num_model_calls
    if search == "Karras":
        return [score.formula_sigmas(nfe) for nfe in NFES], 0
    return earlier_fit(pipe, warm_start=search == "stop 24")


def measure(model_dir: Path, done: dict, save) -> dict:
    """Each search of `SEARCHES` not in `done` for the model in `model_dir`, saved (`save(results)`) as it ends."""
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    score = ScheduleDistance(pipe, SCORE_SAMPLES, DEFAULT_TEACHER_STEPS, torch.Generator().manual_seed(SCORE_SEED))
    results = dict(done)
    for search in SEARCHES:
        if search not in results:
            schedules, calls = fit(pipe, search, score)
            results[search] = {"model_calls": calls, "sigmas": schedules,
                               "distance": {str(nfe): score(sigmas) for nfe, sigmas in zip(NFES, schedules)}}
            save(results)
    return results


def markdown(results: dict) -> str:
    lines = ["# The bounded search at stops 23, 24 and 25 (digits models, NFE 3-10, no validation)", "",
             "Command: `python benchmarks/bounded_search_warm_start.py --work_dir benchmarks/work` (see its header). "
             f"Pixel FD to the teacher on {SCORE_SAMPLES} fresh draws (the fit's criterion, out of sample; lower is "
             f"better). Model calls: the search's, its {DEFAULT_TEACHER_STEPS}-call teacher included, on "
             f"{DEFAULT_SEARCH_SAMPLES} images each. \"stop 23\": {STOPS_23_TO_25_BUDGET} / NFE moves by log steps "
             f"{' then '.join(map(str, DEFAULT_LOG_STEPS))}, without the warm start; \"stop 24\": the same with the "
             f"warm start and {warm_start_budget(STOPS_23_TO_25_BUDGET):g} / NFE "
             f"moves after it (none at NFE 3); \"stop 25\": the default since stop 25, stop 24's by log step "
             f"{DEFAULT_LOG_STEPS[-1]} only.", "",
             "| model | search | model calls | " + " | ".join(f"NFE {nfe}" for nfe in NFES) + " |",
             "|---" * (len(NFES) + 3) + "|"]
    for model, fits in results.items():
        for search in SEARCHES:
            fitted = fits[search]
            lines.append(f"| {model} | {search} | {fitted['model_calls'] or ''} | "
                         + " | ".join(f"{fitted['distance'][str(nfe)]:.4f}" for nfe in NFES) + " |")
    for new, old in (("stop 24", "stop 23"), ("stop 25", "stop 24")):
        lines += ["", f"{new} / {old}, geometric mean over the seeds (below 1: closer to the teacher):", "",
                  "| models | " + " | ".join(f"NFE {nfe}" for nfe in NFES) + " | all NFE | model calls |",
                  "|---" * (len(NFES) + 3) + "|"]
        lines += [ratio_row(kind, [fits for model, fits in results.items() if model.startswith(f"{kind}-")], new, old)
                  for kind in ("qac", "baseline") if any(model.startswith(f"{kind}-") for model in results)]
    return "\n".join(lines) + "\n"


def ratio_row(kind: str, runs: list[dict], new: str, old: str) -> str:
    """The markdown row of `new` / `old` for the models of `kind`: by NFE, over all NFE, and the change in calls."""
    ratios = np.log([[fits[new]["distance"][str(nfe)] / fits[old]["distance"][str(nfe)] for nfe in NFES]
                     for fits in runs])
    calls = [fits[new]["model_calls"] - fits[old]["model_calls"] for fits in runs]
    return (f"| {kind} ({len(runs)} seeds) | " + " | ".join(f"{np.exp(column.mean()):.2f}" for column in ratios.T)
            + f" | {np.exp(ratios.mean()):.2f} | {', '.join(f'{call:+d}' for call in calls)} |")


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    path = Path(args.results_dir) / "bounded_search_warm_start.json"
    results = json.loads(path.read_text()) if path.is_file() else {}

    def save(model: str, fits: dict) -> None:
        current = json.loads(path.read_text()) if path.is_file() else {}  # other models' jobs may have saved theirs
        current[model] = json.loads(json.dumps(fits))  # NFE keys as in the file
        few_step.write_atomically(path, lambda partial: partial.write_text(json.dumps(current, indent=1)))

    for model in args.models:
        results[model] = measure(Path(args.work_dir) / model, results.get(model, {}),
                                 lambda fits, model=model: save(model, fits))
        print(f"{model} done", flush=True)
    report = markdown({model: results[model] for model in args.models})
    path.with_suffix(".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
