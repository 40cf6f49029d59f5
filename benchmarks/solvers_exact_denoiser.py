"""Solvers on exact denoisers: few-step ODE error against a converged reference, without training noise.

    python benchmarks/solvers_exact_denoiser.py                    # CPU, about 12 minutes on 2 cores
    python benchmarks/solvers_exact_denoiser.py --num_samples 1024 --taus 0.05 0.1 0.3 --nfe_max 30

The data: the 1,797 8x8 digits (scaled to [-1, 1], flattened to 64-d) smoothed with a Gaussian of bandwidth tau,
p_0 = (1/K) sum_k N(x_k, tau^2 I). Its ideal EDM denoiser is closed-form: for x = x_0 + sigma n, component k has
posterior weight w_k = softmax_k(-|x - x_k|^2 / (2 (sigma^2 + tau^2))), and given k, x_0 and x are jointly Gaussian
with E[x_0 | x, k] = x_k + tau^2 / (sigma^2 + tau^2) (x - x_k), so

    D(x; sigma) = (tau^2 x + sigma^2 sum_k w_k x_k) / (sigma^2 + tau^2)        (float64 throughout).

The class-conditional ideal denoiser keeps only the points of one class (drawn per sample with the class frequency,
with the same noise): what adaptive conditions approximate.

Every scheduler runs in the generic diffusers loop of DESIGN.md section 5 (`set_timesteps`, `init_noise_sigma`,
`scale_model_input`, `step`), exactly as QACPipeline runs it, with the exact denoiser disguised as a UNet through the
scheduler's preconditioning: F = (D - c_skip x) / c_out. The UNet counts its calls (NFE). Compared:
IPNDMScheduler (AFS; without AFS; AFS with variable-step weights; AFS ending at 0), diffusers' EDMEulerScheduler and
EDMDPMSolverMultistepScheduler (solver_order 2 and 3, otherwise default) as `solver_from_config` builds them (NFE steps
over the NFE + 1 Karras points to sigma_min, the grid of iPNDM without AFS), and EDM's Heun sampler (Algorithm 1,
deterministic: NFE = 2N - 1 for N steps, so odd NFE only).

Error of a solver: RMS over samples of |x_solver - x_ref| / sqrt(64), x_ref = the same ODE from the same noise solved
to convergence (RK4 in the variable s = 1 / sqrt(sigma^2 + tau^2), where dx/dsigma = (x - D) / sigma becomes
d(s x)/ds = sum_k w_k x_k), taken at the sigma the solver ends at (sigma_min or 0). Also: an independent plain
implementation of DESIGN.md section 5's iPNDM against IPNDMScheduler, trajectory curvature and L_CFM of the exact flows
(qac_diffusers.metrics.trajectory).

Writes benchmarks/results/solvers_exact_denoiser.{md,json} and the plots
solvers_exact_denoiser_error_vs_nfe.png and solvers_exact_denoiser_cond_vs_uncond.png. A rerun with the same options
resumes: each finished flow (tau, unconditional or conditional) is kept in --work_dir with the random state after it.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import diffusers
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from qac_diffusers import IPNDMScheduler  # noqa: E402
from qac_diffusers.metrics.trajectory import (  # noqa: E402
    conditional_flow_matching_loss,
    trajectory_curvature,
    uniform_time_sigmas,
)
from qac_diffusers.schedulers import solver_from_config  # noqa: E402
from qac_diffusers.training.data import load_digits_dataset  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0
EDM = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "sigma_data": SIGMA_DATA, "rho": RHO}
# name -> a fresh scheduler; all share the EDM schedule parameters
SCHEDULERS = {
    "iPNDM+AFS": lambda: IPNDMScheduler(**EDM),
    "iPNDM": lambda: IPNDMScheduler(**EDM, analytical_first_step=False),
    "iPNDM+AFS var-step": lambda: IPNDMScheduler(**EDM, variable_step=True),
    "iPNDM+AFS to 0": lambda: IPNDMScheduler(**EDM, final_sigmas_type="zero"),
    "Euler": lambda: solver_from_config("euler", IPNDMScheduler(**EDM).config),
    "DPM++2M": lambda: solver_from_config("dpmsolver2", IPNDMScheduler(**EDM).config),
    "DPM++3M": lambda: solver_from_config("dpmsolver3", IPNDMScheduler(**EDM).config),
}
SOLVERS = list(SCHEDULERS) + ["Heun"]
# "iPNDM+AFS to 0" at NFE n repeats "iPNDM+AFS" at NFE n - 1 (checked and reported): kept out of tables and plots
TABLE_SOLVERS = [name for name in SOLVERS if name != "iPNDM+AFS to 0"]
RATIO_SOLVERS = ("iPNDM+AFS", "Heun", "DPM++2M")
BOOTSTRAP_RESAMPLES = 2000
# Adams-Bashforth weights, newest derivative first (DESIGN.md section 5), for the independent implementation
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=1024, help="Noise samples (ODE trajectories).")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.3], help="Bandwidths of the smoothing.")
    parser.add_argument("--nfe_min", type=int, default=3)
    parser.add_argument("--nfe_max", type=int, default=20)
    parser.add_argument("--reference_steps", type=int, default=256, help="RK4 steps (checked against half as many).")
    parser.add_argument("--curvature_steps", type=int, default=128, help="Euler steps (checked at double).")
    parser.add_argument("--cfm_draws", type=int, default=4, help="(t, noise) draws per smoothed data point for L_CFM.")
    parser.add_argument("--check_samples", type=int, default=64, help="Samples for the independent iPNDM check.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_threads", type=int, default=1,
        help="torch CPU threads. 1 by default: on a machine shared with other jobs, two threads contending for two "
        "cores ran 3-10x slower.",
    )
    parser.add_argument("--results_name", default="solvers_exact_denoiser")
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--work_dir", default=str(REPO_ROOT / "benchmarks" / "work" / "solvers_exact_denoiser"),
        help="Finished flows, so that a rerun with the same options resumes.",
    )
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------------------------
# The exact denoiser


def load_digits_points() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as float64 points in [-1, 1]^64 and their labels."""
    dataset = load_digits_dataset()
    images = np.stack([np.asarray(image, dtype=np.float64) for image in dataset["image"]])
    points = torch.from_numpy(images.reshape(len(images), -1) / 127.5 - 1)
    return points, torch.tensor(dataset["label"])


