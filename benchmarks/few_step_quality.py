"""Few-step quality: QAC against the unconditional baseline trained the same way (DESIGN.md section 8).

For every seed, train_qac.py trains a QAC model and a baseline (--no_condition) with identical data, steps, UNet and
seed on a training split of the data; both are then sampled with each solver at each NFE, and the Frechet distance of
the samples to the held-out split is measured in the feature space of a small classifier trained on the training
split (Inception features mean little for 8x8 or 28x28 images).

    python benchmarks/few_step_quality.py                                   # digits, 3 seeds, ~25 min on 2 cores
    python benchmarks/few_step_quality.py --dataset animal-mnist --preset small --resolution 28 --max_train_steps 20000

Writes benchmarks/results/few_step_quality_<dataset>.{md,json} and plots; trained models go to --work_dir. A rerun
resumes: trained models are reused (one killed in training continues from its last checkpoint, see
--checkpointing_steps), and so is every Frechet distance and straightness measurement already written
beside its model (`benchmark_measurements.json`); delete --work_dir to measure changed code again.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from qac_diffusers import QACPipeline  # noqa: E402
from qac_diffusers.metrics import extract_features, frechet_distance, train_feature_classifier  # noqa: E402
from qac_diffusers.metrics.trajectory import (  # noqa: E402
    pipeline_conditional_flow_matching_loss,
    pipeline_curvature,
)
from qac_diffusers.schedulers import SOLVERS, solver_from_config  # noqa: E402
from qac_diffusers.training import ImageTransform, load_image_dataset  # noqa: E402
from qac_diffusers.training.checkpoints import list_checkpoints  # noqa: E402
from qac_diffusers.training.code_usage import code_usage  # noqa: E402
from qac_diffusers.utils import image_grid  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
# The models compared, each a train_qac.py run with these extra flags.
MODEL_FLAGS = {"baseline": ["--no_condition"], "qac": [], "qac_identity": ["--straight_through", "identity"]}
# Samplers beyond the solvers of `SOLVERS`, by name: (model folder, pipeline, seed) -> scheduler. A benchmark built on
# this one adds an entry before `build_parser` (e.g. schedules fitted to each model) and names it in --solvers.
EXTRA_SAMPLERS = {}


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The options of this benchmark; benchmarks built on it add their own and change defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="A built-in data set: digits or animal-mnist.")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_FLAGS), default=["baseline", "qac"],
                        help="qac_identity: QAC with the paper's literal straight-through estimator.")
    parser.add_argument("--results_name", help="Defaults to few_step_quality_<dataset>.")
    parser.add_argument("--max_train_steps", type=int, default=2500)
    parser.add_argument("--train_batch_size", type=int, default=128)
    parser.add_argument("--checkpointing_steps", type=int,
                        help="Checkpoint every N steps, so that a killed run resumes there; default: at the end.")
    parser.add_argument("--holdout_fraction", type=float, default=0.3)
    parser.add_argument("--nfe", type=int, nargs="+", default=[3, 4, 5, 6, 10])
    parser.add_argument("--reference_nfe", type=int, default=50, help="The many-step reference (iPNDM).")
    parser.add_argument(
        "--solvers", nargs="+", choices=sorted([*SOLVERS, *EXTRA_SAMPLERS]),
        default=["dpmsolver2", "ipndm", "ipndm_variable"],
    )
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--curvature_samples", type=int, default=500)
    parser.add_argument("--curvature_steps", type=int, default=64, help="Euler steps of the curvature trajectories.")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def split_dataset(args: argparse.Namespace, work_dir: Path):
    """A fixed train / held-out split; the training split is written as an image folder for train_qac.py."""
    dataset = load_image_dataset(args.dataset)
    split = dataset.train_test_split(test_size=args.holdout_fraction, seed=0, stratify_by_column="label")
    folder = work_dir / f"{args.dataset}-train"
    if not folder.is_dir():
        write_atomically(folder, lambda partial: save_images(split["train"], partial))
    return split["train"], split["test"], folder


def save_images(split, folder: Path) -> None:
    folder.mkdir(parents=True)
    for row in split:
        row["image"].save(folder / f"{row['example_index']:05d}.png")


def write_atomically(path: Path, write) -> None:
    """`write(partial)` to a file or folder beside `path`, then renamed to `path`: a kill never leaves a partial one,
    and a `write` that raises leaves nothing. A folder that a concurrent run put in place first is kept (ours is
    dropped); a file is replaced."""
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
    except BaseException:
        remove(partial)
        raise
    try:
        os.replace(partial, path)
    except OSError:
        if not path.is_dir():
            raise
        remove(partial)


def remove(path: Path) -> None:
    """Delete a file or a folder, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def to_tensor(dataset, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    transform = ImageTransform(resolution, channels=1, center_crop=True)
    images = torch.stack([transform.preprocess(image) for image in dataset["image"]])
    return images, torch.tensor(dataset["label"])


def cached(model_dir: Path, key: str, measure, *args):
    """`measure(*args)`, computed once per `key` and kept in the model's folder: a rerun skips what is measured."""
    path = model_dir / "benchmark_measurements.json"
    measurements = json.loads(path.read_text()) if path.is_file() else {}
    if key not in measurements:
        measurements[key] = measure(*args)
        write_atomically(path, lambda partial: partial.write_text(json.dumps(measurements, indent=1)))
    return measurements[key]


def train_models(args: argparse.Namespace, data_folder: Path, work_dir: Path) -> dict:
    """Train (or reuse) every (model, seed); returns the training images/s of each."""
    timings = {}
    for seed in args.seeds:
        for model in args.models:
            output_dir = work_dir / f"{model}-seed{seed}"
            train_model(args, data_folder, output_dir, seed, MODEL_FLAGS[model])
            timings[f"{model}-seed{seed}"] = {"images_per_second": images_per_second(output_dir)}
    return timings


def train_model(
    args: argparse.Namespace, data_folder: Path, output_dir: Path, seed: int, model_flags: list[str], env=None
) -> None:
    """One train_qac.py run with this benchmark's training settings and `model_flags`, unless already trained."""
    if (output_dir / "model_index.json").is_file():
        return
    command = [
        sys.executable, str(REPO_ROOT / "train_qac.py"), "--train_data_dir", str(data_folder),
        "--output_dir", str(output_dir), "--seed", str(seed), "--preset", args.preset,
        "--max_train_steps", str(args.max_train_steps), "--train_batch_size", str(args.train_batch_size),
        "--report_to", "none", "--validation_steps", str(args.max_train_steps),
        "--checkpointing_steps", str(args.checkpointing_steps or args.max_train_steps),
        "--checkpoints_total_limit", "1",
        "--fit_schedule_nfe",  # no fitted schedules: the solvers here run on the Karras schedule
    ]
    command += ["--resolution", str(args.resolution)] if args.resolution else []
    command += resume_flags(output_dir)
    command += model_flags
    print(f"Training {output_dir.name} ...", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    (output_dir / "benchmark_training_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}")


def images_per_second(output_dir: Path) -> float:
    """The median training images/s of a trained model, from its logs."""
    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return float(np.median([json.loads(line)["images_per_second"] for line in lines]))


def resume_flags(output_dir: Path) -> list[str]:
    """Continue a run killed after a checkpoint; a run killed before its first one starts anew."""
    if list_checkpoints(output_dir):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite_output_dir"] if output_dir.exists() else []


def sampler(name: str, model_dir: Path, pipe: QACPipeline, seed: int, config):
    """The scheduler `name` for the model in `model_dir`: one of `EXTRA_SAMPLERS`, else `solver_from_config`."""
    if name in EXTRA_SAMPLERS:
        return EXTRA_SAMPLERS[name](model_dir, pipe, seed)
    return solver_from_config(name, config)


@torch.no_grad()
def generate(pipe: QACPipeline, num_samples: int, nfe: int, seed: int, batch_size: int = 500) -> torch.Tensor:
    """`num_samples` images in [-1, 1], drawn in batches with one generator."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, num_samples, batch_size):
        size = min(batch_size, num_samples - start)
        images = pipe(batch_size=size, num_inference_steps=nfe, generator=generator, output_type="pt").images
        batches.append(images * 2 - 1)
    return torch.cat(batches)


def sampling_seed(seed: int) -> int:
    """The seed of the benchmark's samples of the model trained with `seed`: 1000 + `seed`."""
    return 1000 + seed


def sample_images(pipe, num_samples: int, nfe: int, seed: int) -> torch.Tensor:
    """The `num_samples` samples at `nfe` of the model trained with `seed`, drawn with `sampling_seed(seed)`."""
    return generate(pipe, num_samples, nfe, seed=sampling_seed(seed))


def sample_features(pipe, num_samples: int, nfe: int, seed: int, classifier) -> torch.Tensor:
    """The classifier features of `sample_images`."""
    return extract_features(classifier, sample_images(pipe, num_samples, nfe, seed))


def sample_frechet_distance(pipe, num_samples: int, nfe: int, seed: int, classifier, heldout_features) -> float:
    """FD of `num_samples` samples at `nfe`, drawn with `sampling_seed(seed)`, to the held-out features."""
    return frechet_distance(sample_features(pipe, num_samples, nfe, seed, classifier), heldout_features)


def evaluate_models(args, work_dir: Path, classifier, heldout_features) -> tuple[dict, dict]:
    """Frechet distances[solver][model][nfe] = list over seeds; and the code usage of each QAC model."""
    distances, usage = {}, {}
    nfes = sorted(set(args.nfe) | {args.reference_nfe})
    for seed in args.seeds:
        for model in args.models:
            model_dir = work_dir / f"{model}-seed{seed}"
            pipe = QACPipeline.from_pretrained(model_dir)
            pipe.set_progress_bar_config(disable=True)
            if pipe.encoder is not None:
                usage[f"{model}-seed{seed}"] = code_usage(pipe.encoder.code_weights)
            default_config = pipe.scheduler.config
            for solver in args.solvers:
                pipe.scheduler = sampler(solver, model_dir, pipe, seed, default_config)
                for nfe in nfes if solver == "ipndm" else args.nfe:
                    key = f"frechet_distance {solver} nfe {nfe} {args.num_samples} samples"
                    distance = cached(
                        model_dir, key, sample_frechet_distance, pipe, args.num_samples, nfe, seed, classifier,
                        heldout_features,
                    )
                    distances.setdefault(solver, {}).setdefault(model, {}).setdefault(str(nfe), []).append(distance)
                    print(f"seed {seed} {model:8s} {solver:15s} NFE {nfe:3d}: FD {distance:8.2f}", flush=True)
    return distances, usage


def straightness(args, work_dir: Path, heldout_images: torch.Tensor) -> dict:
    """Paper Table 1's columns for each model: trajectory curvature and L_CFM on the held-out images, per seed."""
    results = {model: {"curvature": [], "L_CFM": []} for model in args.models}
    for seed in args.seeds:
        for model in args.models:
            model_dir = work_dir / f"{model}-seed{seed}"
            key = f"straightness {args.curvature_samples} samples {args.curvature_steps} steps"
            curvature, loss = cached(model_dir, key, measure_straightness, args, model_dir, heldout_images, seed)
            results[model]["curvature"].append(curvature)
            results[model]["L_CFM"].append(loss)
            print(f"seed {seed} {model:8s} curvature {curvature:.4f} L_CFM {loss:.4f}", flush=True)
    return results


def measure_straightness(
    args, model_dir: Path, heldout_images: torch.Tensor, seed: int, noise_encoder=None
) -> tuple[float, float]:
    """Curvature and L_CFM of one model, with the same generator for both; L_CFM under `noise_encoder`'s coupling."""
    pipe = QACPipeline.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(2000 + seed)
    curvature = pipeline_curvature(pipe, args.curvature_samples, args.curvature_steps, generator=generator)
    loss = pipeline_conditional_flow_matching_loss(
        pipe, heldout_images, generator=generator, num_draws=4, noise_encoder=noise_encoder
    )
    return curvature, loss


def mean_std(values: list[float], decimals: int = 2) -> str:
    mean, std = np.mean(values), np.std(values)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}" if len(values) > 1 else f"{mean:.{decimals}f}"


def markdown_report(args, distances: dict, floor: float, usage: dict, timings: dict, straight: dict) -> str:
    lines = [
        f"# Few-step quality on {args.dataset}: QAC vs the unconditional baseline",
        "",
        f"Command: `{' '.join([f'python benchmarks/{Path(sys.argv[0]).name}', *sys.argv[1:]])}`",
        "",
        f"Both models: preset `{args.preset}`, {args.max_train_steps} steps at batch {args.train_batch_size}, seeds "
        f"{args.seeds}, trained on {1 - args.holdout_fraction:.0%} of the data. Frechet distance (FD, lower is "
        f"better) of {args.num_samples} samples to the held-out {args.holdout_fraction:.0%}, in the features of a "
        f"classifier trained on the training split; mean ± std over seeds. Real training split vs held-out: "
        f"{floor:.2f}.",
        "",
    ]
    for solver, by_model in distances.items():
        models = list(by_model)
        lines += [f"## {solver}", "", f"| NFE | {' | '.join(models)} |", "|---" * (len(models) + 1) + "|"]
        for nfe in by_model[models[0]]:
            lines.append(f"| {nfe} | {' | '.join(mean_std(by_model[model][nfe]) for model in models)} |")
        lines.append("")
    lines += [
        "## Straightness (paper Table 1's columns)", "",
        f"Curvature of {args.curvature_samples} Euler trajectories of {args.curvature_steps} steps (uniform in "
        "Rectified-Flow time) and L_CFM on the held-out images; mean ± std over seeds, lower is straighter.", "",
        "| model | curvature | L_CFM |", "|---|---|---|",
    ]
    lines += [f"| {model} | {mean_std(values['curvature'], 4)} | {mean_std(values['L_CFM'], 4)} |"
              for model, values in straight.items()]
    lines += ["", "## Code usage of the QAC models (EMA code weights)", "", "| run | codes used | perplexity | "
              "largest share | codes for half the weight |", "|---|---|---|---|---|"]
    for run, stats in usage.items():
        lines.append(f"| {run} | {stats['codes_used']} | {stats['perplexity']:.1f} | {stats['largest_share']:.3f} "
                     f"| {stats['codes_for_half_weight']} |")
    lines += ["", "## Training throughput (median images/s, this machine)", "", "| run | images/s |", "|---|---|"]
    lines += [f"| {run} | {timing['images_per_second']:.0f} |" for run, timing in timings.items()]
    return "\n".join(lines) + "\n"


def plot(distances: dict, floor: float, path: Path) -> None:
    figure, axes = plt.subplots(1, len(distances), figsize=(4.5 * len(distances), 3.6), squeeze=False)
    for axis, (solver, by_model) in zip(axes[0], distances.items()):
        for model, by_nfe in by_model.items():
            nfes = [int(nfe) for nfe in by_nfe]
            means = [np.mean(values) for values in by_nfe.values()]
            stds = [np.std(values) for values in by_nfe.values()]
            axis.errorbar(nfes, means, yerr=stds, marker="o", capsize=3, label=model)
        axis.axhline(floor, color="grey", linestyle=":", label="real vs held-out")
        axis.set(title=solver, xlabel="NFE", ylabel="Frechet distance", yscale="log", xscale="log")
        axis.set_xticks(nfes, [str(n) for n in nfes])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def sample_grids(args, work_dir: Path, path: Path) -> None:
    """Baseline and QAC samples side by side at the smallest NFE and at 6, same seed and noise."""
    rows = []
    for nfe in (min(args.nfe), 6):
        for model in args.models:
            pipe = QACPipeline.from_pretrained(work_dir / f"{model}-seed{args.seeds[0]}")
            pipe.set_progress_bar_config(disable=True)
            images = pipe(batch_size=16, num_inference_steps=nfe, generator=torch.Generator().manual_seed(0)).images
            rows.append(image_grid(images, tile_size=32, columns=16))
    canvas = PIL.Image.new("L", (rows[0].width, sum(row.height + 4 for row in rows)), color=255)
    for i, row in enumerate(rows):
        canvas.paste(row.convert("L"), (0, i * (row.height + 4)))
    canvas.save(path)


def main() -> None:
    args = parse_args()
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)
    work_dir.mkdir(parents=True, exist_ok=True), results_dir.mkdir(parents=True, exist_ok=True)
    train_split, heldout_split, data_folder = split_dataset(args, work_dir)
    timings = train_models(args, data_folder, work_dir)

    resolution = QACPipeline.from_pretrained(work_dir / f"{args.models[0]}-seed{args.seeds[0]}").image_shape[1]
    train_images, train_labels = to_tensor(train_split, resolution)
    heldout_images, heldout_labels = to_tensor(heldout_split, resolution)
    classifier = train_feature_classifier(train_images, train_labels, seed=0)
    accuracy = classifier.accuracy(heldout_images, heldout_labels)
    heldout_features = extract_features(classifier, heldout_images)
    floor = frechet_distance(extract_features(classifier, train_images), heldout_features)
    distances, usage = evaluate_models(args, work_dir, classifier, heldout_features)
    straight = straightness(args, work_dir, heldout_images)

    stem = results_dir / (args.results_name or f"few_step_quality_{args.dataset}")
    report = markdown_report(args, distances, floor, usage, timings, straight)
    report += f"\nFeature classifier accuracy on the held-out split: {accuracy:.3f}.\n"
    models = ", ".join(args.models)
    report += f"\n![FD against NFE]({stem.name}.png)\n\n![Samples: rows {models} at NFE {min(args.nfe)}, then " \
              f"at NFE 6]({stem.name}_samples.png)\n"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "frechet_distance": distances, "real_vs_heldout": floor, "code_usage": usage,
         "straightness": straight, "training": timings, "classifier_accuracy": accuracy}, indent=2))
    plot(distances, floor, stem.with_suffix(".png"))
    sample_grids(args, work_dir, Path(f"{stem}_samples.png"))
    print(report)


if __name__ == "__main__":
    main()
