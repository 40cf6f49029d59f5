"""What QAC costs: sampling, code drawing, training steps and parameters, each as a ratio measured in one run.

    python benchmarks/cost.py                        # CPU, ~10 minutes on 2 cores
    python benchmarks/cost.py --skip_training        # sampling and parameters only

- Sampling: QACPipeline at 6 NFE against the plain diffusers loop with a UNet2DModel holding the same weights
  (target: at most 1.03x), alternating the two, median of the per-pair ratios.
- Drawing 10,000 code indices from 2**20 code weights, as a share of one sampling call (target: under 1%).
- Training: images/s of train_qac.py for QAC and for the baseline (--no_condition) with the same UNet, batch and data,
  alternating runs (target: a QAC step at most 1.15x a baseline step), for the tiny and cifar10 presets.
- Parameters of the encoder and the code embedding as a share of the UNet's, per preset (paper: about 1%).

Writes benchmarks/results/cost.{md,json}.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from qac_diffusers import FSQConditionEncoder, IPNDMScheduler, QACPipeline, QACUNet2DModel
from qac_diffusers.training.presets import PRESETS


REPO_ROOT = Path(__file__).resolve().parents[1]
EDM_BUDGET_IMAGES = 200e6  # EDM's CIFAR-10 training budget


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampling_presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--sampling_batch", type=int, nargs="+", default=[256, 16], help="One per sampling preset.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--skip_sampling", action="store_true", help="E.g. on a GPU machine, for training only.")
    parser.add_argument("--training_presets", nargs="+", default=["tiny", "cifar10"])
    parser.add_argument("--training_batch", type=int, nargs="+", default=[128, 8], help="One per training preset.")
    parser.add_argument("--training_steps", type=int, nargs="+", default=[150, 6], help="One per training preset.")
    parser.add_argument("--training_repeats", type=int, default=2)
    parser.add_argument("--mixed_precision", default="no", help="For GPU runs: bf16.")
    parser.add_argument("--results_name", default="cost")
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    return parser.parse_args()


def preset_unet(preset: str, code_dim: int, channels: int = 3) -> QACUNet2DModel:
    config = PRESETS[preset]
    return QACUNet2DModel(sample_size=config["resolution"], in_channels=channels, out_channels=channels,
                          **config["unet"], code_dim=code_dim)


def parameter_shares() -> dict:
    """Encoder and code-embedding parameters as a share of the UNet's (code_dim 20, as in the paper)."""
    shares = {}
    for preset in PRESETS:
        unet = preset_unet(preset, code_dim=20)
        encoder = FSQConditionEncoder.for_unet(unet, code_dim=20)
        unet_parameters = sum(p.numel() for name, p in unet.named_parameters() if not name.startswith("code_"))
        shares[preset] = {
            "unet": unet_parameters,
            "encoder": encoder.num_parameters(),
            "code_embedding": sum(p.numel() for p in unet.code_embedding.parameters()),
            "share": (encoder.num_parameters() + sum(p.numel() for p in unet.code_embedding.parameters()))
            / unet_parameters,
        }
    return shares