class ExactDenoiser:
    """D(x; sigma) of the tau-smoothed points, optionally restricted per sample to the points of one class."""

    def __init__(self, points: torch.Tensor, tau: float, allowed: torch.Tensor | None = None):
        self.points, self.tau, self.allowed = points, tau, allowed  # allowed: (batch, K) bool, or None for all
        self.squared_norms = points.square().sum(dim=1)
        self.calls = 0

    def centre_mean(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """sum_k w_k x_k, w = softmax_k(-|x - x_k|^2 / (2 (sigma^2 + tau^2))) (the |x|^2 term cancels)."""
        variance = sigma**2 + self.tau**2
        logits = (2 * x @ self.points.T - self.squared_norms) / (2 * variance)
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed, -math.inf)
        return torch.softmax(logits, dim=-1) @ self.points

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        self.calls += 1
        variance = sigma**2 + self.tau**2
        return (self.tau**2 * x + sigma**2 * self.centre_mean(x, sigma)) / variance


class DenoiserAsUNet:
    """
    A "UNet" F with D = c_skip x + c_out F for the scheduler's preconditioning: it reads sigma off the scheduler's
    schedule by the timestep (c_noise), undoes the scheduler's c_in on its input and returns (D - c_skip x) / c_out.
    """

    def __init__(self, denoiser: ExactDenoiser, scheduler):
        self.denoiser, self.scheduler, self.calls = denoiser, scheduler, 0

    def __call__(self, model_input: torch.Tensor, timestep: torch.Tensor) -> UNet2DOutput:
        self.calls += 1
        sigmas = self.scheduler.sigmas
        positive = sigmas > 0
        distance = (self.scheduler.precondition_noise(sigmas[positive]) - timestep).abs()
        if distance.min() > 1e-6:
            raise ValueError(f"Timestep {timestep} is not on the scheduler's schedule.")
        sigma_tensor = sigmas[positive][distance.argmin()]  # the float32 value the scheduler uses
        c_in = self.scheduler.precondition_inputs(torch.ones((), dtype=torch.float64), sigma_tensor)
        x = model_input.to(torch.float64) / c_in
        sigma = sigma_tensor.item()
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2) ** 0.5
        return UNet2DOutput(sample=(self.denoiser(x, sigma) - c_skip * x) / c_out)


# ---------------------------------------------------------------------------------------------------------------------
# Solvers


def generic_loop(scheduler, unet: DenoiserAsUNet, noise: torch.Tensor, nfe: int) -> tuple[torch.Tensor, float]:
    """DESIGN.md section 5's loop, as QACPipeline runs it. Returns the sample and the sigma it ends at."""
    scheduler.set_timesteps(nfe)
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(model_output, t, sample).prev_sample
    return sample.to(torch.float64), scheduler.sigmas[-1].item()


def heun_sampler(denoiser, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1; k-diffusion's `sample_heun`), S_churn = 0."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - denoiser(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * d_cur
        if sigma_next > 0:  # 2nd-order correction, skipped on the last step to sigma = 0
            d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d_cur + d_next) / 2
        x = x_next
    return x


def edm_sigmas(num_points: int) -> list[float]:
    """EDM eq. 5, written out (not the library's `karras_sigmas`): sigma_max down to sigma_min, float64."""
    max_inv, min_inv = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return [(max_inv + i / (num_points - 1) * (min_inv - max_inv)) ** RHO for i in range(num_points)]


def plain_ipndm(denoiser, noise: torch.Tensor, sigmas: list[float], analytical_first_step: bool) -> torch.Tensor:
    """iPNDM from the equations of DESIGN.md section 5: fixed Adams-Bashforth weights, AFS, lower-order warm start."""
    x, derivatives = sigmas[0] * noise, []
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if analytical_first_step and i == 0:
            derivatives.append(x / math.sqrt(1 + sigma**2))
        else:
            derivatives.append((x - denoiser(x, sigma)) / sigma)
        weights = AB_WEIGHTS[min(4, len(derivatives))]
        x = x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights, reversed(derivatives)))
    return x


