"""train_qac.py's GPU path in one run: images/s of a preset with the speed options off and on, and the QAC / baseline
step-time ratio (issue 11 targets on an H200: at least 2x the 747 images/s of benchmarks/results/cost_gpu.md, and a
ratio <= 1.10).

    python benchmarks/gpu_throughput.py     # one GPU: cifar10 preset, bf16, batch 128; under 8 minutes on an H200
    python benchmarks/gpu_throughput.py --device cpu --preset tiny --batch 32 --steps 4 --warmup_steps 2 \\
        --logging_steps 2 --mixed_precision no --compile_backend aot_eager --results_dir /tmp/check   # does it run?

Each configuration is a fresh `accelerate launch train_qac.py` (one process, data set and flags as benchmarks/cost.py),
one after the other: first QAC with the options off (today's flags), QAC with all options and the baseline
(--no_condition) with all options; then, while the time budget lasts, the baseline with the options off and QAC
without --torch_compile. All options: --logging_steps N, --channels_last, --dataloader_num_workers W, --torch_compile.
Always on (not flags): noise drawn on the device, pinned non-blocking image copies and, on CUDA, fused Adam.

images/s counts the logged windows after the first --warmup_steps steps (compilation happens in the first step):
images over seconds, from metrics.jsonl. Writes <results_dir>/<results_name>.{md,json} after every run, so a run
stopped early keeps what it measured; a CPU run is titled a check, never a GPU figure.
"""

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
EDM_BUDGET_IMAGES = 200e6  # EDM's CIFAR-10 training budget
TODAY_H200_IMAGES_PER_SECOND = 747.3  # cifar10 preset, bf16, batch 128, options off: benchmarks/results/cost_gpu.md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=250, help="Optimizer steps per configuration.")
    parser.add_argument("--warmup_steps", type=int, default=50, help="Steps left out of the measurement.")
    parser.add_argument("--mixed_precision", default="bf16")
    parser.add_argument("--logging_steps", type=int, default=50, help="--logging_steps with the options on.")
    parser.add_argument("--dataloader_num_workers", type=int, default=4, help="With the options on.")
    parser.add_argument("--compile_backend", default="inductor", help="--torch_compile's backend.")
    parser.add_argument(
        "--budget_seconds", type=float, default=450,
        help="The first three configurations always run (each stopped at the budget's end); the others start only "
        "when a configuration like them fitted in what is left.",
    )
    parser.add_argument(
        "--train_flags", default="",
        help="More train_qac.py flags for every run, as one string: --train_flags='--allow_tf32'.",
    )
    parser.add_argument("--results_name", help="Defaults to gpu_throughput (cuda) or gpu_throughput_cpu_check.")
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("No CUDA device here: pass --device cpu (and a small --preset) to check that this runs.")
    if not 0 <= args.warmup_steps < args.steps:
        raise ValueError(f"--warmup_steps must lie in [0, --steps), got {args.warmup_steps} and --steps {args.steps}.")
    if args.results_name is None:
        args.results_name = "gpu_throughput" if args.device == "cuda" else "gpu_throughput_cpu_check"
    return args


def configurations(args: argparse.Namespace) -> list[dict]:
    """The runs in order: the three the targets need, then the ablations."""
    options = ["--logging_steps", str(args.logging_steps), "--channels_last",
               "--dataloader_num_workers", str(args.dataloader_num_workers)]
    compiled = [*options, "--torch_compile", args.compile_backend]
    return [
        {"name": "qac_off", "model": "qac", "flags": [], "required": True},
        {"name": "qac_on", "model": "qac", "flags": compiled, "required": True},
        {"name": "baseline_on", "model": "baseline", "flags": compiled, "required": True},
        {"name": "baseline_off", "model": "baseline", "flags": [], "required": False},
        {"name": "qac_on_eager", "model": "qac", "flags": options, "required": False},
    ]


def images_per_second(metrics: list[dict], batch: int, warmup_steps: int) -> float:
    """Images over seconds of the logged windows that start after `warmup_steps` (each line covers the steps since
    the previous logged one)."""
    images, seconds, previous = 0, 0.0, 0
    for line in metrics:
        window = (line["step"] - previous) * batch
        if previous >= warmup_steps:
            images += window
            seconds += window / line["images_per_second"]
        previous = line["step"]
    return images / seconds


def train_command(args: argparse.Namespace, run: dict, output_dir: str) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no"]
    launch += ["--cpu"] if args.device == "cpu" else []
    never = str(10 * args.steps)  # no checkpoint or validation grid inside the measured steps
    command = launch + [
        str(REPO_ROOT / "train_qac.py"), "--output_dir", output_dir, "--preset", args.preset,
        "--dataset_name", "digits" if args.preset == "tiny" else "animal-mnist", "--train_batch_size",
        str(args.batch), "--max_train_steps", str(args.steps), "--report_to", "none", "--validation_steps", never,
        "--checkpointing_steps", never, "--num_validation_images", "4", "--fit_schedule_nfe",  # training steps only
        *shlex.split(args.train_flags), *run["flags"],
    ]
    return command + (["--no_condition"] if run["model"] == "baseline" else [])


