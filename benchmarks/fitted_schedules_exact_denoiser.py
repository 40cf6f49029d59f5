"""Fitted schedules on exact denoisers (no training noise): iPNDM on fitted vs Karras schedules.

    python benchmarks/fitted_schedules_exact_denoiser.py                 # a few minutes on 1 core
    python benchmarks/fitted_schedules_exact_denoiser.py --bounded_budget 104   # twice the bounded search's moves

The flows of benchmarks/solvers_exact_denoiser.py: the 1,797 digits smoothed with a Gaussian of bandwidth tau, with
their closed-form EDM denoiser, unconditional and class-conditional. For each flow and NFE, the iPNDM schedule (with
the analytical first step, fixed weights: the library's default sampler) is fitted with the library's own search and
criterion (`coordinate_descent` of the pixel Frechet distance to converged samples from the closest of the Karras
schedule and its variants with a longer first step, `karras_starts`, with `fit_schedules`' default steps and noise
draws, 64), by the full search (`search="descent"`) and by the default one (`search="bounded"`: the descent from the
closest start, the fit for one NFE fewer stretched among them, by the smallest step, stopped after a few moves),
each kept only where it is closer than Karras on 128 fresh draws too (the library's validation), and evaluated on
1024 other draws against the converged solution of the same ODE (RK4, the exact benchmark's reference): the RMS error
per sample, which a schedule fitted to the distribution need not lower, and the Frechet distance of the samples to
the converged ones, which it should. diffusers' solvers are not fitted:
`EDMDPMSolverMultistepScheduler.set_timesteps` takes no schedule in diffusers 0.42.1.

Writes benchmarks/results/fitted_schedules_exact_denoiser.{md,json} (with another `--bounded_budget` N:
fitted_schedules_exact_denoiser_budget_N.{md,json}).
"""

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from solvers_exact_denoiser import (
    EDM,
    REPO_ROOT,
    SIGMA_MAX,
    SIGMA_MIN,
    DenoiserAsUNet,
    ExactDenoiser,
    generic_loop,
    load_digits_points,
    reference_solution,
    rms,
)