def reference_solution(denoiser: ExactDenoiser, x_start: torch.Tensor, num_steps: int) -> dict[float, torch.Tensor]:
    """
    The ODE from x(sigma_max) = x_start to sigma = 0 by classic RK4 in s = 1 / sqrt(sigma^2 + tau^2): with u = s x,
    dx/dsigma = (x - D) / sigma = sigma (x - m) / (sigma^2 + tau^2) becomes du/ds = m(x; sigma), m = sum_k w_k x_k
    (bounded, smooth, regular at sigma = 0). Steps uniform in log s from sigma_max to sigma_min, then 4 uniform in s
    to sigma = 0. Returns x at sigma_min and at 0.
    """
    tau = denoiser.tau
    s_of = lambda sigma: 1 / math.sqrt(sigma**2 + tau**2)  # noqa: E731
    sigma_of = lambda s: math.sqrt(max(1 / s**2 - tau**2, 0.0))  # noqa: E731
    grid = np.exp(np.linspace(math.log(s_of(SIGMA_MAX)), math.log(s_of(SIGMA_MIN)), num_steps + 1)).tolist()
    grid += np.linspace(s_of(SIGMA_MIN), 1 / tau, 5)[1:].tolist()
    f = lambda u, s: denoiser.centre_mean(u / s, sigma_of(s))  # noqa: E731
    u, results = x_start * grid[0], {}
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = s_next - s
        k1 = f(u, s)
        k2 = f(u + h / 2 * k1, s + h / 2)
        k3 = f(u + h / 2 * k2, s + h / 2)
        k4 = f(u + h * k3, s_next)
        u = u + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i + 1 == num_steps:
            results[SIGMA_MIN] = u / s_next
    results[0.0] = u / grid[-1]
    return results


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS over samples of |a - b| / sqrt(dim)."""
    return (a - b).square().mean().sqrt().item()


def error_statistics(sample: torch.Tensor, reference: torch.Tensor, points: torch.Tensor) -> dict:
    """
    RMS error, the median per-sample error, the share of samples nearest another training point than x_ref, and the
    per-sample squared errors (for bootstrap intervals; not written to the JSON).
    """
    squared = (sample - reference).square().mean(dim=1)
    per_sample = squared.sqrt()
    nearest = lambda x: torch.cdist(x, points).argmin(dim=1)  # noqa: E731
    return {
        "squared": squared,
        "rms": per_sample.square().mean().sqrt().item(),
        "median": per_sample.median().item(),
        "other_nearest_point": (nearest(sample) != nearest(reference)).double().mean().item(),
    }


def run_solvers(denoiser: ExactDenoiser, noise: torch.Tensor, reference: dict, nfes: list[int]) -> dict:
    """{solver: {nfe: error_statistics}} for every solver and NFE (Heun: odd NFE)."""
    errors = {name: {} for name in SOLVERS}
    for name, make in SCHEDULERS.items():
        for nfe in nfes:
            scheduler = make()
            unet = DenoiserAsUNet(denoiser, scheduler)
            sample, final_sigma = generic_loop(scheduler, unet, noise, nfe)
            if unet.calls != nfe:
                raise RuntimeError(f"{name} made {unet.calls} calls for NFE {nfe}.")
            endpoint = 0.0 if final_sigma == 0 else SIGMA_MIN
            if endpoint == SIGMA_MIN and abs(final_sigma - SIGMA_MIN) > 1e-7:
                raise RuntimeError(f"{name} ends at sigma {final_sigma}.")
            errors[name][nfe] = error_statistics(sample, reference[endpoint], denoiser.points)
    for nfe in nfes:
        if nfe % 2 == 1:  # Heun: N steps make 2N - 1 calls
            before = denoiser.calls
            sample = heun_sampler(denoiser, SIGMA_MAX * noise, edm_sigmas((nfe + 1) // 2) + [0.0])
            if denoiser.calls - before != nfe:
                raise RuntimeError(f"Heun made {denoiser.calls - before} calls for NFE {nfe}.")
            errors["Heun"][nfe] = error_statistics(sample, reference[0.0], denoiser.points)
    return errors


def independent_ipndm_check(denoiser: ExactDenoiser, noise: torch.Tensor, nfes: list[int]) -> dict:
    """Max |IPNDMScheduler - plain_ipndm| over NFE, with the plain schedule in float64 and with the scheduler's own."""
    differences = {"own_float64_schedule": 0.0, "scheduler_float32_schedule": 0.0}
    for analytical_first_step in (True, False):
        for nfe in nfes:
            scheduler = IPNDMScheduler(**EDM, analytical_first_step=analytical_first_step)
            sample, _ = generic_loop(scheduler, DenoiserAsUNet(denoiser, scheduler), noise, nfe)
            num_points = nfe + (2 if analytical_first_step else 1)
            for key, sigmas in (
                ("own_float64_schedule", edm_sigmas(num_points)),
                ("scheduler_float32_schedule", scheduler.sigmas.double().tolist()),
            ):
                plain = plain_ipndm(denoiser, noise, sigmas, analytical_first_step)
                differences[key] = max(differences[key], (sample - plain).abs().max().item())
    return differences


# ---------------------------------------------------------------------------------------------------------------------
# Report


