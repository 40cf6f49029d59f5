"""Does the fit's validation on fresh noise change the fitted digits schedules of benchmarks/fitted_schedules.py?

For every model of that benchmark (QAC and the baseline, 3 seeds) the schedules it fitted (model_dir/fitted_scheduler,
fitted before `fit_schedules` validated) are scored again as `fit_schedules` now does after its search: on the next
256 noise draws of the same generator (`validate_schedules`), against the formula (Karras) schedule. Beside each, the
classifier FD that benchmark measured with the fitted schedule, with iPNDM on Karras, and iPNDM's 50-step reference.

    python benchmarks/fitted_schedules_validation.py --work_dir benchmarks/work    # needs fitted_schedules.py's models

Writes benchmarks/results/fitted_schedules_validation.{md,json}.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from qac_diffusers import IPNDMScheduler, QACPipeline
from qac_diffusers.schedulers.schedule_fitting import ScheduleDistance, validate_schedules


REPO_ROOT = Path(__file__).resolve().parents[1]
# fit_schedules' defaults, which benchmarks/fitted_schedules.py fitted with
NUM_SAMPLES, TEACHER_STEPS = 256, 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser.parse_args()


def validate_model(model_dir: Path, seed: int) -> dict:
    """Validation distances and the cached classifier FDs of one model, by NFE."""
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    fitted = IPNDMScheduler.from_pretrained(model_dir / "fitted_scheduler").config.fitted_sigmas or []
    generator = torch.Generator().manual_seed(seed)  # the fit's seed in fitted_schedules.py
    # the search's draws, as fit_schedules made them (its teacher too: cheap here, and no copy of the draw order)
    search = ScheduleDistance(pipe, NUM_SAMPLES, TEACHER_STEPS, generator)
    kept, formula, fitted_distances = validate_schedules(pipe, fitted, NUM_SAMPLES, TEACHER_STEPS, generator)
    measured = json.loads((model_dir / "benchmark_measurements.json").read_text())
    rows = {}
    for sigmas in fitted:
        nfe = search.num_calls(sigmas)
        rows[nfe] = {
            "kept": sigmas in kept, "validation_formula": formula[nfe], "validation_fitted": fitted_distances[nfe],
            "fd_fitted": measured[f"frechet_distance ipndm_fitted nfe {nfe} 2000 samples"],
            "fd_karras_ipndm": measured[f"frechet_distance ipndm nfe {nfe} 2000 samples"],
            "fd_reference_ipndm_50": measured["frechet_distance ipndm nfe 50 2000 samples"],
        }
    return rows


def main() -> None:
    args = parse_args()
    results = {}
    for model in ("qac", "baseline"):
        for seed in args.seeds:
            results[f"{model}-seed{seed}"] = validate_model(Path(args.work_dir) / f"{model}-seed{seed}", seed)
            print(f"{model}-seed{seed} done", flush=True)
    lines = [
        "# Fitted schedules scored again on fresh noise (the fit's validation)", "",
        f"Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`", "",
        "Distances to the teacher (pixel Frechet distance, 256 fresh draws) of Karras and of the fitted schedule; the "
        "fitted one is kept where it is smaller. FD: classifier FD (2,000 samples) from fitted_schedules.py's "
        "measurements: fitted, iPNDM on Karras, and iPNDM's 50-step reference.", "",
        "| run | NFE | validation Karras | validation fitted | kept | FD fitted | FD Karras iPNDM | FD iPNDM 50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, rows in results.items():
        for nfe, row in rows.items():
            lines.append(
                f"| {run} | {nfe} | {row['validation_formula']:.4f} | {row['validation_fitted']:.4f} | "
                f"{'yes' if row['kept'] else 'no'} | {row['fd_fitted']:.2f} | {row['fd_karras_ipndm']:.2f} | "
                f"{row['fd_reference_ipndm_50']:.2f} |"
            )
    kept = sum(row["kept"] for rows in results.values() for row in rows.values())
    total = sum(len(rows) for rows in results.values())
    lines += ["", f"Kept: {kept} of {total} fitted schedules."]
    stem = Path(args.results_dir) / "fitted_schedules_validation"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
