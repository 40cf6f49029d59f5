"""Fit the sampling schedule of a trained QAC (or baseline) model to the model, for a set of NFE.

    python pipelines/fit_schedule.py --model PATH --nfe 3 4 5 6 7 8 9 10
    python pipelines/fit_schedule.py --model PATH --search descent     # the full search, 3-4x the calls
    python pipelines/fit_schedule.py --model RECTIFIED_FLOW_PATH --scheduler heun --nfe 3 5 7 9

The search (qac_diffusers/schedulers/schedule_fitting.py) runs the model's own sampler (iPNDM for EDM, Euler for
rectified flow) on candidate schedules and keeps the one whose images are closest, as a distribution, to those of a
converged teacher: a coordinate descent from the closest of a few formula schedules and the fit for one call fewer
stretched to one more point, by small steps, stopped after a few moves (the default, "bounded"), or the full search
(--search descent): the descent from the formula schedules to its end, and a second one from the fit for one call
fewer. The pipeline with the fitted schedules in its scheduler config is saved back into the model folder (or into
--output_dir), where QACPipeline uses them by default at the NFE they were fitted for and the formula schedule
(Karras; RNE's uniform grid for rectified flow) at any other.
"""

import argparse
import time
from pathlib import Path

import torch

from qac_diffusers import QACPipeline
from qac_diffusers.schedulers.schedule_fitting import (
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_FIT_NFE,
    DEFAULT_SEARCH,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_TEACHER_STEPS,
    DEFAULT_VALIDATION_SAMPLES,
    SEARCHES,
    WARM_START_DESCENT_BUDGET,
    check_bounded_budget,
    check_fit_nfe,
    check_sample_counts,
    fit_schedules,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by train_qac.py or a Hub repo id.")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_FIT_NFE))
    parser.add_argument("--search", choices=SEARCHES, default=DEFAULT_SEARCH,
                        help="bounded: the descent by the smallest log step from the closest start (the fit for "
                        f"one NFE fewer, stretched, among them), stopped after {BOUNDED_DESCENT_BUDGET} / NFE moves "
                        f"({WARM_START_DESCENT_BUDGET} after the warm start; the default); "
                        "descent: the full search from the formula starts, 3-4x the model calls.")
    parser.add_argument("--bounded_budget", type=int, default=BOUNDED_DESCENT_BUDGET,
                        help="The bounded search's moves times the NFE (40 / 52 of it after the warm start): more "
                        "moves let the descent go further, for more model calls.")
    parser.add_argument("--num_samples", type=int, default=DEFAULT_SEARCH_SAMPLES,
                        help="Noise draws the search compares candidates on.")
    parser.add_argument(
        "--validation_samples", type=int, default=DEFAULT_VALIDATION_SAMPLES,
        help="Fresh noise draws on which a fitted schedule must beat the formula schedule again to be kept.",
    )
    parser.add_argument("--teacher_steps", type=int, default=DEFAULT_TEACHER_STEPS,
                        help="Model calls of the converged teacher.")
    parser.add_argument(
        "--scheduler", help="Fit this solver of the model's formulation instead of the model's own scheduler, e.g. "
        "heun for a rectified-flow model (odd NFE only); saved as the model's scheduler."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output_dir", help="Save the pipeline with the fitted schedules here; required for a Hub repo id. By "
        "default it is saved back into the model folder."
    )
    args = parser.parse_args(argv)
    try:  # before the model loads, with the library's own checks (train_qac.py runs them too)
        check_fit_nfe(args.nfe, args.teacher_steps)
        check_sample_counts({"--num_samples": args.num_samples, "--validation_samples": args.validation_samples})
        check_bounded_budget(args.bounded_budget, "--bounded_budget")
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.output_dir is None and not Path(args.model).is_dir():
        raise SystemExit(
            f"{args.model!r} is not a local folder: check the path, or for a Hub repo id pass --output_dir to save "
            "the fitted pipeline."
        )
    pipe = QACPipeline.from_pretrained(args.model).to(args.device)
    if args.scheduler is not None:
        pipe.scheduler = pipe.formulation.solver(args.scheduler)
    started = time.perf_counter()
    fit = fit_schedules(
        pipe, args.nfe, num_samples=args.num_samples, teacher_steps=args.teacher_steps,
        generator=torch.Generator().manual_seed(args.seed), search=args.search,
        num_validation_samples=args.validation_samples, bounded_budget=args.bounded_budget,
    )
    seconds = time.perf_counter() - started
    pipe.scheduler = fit.scheduler
    # the whole pipeline: a rectified-flow model's scheduler changes class (FittedFlowMatchEulerDiscreteScheduler),
    # which model_index.json and the shipped code must name
    pipe.save_pretrained(args.output_dir or args.model)
    print(f"Fitted in {seconds:.1f} s: {fit.num_model_calls} UNet calls on {args.num_samples} images in the search, "
          f"{fit.num_validation_model_calls} on {args.validation_samples} in the validation.")
    print("NFE  distance to the teacher, search draws: formula -> fitted; fresh draws: formula -> fitted   schedule")
    fitted = dict(zip(pipe.scheduler.fitted_num_inference_steps, pipe.scheduler.config.fitted_sigmas or []))
    for nfe in sorted(args.nfe):
        schedule = " ".join(f"{sigma:.3g}" for sigma in fitted[nfe]) if nfe in fitted else "formula (not kept)"
        print(f"{nfe:3d}  {fit.formula_distances[nfe]:10.4g} -> {fit.fitted_distances[nfe]:<10.4g} "
              f"{fit.validation_formula_distances[nfe]:10.4g} -> {fit.validation_fitted_distances[nfe]:<10.4g} "
              f"{schedule}")
    print(f"Saved to {args.output_dir or args.model}")


if __name__ == "__main__":
    main()