from qac_diffusers import IPNDMScheduler
from qac_diffusers.metrics import frechet_distance
from qac_diffusers.schedulers.schedule_fitting import (
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_LOG_STEPS,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_VALIDATION_SAMPLES,
    karras_starts,
    pixel_features,
    search_schedules,
    warm_start_budget,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--nfe", type=int, nargs="+", default=list(range(3, 11)))
    parser.add_argument("--fit_samples", type=int, default=DEFAULT_SEARCH_SAMPLES)
    parser.add_argument("--bounded_budget", type=int, default=BOUNDED_DESCENT_BUDGET,
                        help="The bounded search's moves times the NFE (`fit_schedules(bounded_budget=...)`).")
    parser.add_argument("--eval_samples", type=int, default=1024)
    parser.add_argument("--reference_steps", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    return parser.parse_args()


def as_images(samples: torch.Tensor) -> torch.Tensor:
    return samples.reshape(-1, 1, 8, 8)


class Flow:
    """One exact flow on a set of noise draws (and, if conditional, one class per draw), with its converged end."""

    def __init__(self, points, labels, tau, conditional: bool, num_samples: int, generator, reference_steps: int):
        self.noise = torch.randn(num_samples, points.shape[1], generator=generator, dtype=torch.float64)
        allowed = None
        if conditional:
            classes = labels[torch.randint(0, len(labels), (num_samples,), generator=generator)]
            allowed = classes[:, None] == labels[None, :]
        self.denoiser = ExactDenoiser(points, tau, allowed)
        self.reference = reference_solution(self.denoiser, SIGMA_MAX * self.noise, reference_steps)[SIGMA_MIN]
        self.reference_features = pixel_features(as_images(self.reference).clamp(-1, 1))
        self._distances = {}  # by schedule, as the library's `ScheduleDistance` keeps them

    def sample(self, sigmas: list[float]) -> torch.Tensor:
        scheduler = IPNDMScheduler(**EDM, fitted_sigmas=[sigmas])
        nfe = scheduler.fitted_num_inference_steps[0]
        sample, _ = generic_loop(scheduler, DenoiserAsUNet(self.denoiser, scheduler), self.noise, nfe)
        return sample

    def distance(self, sigmas: list[float]) -> float:
        key = tuple(sigmas)
        if key not in self._distances:
            samples = pixel_features(as_images(self.sample(sigmas)).clamp(-1, 1))
            self._distances[key] = frechet_distance(samples, self.reference_features)
        return self._distances[key]


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    points, labels = load_digits_points()
    generator = torch.Generator().manual_seed(args.seed)
    results = {}
    started = time.perf_counter()
    for tau in args.taus:
        for kind in ("unconditional", "conditional"):
            common = (points, labels, tau, kind == "conditional")
            fit_flow = Flow(*common, args.fit_samples, generator, args.reference_steps)
            eval_flow = Flow(*common, args.eval_samples, generator, args.reference_steps)
            validation_flow = Flow(*common, DEFAULT_VALIDATION_SAMPLES, generator, args.reference_steps)
            rows = results.setdefault(f"tau {tau:g} {kind}", {})
            search_starts = functools.partial(karras_starts, IPNDMScheduler(**EDM))
            fits = {search: search_schedules(fit_flow.distance, search_starts, args.nfe, search, progress_bar=False,
                                             bounded_budget=args.bounded_budget)[0]
                    for search in ("descent", "bounded")}  # each search's fits, NFE after NFE as fit_schedules fits
            for nfe in sorted(args.nfe):
                karras, fitted, bounded = search_starts(nfe)[0], fits["descent"][nfe], fits["bounded"][nfe]
                # as fit_schedules keeps them: only where closer than Karras on the validation's draws too
                kept = {name: validation_flow.distance(sigmas) < validation_flow.distance(karras)
                        for name, sigmas in (("fitted", fitted), ("bounded", bounded))}
                rows[nfe] = {
                    name: {"rms": rms(eval_flow.sample(sigmas), eval_flow.reference),
                           "frechet": eval_flow.distance(sigmas), "sigmas": sigmas}
                    for name, sigmas in (("karras", karras), ("fitted", fitted if kept["fitted"] else karras),
                                         ("bounded", bounded if kept["bounded"] else karras))
                }
                rows[nfe]["kept"] = kept
                print(f"tau {tau:g} {kind} NFE {nfe}: " + ", ".join(
                    f"{name} rms {rows[nfe][name]['rms']:.4f} FD {rows[nfe][name]['frechet']:.4f}"
                    for name in ("karras", "fitted", "bounded")
                ) + f", kept {kept}", flush=True)
    budget_flag = "" if args.bounded_budget == BOUNDED_DESCENT_BUDGET else f" --bounded_budget {args.bounded_budget}"
    lines = [
        "# Fitted schedules on exact denoisers: iPNDM (AFS, fixed weights) on fitted vs Karras schedules", "",
        f"Command: `python benchmarks/fitted_schedules_exact_denoiser.py{budget_flag}` "
        f"(took {time.perf_counter() - started:.0f} s). Fitted on {args.fit_samples} noise draws and kept where it is "
        f"closer than Karras on {DEFAULT_VALIDATION_SAMPLES} fresh ones too (as `fit_schedules` validates; "
        "elsewhere the row repeats Karras; 'fitted': `search=\"descent\"`, the full search; 'bounded': the default "
        "search, the descent from the closest start (the fit for one NFE fewer stretched to one more point among "
        f"them) by log step {DEFAULT_LOG_STEPS[-1]}, stopped after {args.bounded_budget} / NFE moves "
        f"({warm_start_budget(args.bounded_budget):g} after the warm start)), "
        "evaluated on "
        f"{args.eval_samples} others against the converged solution of the same ODE at sigma_min. RMS: per-sample "
        "error; FD: Frechet distance of the pixels (clamped to [-1, 1]) to the converged samples. Lower is better.",
        "",
    ]
    for flow, rows in results.items():
        lines += [f"## {flow}", "", "| NFE | RMS Karras | RMS fitted | RMS bounded | FD Karras | FD fitted | "
                  "FD bounded | kept (fitted, bounded) |", "|---" * 8 + "|"]
        for nfe, row in rows.items():
            kept = ", ".join("yes" if row["kept"][name] else "no" for name in ("fitted", "bounded"))
            lines.append(f"| {nfe} | " + " | ".join(f"{row[name][measure]:.4f}" for measure in ("rms", "frechet")
                                                    for name in ("karras", "fitted", "bounded")) + f" | {kept} |")
        lines.append("")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.bounded_budget == BOUNDED_DESCENT_BUDGET else f"_budget_{args.bounded_budget}"
    stem = results_dir / f"fitted_schedules_exact_denoiser{suffix}"
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