def best_per_nfe(errors: dict, nfes: list[int], solvers: list[str] = TABLE_SOLVERS) -> dict[int, str]:
    return {nfe: min((errors[name][nfe], name) for name in solvers if nfe in errors[name])[1] for nfe in nfes}


def ranges(best: dict[int, str]) -> list[tuple[int, int, str]]:
    """Consecutive NFE with the same winner: (first, last, name)."""
    runs = []
    for nfe, name in best.items():
        if runs and runs[-1][2] == name and runs[-1][1] == nfe - 1:
            runs[-1] = (runs[-1][0], nfe, name)
        else:
            runs.append((nfe, nfe, name))
    return runs


def non_monotone(errors: dict[int, float]) -> list[int]:
    """NFE at which the error is larger than at the next smaller NFE the solver has."""
    keys = sorted(errors)
    return [b for a, b in zip(keys[:-1], keys[1:]) if errors[b] > errors[a]]


def format_list(values: list) -> str:
    return ", ".join(map(str, values)) if values else "none"


def error_table(errors: dict, nfes: list[int], formatter=lambda v: f"{v:.2e}") -> list[str]:
    lines = ["| NFE | " + " | ".join(TABLE_SOLVERS) + " |", "|---" * (len(TABLE_SOLVERS) + 1) + "|"]
    best = best_per_nfe(errors, nfes)
    for nfe in nfes:
        cells = []
        for name in TABLE_SOLVERS:
            if nfe not in errors[name]:
                cells.append("-")
            else:
                cell = formatter(errors[name][nfe])
                cells.append(f"**{cell}**" if best[nfe] == name else cell)
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    return lines


def mean_ratio(ratios: dict[int, float], low: int, high: int) -> str:
    values = [v for nfe, v in ratios.items() if low <= nfe <= high]
    return f"{np.mean(values):.2f}" if values else "-"


def summary_text(results: dict, nfes: list[int]) -> list[str]:
    """The 'what it shows' bullets; every statement is computed from the numbers."""
    lines, last = [], nfes[-1]
    odd = [nfe for nfe in nfes if nfe % 2 == 1]
    bins = [(nfes[0], min(6, last)), (7, min(12, last)), (13, last)]
    bins = [(a, b) for a, b in bins if a <= b]
    for tau_key, r in results["taus"].items():
        unconditional, conditional = r["unconditional"], r["conditional"]
        errors = unconditional["errors"]
        winners = "; ".join(
            f"{a}-{b}: {name}" if a != b else f"{a}: {name}" for a, b, name in ranges(best_per_nfe(errors, nfes))
        )
        ipndm_variants = [name for name in TABLE_SOLVERS if name.startswith("iPNDM")]
        ipndm_wins = sum(best_per_nfe(errors, nfes)[nfe] in ipndm_variants for nfe in nfes)
        afs_better = sum(errors["iPNDM+AFS"][n] < errors["iPNDM"][n] for n in nfes)
        others = [name for name in TABLE_SOLVERS if name not in ipndm_variants]
        best_other = {nfe: min(errors[name][nfe] for name in others if nfe in errors[name]) for nfe in nfes}
        worst = {n: max((errors[name][n], name) for name in TABLE_SOLVERS if n in errors[name])[1] for n in odd}
        heun_worst = sum(worst[n] == "Heun" for n in odd)
        heun_text = f"Heun is the least accurate solver at {heun_worst} of its {len(odd)} NFE"
        if 3 in errors["Heun"]:
            heun_text += (
                f" (error {errors['Heun'][3]:.0f} at NFE 3, where its one full step, from 80 to 0.002, ends with a "
                "correction evaluated at sigma_min)"
            )
        heun_text += "."
        lines += [
            f"- **tau = {tau_key}, unconditional.** Most accurate solver per NFE: {winners}. An IPNDMScheduler "
            f"variant is the most accurate at {ipndm_wins} of {len(nfes)} NFE; iPNDM+AFS's error is "
            f"{errors['iPNDM+AFS'][last] / best_other[last]:.2f}x that of the best of Euler, DPM++2M/3M and Heun "
            f"at NFE {last} ({errors['iPNDM+AFS'][nfes[0]] / best_other[nfes[0]]:.2f}x at NFE {nfes[0]}). "
            f"AFS beats no AFS at {afs_better} of {len(nfes)} NFE. The error rises with NFE (vs NFE - 1) for "
            f"fixed-weight iPNDM+AFS at NFE {format_list(non_monotone(errors['iPNDM+AFS']))}, for iPNDM without "
            f"AFS at {format_list(non_monotone(errors['iPNDM']))}, for the variable-step form at "
            f"{format_list(non_monotone(errors['iPNDM+AFS var-step']))}. {heun_text}",
            f"  iPNDM+AFS at NFE {last}: RMS error {errors['iPNDM+AFS'][last]:.3f}, median per-sample error "
            f"{unconditional['median']['iPNDM+AFS'][last]:.4f}, "
            f"{unconditional['other_nearest_point']['iPNDM+AFS'][last]:.1%} of samples end nearest another "
            "training image than x_ref"
            + (" (the RMS is dominated by those few samples)."
               if unconditional["median"]["iPNDM+AFS"][last] < errors["iPNDM+AFS"][last] / 3 else "."),
            "  Class-conditional exact flow (what adaptive conditions approximate): error ratio cond./uncond. "
            "for iPNDM+AFS averages "
            + ", ".join(f"{mean_ratio(r['cond_over_uncond']['iPNDM+AFS'], a, b)} over NFE {a}-{b}" for a, b in bins)
            + "; best solver cond. / best solver uncond. averages "
            + ", ".join(f"{mean_ratio(r['best_cond_over_best_uncond'], a, b)} over NFE {a}-{b}" for a, b in bins)
            + f" (per-NFE range {min(r['best_cond_over_best_uncond'].values()):.2f}-"
            f"{max(r['best_cond_over_best_uncond'].values()):.2f}); at NFE {last} the iPNDM+AFS ratio is "
            f"{r['cond_over_uncond']['iPNDM+AFS'][last]:.2f}, 90% bootstrap interval "
            f"[{r['cond_over_uncond_90ci']['iPNDM+AFS'][last][0]:.2f}, "
            f"{r['cond_over_uncond_90ci']['iPNDM+AFS'][last][1]:.2f}]. Curvature {unconditional['curvature']:.3f} -> "
            f"{conditional['curvature']:.3f} ({conditional['curvature'] / unconditional['curvature'] - 1:+.0%}), "
            f"L_CFM {unconditional['cfm']['mean']:.3f} -> {conditional['cfm']['mean']:.3f} "
            f"({conditional['cfm']['mean'] / unconditional['cfm']['mean'] - 1:+.0%}).",
        ]
    checks = results["checks"]
    lines += [
        f"- `iPNDM+AFS` with `final_sigmas_type='zero'` (not in the tables; in the JSON) at NFE n has the error of "
        f"the default at NFE n - 1 to within {checks['zero_end_vs_one_fewer_max_relative']:.1%} (relative): its "
        "last call only denoises from sigma_min to 0, as does the last call of Heun (and of diffusers' EDM "
        "schedulers with their default `final_sigmas_type='zero'`).",
        f"- IPNDMScheduler agrees with the independent implementation to "
        f"{checks['independent_ipndm']['scheduler_float32_schedule']:.0e} (same schedule) and "
        f"{checks['independent_ipndm']['own_float64_schedule']:.0e} (schedule in float64).",
    ]
    return lines