@torch.no_grad()
def plain_loop(unet: UNet2DModel, scheduler: IPNDMScheduler, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    """diffusers' generic loop with a UNet2DModel: the cost floor."""
    scheduler.set_timesteps(nfe)
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(model_output, t, sample).prev_sample
    return sample


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def sampling_cost(preset: str, batch: int, repeats: int) -> dict:
    """The preset's UNet with its code_dim; code drawing is timed separately from 2**20 weights."""
    torch.manual_seed(0)
    qac_unet = preset_unet(preset, code_dim=PRESETS[preset]["code_dim"]).eval()
    plain_config = {k: v for k, v in qac_unet.config.items() if k not in ("code_dim", "code_levels")}
    plain_unet = UNet2DModel.from_config(plain_config)
    plain_unet.load_state_dict({k: v for k, v in qac_unet.state_dict().items() if not k.startswith("code_")})
    plain_unet.eval()
    encoder = FSQConditionEncoder.for_unet(qac_unet, code_dim=qac_unet.config.code_dim)
    encoder.code_weights.copy_(torch.rand(encoder.codebook_size))
    pipe = QACPipeline(unet=qac_unet, scheduler=IPNDMScheduler(), encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    shape = (batch, *pipe.image_shape)
    large_codebook = FSQConditionEncoder(code_dim=20)
    large_codebook.code_weights.copy_(torch.rand(2**20))

    def run_pipeline():
        pipe(batch_size=shape[0], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt")

    def run_plain():
        plain_loop(plain_unet, IPNDMScheduler(), torch.randn(shape, generator=torch.Generator().manual_seed(0)), 6)

    def draw_codes():
        large_codebook.sample_indices(10_000, torch.Generator().manual_seed(0))

    run_pipeline(), run_plain(), draw_codes()  # warm-up
    pairs = [(timed(run_pipeline), timed(run_plain)) for _ in range(repeats)]
    draws = [timed(draw_codes) for _ in range(repeats)]
    pipeline_seconds = float(np.median([p for p, _ in pairs]))
    return {
        "preset": preset,
        "code_dim": qac_unet.config.code_dim,
        "batch": batch,
        "pipeline_seconds": pipeline_seconds,
        "plain_loop_seconds": float(np.median([q for _, q in pairs])),
        "ratio": float(np.median([p / q for p, q in pairs])),
        "ratio_spread": [float(min(p / q for p, q in pairs)), float(max(p / q for p, q in pairs))],
        "draw_10k_codes_seconds": float(np.median(draws)),
        "draw_share_of_sampling_call": float(np.median(draws)) / pipeline_seconds,
    }


def training_images_per_second(preset: str, batch: int, steps: int, no_condition: bool, args) -> float:
    """Median images/s of a short train_qac.py run (the first steps are left out as warm-up)."""
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no", str(REPO_ROOT / "train_qac.py"),
            "--output_dir", output_dir, "--preset", preset, "--train_batch_size", str(batch),
            "--max_train_steps", str(steps), "--report_to", "none", "--validation_steps", str(10 * steps),
            "--checkpointing_steps", str(10 * steps), "--num_validation_images", "4", "--fit_schedule_nfe",
            "--dataset_name", "digits" if preset == "tiny" else "animal-mnist",
        ]
        command += ["--no_condition"] if no_condition else []
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"train_qac.py failed:\n{result.stderr[-4000:]}")
        lines = (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
        rates = [json.loads(line)["images_per_second"] for line in lines]
        return float(np.median(rates[max(1, len(rates) // 5):]))


def training_cost(args: argparse.Namespace) -> dict:
    results = {}
    for preset, batch, steps in zip(args.training_presets, args.training_batch, args.training_steps):
        runs = {"qac": [], "baseline": []}
        for _ in range(args.training_repeats):  # alternate, so drifts of a shared machine hit both
            for model in runs:
                runs[model].append(training_images_per_second(preset, batch, steps, model == "baseline", args))
                print(f"{preset} {model}: {runs[model][-1]:.1f} images/s", flush=True)
        qac, baseline = float(np.median(runs["qac"])), float(np.median(runs["baseline"]))
        results[preset] = {"batch": batch, "steps": steps, "qac_images_per_second": qac,
                           "baseline_images_per_second": baseline, "step_time_ratio": baseline / qac, "runs": runs}
    return results


def sampling_markdown(sampling: dict, repeats: int) -> list[str]:
    return [
        f"## Sampling at 6 NFE ({sampling['preset']} preset, code_dim {sampling['code_dim']}, "
        f"batch {sampling['batch']}, CPU)", "",
        "| | seconds |", "|---|---|",
        f"| QACPipeline (code drawn from the code weights, code embedding) | {sampling['pipeline_seconds']:.4f} |",
        f"| plain loop, UNet2DModel with the same weights | {sampling['plain_loop_seconds']:.4f} |",
        f"| **ratio** (median of {repeats} alternating pairs; target <= 1.03) | **{sampling['ratio']:.3f}** "
        f"(range {sampling['ratio_spread'][0]:.3f}-{sampling['ratio_spread'][1]:.3f}) |",
        f"| drawing 10,000 code indices from 2**20 weights | {sampling['draw_10k_codes_seconds']:.5f} "
        f"({100 * sampling['draw_share_of_sampling_call']:.2f}% of one sampling call; target < 1%) |", "",
    ]


def training_markdown(training: dict) -> list[str]:
    lines = ["## Training (train_qac.py, median images/s of alternating runs)", "",
             "| preset | batch | QAC images/s | baseline images/s | QAC step / baseline step (target <= 1.15) | "
             "QAC time to EDM's 200 Mimg |", "|---|---|---|---|---|---|"]
    for preset, row in training.items():
        days = EDM_BUDGET_IMAGES / row["qac_images_per_second"] / 86400
        lines.append(f"| {preset} | {row['batch']} | {row['qac_images_per_second']:.1f} | "
                     f"{row['baseline_images_per_second']:.1f} | **{row['step_time_ratio']:.3f}** | {days:.1f} days |")
    return lines + [""]


def markdown(results: dict) -> str:
    command = f"python benchmarks/cost.py {' '.join(sys.argv[1:])}".strip()
    lines = [f"# Cost of QAC ({results['machine']})", "", f"Command: `{command}`", ""]
    for sampling in results.get("sampling", []):
        lines += sampling_markdown(sampling, results["args"]["repeats"])
    if "training" in results:
        lines += training_markdown(results["training"])
    lines += ["## Parameters (code_dim 20)", "", "| preset | UNet | encoder | code embedding | share of the UNet |",
              "|---|---|---|---|---|"]
    for preset, row in results["parameters"].items():
        lines.append(f"| {preset} | {row['unet']:,} | {row['encoder']:,} | {row['code_embedding']:,} | "
                     f"{100 * row['share']:.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or 'CPU'}"
    machine = f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    results = {"args": vars(args), "machine": machine, "parameters": parameter_shares()}
    if not args.skip_sampling:
        results["sampling"] = [sampling_cost(preset, batch, args.repeats)
                               for preset, batch in zip(args.sampling_presets, args.sampling_batch)]
    if not args.skip_training:
        results["training"] = training_cost(args)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{args.results_name}.json").write_text(json.dumps(results, indent=2))
    (results_dir / f"{args.results_name}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