def measure(args: argparse.Namespace, run: dict, timeout: float) -> dict:
    """One configuration in a fresh process: its images/s, or why it failed."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        try:
            result = subprocess.run(train_command(args, run, output_dir), capture_output=True, text=True,
                                    timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {**run, "status": f"stopped after {timeout:.0f} s (the time budget)",
                    "seconds": time.perf_counter() - started}
        if result.returncode != 0:
            return {**run, "status": "failed", "stderr_tail": result.stderr[-3000:],
                    "seconds": time.perf_counter() - started}
        lines = (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
        rate = images_per_second([json.loads(line) for line in lines], args.batch, args.warmup_steps)
    return {**run, "status": "ok", "images_per_second": rate, "seconds": time.perf_counter() - started}


def rate(results: dict, name: str) -> float | None:
    return results["runs"].get(name, {}).get("images_per_second")


def summary(results: dict) -> dict:
    """The figures of the targets, where their runs succeeded (the 747 images/s were measured on an H200)."""
    figures = {}
    before, after = rate(results, "qac_off"), rate(results, "qac_on")
    if before and after:
        figures["speedup_options_on_vs_off"] = after / before
    if after and results["args"]["device"] == "cuda":
        figures["speedup_vs_747"] = after / TODAY_H200_IMAGES_PER_SECOND
    if after:
        figures["days_for_200_mimg"] = EDM_BUDGET_IMAGES / after / 86400
    for options in ("on", "off"):
        qac, baseline = rate(results, f"qac_{options}"), rate(results, f"baseline_{options}")
        if qac and baseline:
            figures[f"qac_baseline_step_time_ratio_options_{options}"] = baseline / qac
    return figures


def markdown(results: dict) -> str:
    args, on_gpu = results["args"], results["args"]["device"] == "cuda"
    title = f"# train_qac.py's GPU path ({results['machine']})" if on_gpu else (
        f"# train_qac.py's GPU path: CPU CHECK, NOT A GPU FIGURE ({results['machine']})")
    lines = [title, "", f"Command: `{results['command']}`", "",
             f"{args['preset']} preset, batch {args['batch']}, mixed precision {args['mixed_precision']}, "
             f"{args['steps']} steps per "
             f"configuration, the first {args['warmup_steps']} not measured. Options on: "
             f"`{' '.join(results['runs'].get('qac_on', {}).get('flags', []))}`. Always on: noise drawn on the "
             "device, pinned non-blocking copies, fused Adam on CUDA.", "",
             "| configuration | images/s | days for EDM's 200 Mimg | wall seconds | status |", "|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        value = run.get("images_per_second")
        shown = ("", "") if value is None else (f"{value:.1f}", f"{EDM_BUDGET_IMAGES / value / 86400:.2f}")
        lines.append(f"| {name} (`{' '.join(run['flags']) or 'no flags'}`) | {shown[0]} | {shown[1]} | "
                     f"{run['seconds']:.0f} | {run['status']} |")
    figures = results["summary"]
    lines += ["", "| figure | value | target |", "|---|---|---|"]
    targets = {"speedup_vs_747": ">= 2 (H200, against cost_gpu.md's 747 images/s)",
               "qac_baseline_step_time_ratio_options_on": "<= 1.10"}
    lines += [f"| {key} | {value:.3f} | {targets.get(key, '')} |" for key, value in figures.items()]
    for name, run in results["runs"].items():
        if run["status"] == "failed":
            lines += ["", f"{name} failed:", "", "```", run["stderr_tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    results = {"args": vars(args), "machine": f"{device}, torch {torch.__version__}",
               "command": f"python benchmarks/gpu_throughput.py {' '.join(sys.argv[1:])}".strip(), "runs": {}}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    started, durations = time.perf_counter(), {}
    for run in configurations(args):
        left = args.budget_seconds - (time.perf_counter() - started)
        like = durations.get("--torch_compile" in run["flags"])  # a finished run with or without compilation
        if left <= 0 or (not run["required"] and (like is None or like > left)):
            print(f"{run['name']}: skipped, {max(left, 0):.0f} s of the budget left", flush=True)
            continue
        results["runs"][run["name"]] = measured = measure(args, run, timeout=left)
        durations["--torch_compile" in run["flags"]] = measured["seconds"]
        print(f"{run['name']}: {measured['status']}, {measured.get('images_per_second', 0):.1f} images/s, "
              f"{measured['seconds']:.0f} s", flush=True)
        results["summary"] = summary(results)
        (results_dir / f"{args.results_name}.json").write_text(json.dumps(results, indent=2))
        (results_dir / f"{args.results_name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