def write_markdown(results: dict, nfes: list[int], path: Path) -> None:
    checks, config = results["checks"], results["config"]
    odd_nfes = [nfe for nfe in nfes if nfe % 2 == 1]
    lines = [
        "# Solvers on exact denoisers (digits smoothed by a Gaussian of bandwidth tau)",
        "",
        f"Command: `{config['command']}` ({config['num_samples']} noise samples, seed "
        f"{config['seed']}, {results['runtime_s']:.0f} s on {results['environment']['machine']}, torch "
        f"{results['environment']['torch']}, diffusers {results['environment']['diffusers']}).",
        "",
        "The data: the 1,797 digits in [-1, 1]^64 smoothed by N(0, tau^2 I); the ideal denoiser is closed-form, "
        "D(x; sigma) = (tau^2 x + sigma^2 sum_k w_k x_k) / (sigma^2 + tau^2), w = softmax_k(-|x - x_k|^2 / "
        "(2 (sigma^2 + tau^2))), in float64. The class-conditional ideal denoiser uses only the points of one class, "
        "drawn per sample with the class frequencies; same noise.",
        "",
        "Error: RMS over samples of |x_solver - x_ref| / sqrt(64) in the [-1, 1] pixel scale, x_ref = the same ODE "
        "from the same noise solved to convergence (RK4), taken at the sigma each solver ends at: sigma_min = 0.002 "
        "for the schedulers (`final_sigmas_type='sigma_min'`), 0 for EDM's Heun. The lowest error of each row is in "
        "bold.",
        "",
        "Solvers and their NFE (the number of denoiser calls, counted): IPNDMScheduler with the analytical first step "
        "(AFS; NFE calls over NFE + 1 steps), without AFS (NFE steps), and with AFS and variable-step "
        "Adams-Bashforth weights; diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler (`dpmsolver++`, "
        "`solver_order` 2 or 3, otherwise default, e.g. `lower_order_final=True`) as `solver_from_config` builds "
        "them: NFE steps over the NFE + 1 points of the Karras schedule to sigma_min, the grid of iPNDM without AFS "
        "(diffusers' own default would spend the last call on denoising from sigma_min to 0); EDM's Heun sampler "
        "(Algorithm 1, S_churn = 0): N steps make "
        "2N - 1 calls, so it has odd NFE only. All use the same Karras schedule parameters (sigma 0.002 to 80, "
        "rho 7); the schedulers run in the generic diffusers loop (DESIGN.md section 5) with the exact denoiser "
        "wrapped as a UNet through the scheduler's preconditioning, F = (D - c_skip x) / c_out; Heun is a plain "
        "function.",
        "",
        "## What it shows",
        "",
        *summary_text(results, nfes),
        "",
        "## Checks",
        "",
        f"- Reference convergence: RMS difference between RK4 with {config['reference_steps'] // 2} and "
        f"{config['reference_steps']} steps, largest over tau and conditioning: "
        f"{checks['reference_convergence_max']:.1e} (smallest error in the tables: {checks['smallest_error']:.1e}).",
        f"- sigma_min vs 0: RMS |x_ref(sigma_min) - x_ref(0)| is at most {checks['endpoint_difference_max']:.1e}: "
        "the endpoint convention matters only below that size; every solver is compared at its own endpoint.",
        "- diffusers' EDM schedulers start from noise * init_noise_sigma = noise * sqrt(sigma_max^2 + 1) "
        f"(80.00625 instead of 80): that moves the exact solution by RMS at most {checks['start_offset_max']:.1e}, "
        "a floor under their errors (not removed from them: they run as a pipeline runs them).",
        f"- Independent iPNDM (DESIGN.md section 5 written out, {config['check_samples']} samples, NFE "
        f"{nfes[0]}-{nfes[-1]}, with and without AFS, float64) vs IPNDMScheduler in the generic loop: max "
        f"|difference| {checks['independent_ipndm']['scheduler_float32_schedule']:.1e} given the scheduler's own "
        f"schedule, {checks['independent_ipndm']['own_float64_schedule']:.1e} with the schedule computed in "
        "float64 (the scheduler stores `sigmas` in float32, as diffusers' schedulers do; that rounding is the "
        "whole difference).",
        f"- Curvature on {config['curvature_steps']} Euler steps uniform in Rectified-Flow time; with twice as many "
        f"steps it changes by at most {checks['curvature_convergence_max_relative']:.1%}.",
        "",
    ]
    for tau_key, r in results["taus"].items():
        lines += [f"## tau = {tau_key}", ""]
        for kind in ("unconditional", "conditional"):
            title = "Unconditional" if kind == "unconditional" else "Class-conditional"
            lines += [f"### {title} exact denoiser: RMS error", "", *error_table(r[kind]["errors"], nfes), ""]
        lines += [
            "### Unconditional: median per-sample error (share of samples nearest another training image than x_ref)",
            "",
            *error_table(
                {name: {nfe: (r["unconditional"]["median"][name][nfe],
                              r["unconditional"]["other_nearest_point"][name][nfe])
                        for nfe in odd_nfes if nfe in r["unconditional"]["median"][name]}
                 for name in SOLVERS},
                odd_nfes,
                formatter=lambda v: f"{v[0]:.1e} ({v[1]:.0%})",
            ),
            "",
            "### Class-conditional / unconditional RMS error (below 1: the conditional flow is easier to solve)",
            "",
            "In brackets: 90% bootstrap interval over the noise samples (resampled in pairs). At higher NFE the RMS "
            "is carried by the few samples that end near another training image than x_ref (see the median table), "
            "a rare-event statistic: its ratio moves with `--num_samples` more than these intervals suggest. The last "
            "column is the same ratio for the median per-sample error, which those samples do not carry.",
            "",
            "| NFE | " + " | ".join(RATIO_SOLVERS) + " | best cond. / best uncond. | iPNDM+AFS, medians |",
            "|---" * (len(RATIO_SOLVERS) + 3) + "|",
        ]
        for nfe in nfes:
            cells = [
                f"{r['cond_over_uncond'][name][nfe]:.2f} [{r['cond_over_uncond_90ci'][name][nfe][0]:.2f}, "
                f"{r['cond_over_uncond_90ci'][name][nfe][1]:.2f}]"
                if nfe in r["cond_over_uncond"][name] else "-"
                for name in RATIO_SOLVERS
            ]
            medians = [r[kind]["median"]["iPNDM+AFS"][nfe] for kind in ("conditional", "unconditional")]
            cells += [f"{r['best_cond_over_best_uncond'][nfe]:.2f}", f"{medians[0] / medians[1]:.2f}"]
            lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "### Curvature and L_CFM of the exact flows (qac_diffusers.metrics.trajectory)",
            "",
            "| | curvature | L_CFM (= the intersection term V of paper eq. 11) |",
            "|---|---|---|",
        ]
        for kind in ("unconditional", "conditional"):
            cfm = r[kind]["cfm"]
            lines.append(f"| {kind} | {r[kind]['curvature']:.4f} | {cfm['mean']:.4f} +- {cfm['standard_error']:.4f} |")
        lines.append("")
    lines += [
        "Curvature: RNE's straightness (DESIGN.md section 8) of Euler trajectories from the same noise, in "
        "Rectified-Flow coordinates (`trajectory_curvature`). L_CFM: paper eq. 12 in the Rectified-Flow form of "
        "Table 1, t uniform over the EDM noise range (`conditional_flow_matching_loss`), on the smoothed data (each "
        f"point plus tau-noise, {config['cfm_draws']} draws per point, +- one standard error), the conditional one "
        "given each point's class. The exact denoiser has no fitting error, so its L_CFM is the intersection term "
        "V((X_0, X_1)), the least any model of this data can reach.",
        "",
        f"Plots: `{config['results_name']}_error_vs_nfe.png` (unconditional, all solvers), "
        f"`{config['results_name']}_cond_vs_uncond.png` (conditional dashed, unconditional solid; ratios below). "
        f"All numbers: `{config['results_name']}.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(results: dict, results_dir: Path, name: str) -> None:
    taus = list(results["taus"])
    fig, axes = plt.subplots(1, len(taus), figsize=(6 * len(taus), 4.5), squeeze=False)
    for ax, tau_key in zip(axes[0], taus):
        for solver in TABLE_SOLVERS:
            errors = results["taus"][tau_key]["unconditional"]["errors"][solver]
            keys = sorted(errors)
            ax.plot(keys, [errors[k] for k in keys], marker="o", markersize=3, label=solver)
        ax.set(yscale="log", xlabel="NFE", ylabel="RMS error vs converged solution")
        ax.set_title(f"unconditional, tau = {tau_key}")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results_dir / f"{name}_error_vs_nfe.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(taus), figsize=(6 * len(taus), 8), squeeze=False)
    for column, tau_key in enumerate(taus):
        r = results["taus"][tau_key]
        for index, solver in enumerate(RATIO_SOLVERS):
            colour = f"C{index}"
            for kind, style in (("unconditional", "-"), ("conditional", "--")):
                errors = r[kind]["errors"][solver]
                keys = sorted(errors)
                axes[0][column].plot(keys, [errors[k] for k in keys], style, color=colour, marker="o", markersize=3,
                                     label=f"{solver}, {kind}")
            ratios = r["cond_over_uncond"][solver]
            keys = sorted(ratios)
            axes[1][column].plot(keys, [ratios[k] for k in keys], color=colour, marker="o", markersize=3, label=solver)
        axes[0][column].set(yscale="log", xlabel="NFE", ylabel="RMS error vs converged solution")
        axes[0][column].set_title(f"tau = {tau_key}")
        axes[1][column].axhline(1.0, color="grey", linewidth=0.8)
        axes[1][column].set(xlabel="NFE", ylabel="conditional / unconditional RMS error")
        for ax in axes[:, column]:
            ax.grid(True, which="both", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results_dir / f"{name}_cond_vs_uncond.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------


def measure_flow(args, points, labels, tau, allowed, noise, nfes, generator, checks) -> dict:
    """Reference, solvers, curvature and L_CFM for one exact flow (unconditional when `allowed` is None)."""
    denoiser = ExactDenoiser(points, tau, allowed)
    reference = reference_solution(denoiser, SIGMA_MAX * noise, args.reference_steps)
    coarse = reference_solution(denoiser, SIGMA_MAX * noise, args.reference_steps // 2)
    checks["reference_convergence"].append(rms(coarse[0.0], reference[0.0]))
    checks["endpoint_difference"].append(rms(reference[SIGMA_MIN], reference[0.0]))
    diffusers_start = reference_solution(denoiser, math.sqrt(SIGMA_MAX**2 + 1) * noise, args.reference_steps // 2)
    checks["start_offset"].append(rms(diffusers_start[0.0], coarse[0.0]))

    statistics = run_solvers(denoiser, noise, reference, nfes)
    result = {
        key: {name: {nfe: s[key] for nfe, s in per_nfe.items()} for name, per_nfe in statistics.items()}
        for key in ("rms", "median", "other_nearest_point", "squared")
    }
    result["errors"] = result.pop("rms")
    zero_end = result["errors"]["iPNDM+AFS to 0"]
    checks["zero_end_vs_one_fewer"] += [
        abs(zero_end[nfe] / result["errors"]["iPNDM+AFS"][nfe - 1] - 1) for nfe in nfes if nfe - 1 in nfes
    ]

    curvature = trajectory_curvature(denoiser, noise, uniform_time_sigmas(args.curvature_steps, SIGMA_MAX)).mean()
    fine = trajectory_curvature(denoiser, noise, uniform_time_sigmas(2 * args.curvature_steps, SIGMA_MAX)).mean()
    checks["curvature_relative"].append(abs(fine / curvature - 1).item())

    # L_CFM on the smoothed data: every point plus tau-noise, conditioned (if at all) on its own class
    cfm_denoiser = ExactDenoiser(points, tau, None if allowed is None else labels[:, None] == labels[None, :])
    cfm = torch.cat([
        conditional_flow_matching_loss(
            cfm_denoiser,
            points + tau * torch.randn(points.shape, generator=generator, dtype=torch.float64),
            generator,
            SIGMA_MIN,
            SIGMA_MAX,
        )
        for _ in range(args.cfm_draws)
    ])
    result.update(
        curvature=curvature.item(),
        curvature_fine=fine.item(),
        cfm={"mean": cfm.mean().item(), "standard_error": (cfm.std() / len(cfm) ** 0.5).item()},
    )
    return result


def resumable_flow(args, tau_key: str, kind: str, generator: torch.Generator, checks: dict, measure) -> dict:
    """
    `measure()` for one flow, or its result from an earlier run with the same options; the flows run in a fixed
    order, so the random state and the checks saved after a flow are those an uninterrupted run has there.
    """
    ignored = ("num_threads", "check_samples", "results_name", "results_dir", "work_dir")
    options = json.dumps({key: value for key, value in vars(args).items() if key not in ignored}, sort_keys=True)
    digest = hashlib.sha256(options.encode()).hexdigest()[:12]
    path = Path(args.work_dir) / f"{digest}-tau{tau_key}-{kind}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        generator.set_state(saved["generator_state"])
        checks.update(saved["checks"])
        print(f"tau {tau_key} {kind}: resumed from {path}", flush=True)
        return saved["result"]
    result = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"result": result, "generator_state": generator.get_state(), "checks": checks}, path)
    return result


def bootstrap_ratio(squared_a: torch.Tensor, squared_b: torch.Tensor, generator: torch.Generator) -> list[float]:
    """90% bootstrap interval of RMS(a) / RMS(b) over samples, resampled in pairs (the same noise in both)."""
    indices = torch.randint(0, len(squared_a), (BOOTSTRAP_RESAMPLES, len(squared_a)), generator=generator)
    ratios = (squared_a[indices].mean(dim=1) / squared_b[indices].mean(dim=1)).sqrt()
    return torch.quantile(ratios, torch.tensor([0.05, 0.95], dtype=ratios.dtype)).tolist()


def main() -> None:
    args = parse_args()
    start_time = time.time()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.num_threads)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    nfes = list(range(args.nfe_min, args.nfe_max + 1))

    points, labels = load_digits_points()
    # separate random streams, so that a run with more samples extends the noise and classes of a smaller one
    noise = torch.randn(
        args.num_samples, points.shape[1], generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64
    )
    # one class per sample, drawn with the class frequencies (the label of a uniformly drawn training point)
    class_generator = torch.Generator().manual_seed(args.seed + 1)
    sample_classes = labels[torch.randint(0, len(labels), (args.num_samples,), generator=class_generator)]
    allowed = sample_classes[:, None] == labels[None, :]
    generator = torch.Generator().manual_seed(args.seed + 2)  # L_CFM's data noise, times and noise

    command = " ".join(["python benchmarks/solvers_exact_denoiser.py", *sys.argv[1:]])
    config = dict(vars(args), results_dir=os.path.relpath(results_dir, REPO_ROOT), command=command)
    results = {"config": config, "taus": {}}
    checks = {key: [] for key in ("reference_convergence", "endpoint_difference", "start_offset",
                                  "curvature_relative", "zero_end_vs_one_fewer")}
    independent = []
    bootstrap_generator = torch.Generator().manual_seed(args.seed + 3)
    for tau in args.taus:
        tau_key = f"{tau:g}"
        r = results["taus"][tau_key] = {}
        for kind in ("unconditional", "conditional"):
            tick = time.time()
            r[kind] = resumable_flow(
                args, tau_key, kind, generator, checks,
                lambda: measure_flow(args, points, labels, tau, None if kind == "unconditional" else allowed, noise,
                                     nfes, generator, checks),
            )
            print(f"tau {tau_key} {kind}: {time.time() - tick:.0f} s", flush=True)
        independent.append(independent_ipndm_check(ExactDenoiser(points, tau), noise[: args.check_samples], nfes))
        r["independent_ipndm"] = independent[-1]
        squared = {kind: r[kind].pop("squared") for kind in ("unconditional", "conditional")}
        r["cond_over_uncond_90ci"] = {
            name: {nfe: bootstrap_ratio(squared["conditional"][name][nfe], squared["unconditional"][name][nfe],
                                        bootstrap_generator)
                   for nfe in squared["unconditional"][name]}
            for name in RATIO_SOLVERS
        }
        r["cond_over_uncond"] = {
            name: {nfe: r["conditional"]["errors"][name][nfe] / r["unconditional"]["errors"][name][nfe]
                   for nfe in r["unconditional"]["errors"][name]}
            for name in SOLVERS
        }
        best = {
            kind: {nfe: min(e[nfe] for name, e in r[kind]["errors"].items() if name in TABLE_SOLVERS and nfe in e)
                   for nfe in nfes}
            for kind in ("unconditional", "conditional")
        }
        r["best_cond_over_best_uncond"] = {nfe: best["conditional"][nfe] / best["unconditional"][nfe] for nfe in nfes}

    results["checks"] = {
        "reference_convergence_max": max(checks["reference_convergence"]),
        "endpoint_difference_max": max(checks["endpoint_difference"]),
        "start_offset_max": max(checks["start_offset"]),
        "curvature_convergence_max_relative": max(checks["curvature_relative"]),
        "zero_end_vs_one_fewer_max_relative": max(checks["zero_end_vs_one_fewer"], default=0.0),
        "smallest_error": min(
            v for r in results["taus"].values() for kind in ("unconditional", "conditional")
            for name in TABLE_SOLVERS for v in r[kind]["errors"][name].values()
        ),
        "independent_ipndm": {key: max(d[key] for d in independent) for key in independent[0]},
        "all": checks,
    }
    results["runtime_s"] = time.time() - start_time
    results["environment"] = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread"
        + ("s" if torch.get_num_threads() > 1 else ""),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }

    name = args.results_name
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, nfes, results_dir / f"{name}.md")
    plot(results, results_dir, name)
    for tau_key, r in results["taus"].items():
        print(f"\ntau = {tau_key}, unconditional, RMS error")
        print("\n".join(error_table(r["unconditional"]["errors"], nfes)))
    print("\n" + "\n".join(summary_text(results, nfes)))
    print(f"\nWrote {results_dir / name}.{{md,json}} and plots in {results['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
