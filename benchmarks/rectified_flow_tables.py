"""The paper's rectified-flow tables (1-5) re-measured on the embedded digits, with the paper's numbers beside ours.

Every row is a train_qac.py run with --formulation rectified_flow and the same tiny UNet, data split, steps and seed
(3 seeds); only the condition encoder and the noise encoder change. Frechet distances (FD) are measured as
benchmarks/few_step_quality.py measures them: samples against the held-out split in the features of a classifier
trained on the training split. Solvers: diffusers' FlowMatchEuler / FlowMatchHeun schedulers on RNE's grids (Heun's
NFE counted as RNE counts it) and scipy's RK45 with RNE's tolerances (its NFE reported).

    python benchmarks/rectified_flow_tables.py --jobs 2          # all five tables, two trainings at a time
    python benchmarks/rectified_flow_tables.py --tables 3        # one table (trains only the models it needs)

Each table is written to benchmarks/results/rectified_flow_tables.{md,json} (and its plot) as soon as it is measured;
a rerun resumes: trained models, checkpoints and every measurement kept beside its model are reused.
"""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import few_step_quality as few_step  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qac_diffusers import QACPipeline  # noqa: E402
from qac_diffusers.metrics import extract_features, frechet_distance, train_feature_classifier  # noqa: E402
from qac_diffusers.models import NoiseEncoder  # noqa: E402
from qac_diffusers.training.checkpoints import list_checkpoints  # noqa: E402
from qac_diffusers.training.code_usage import offline_code_weights  # noqa: E402
from qac_diffusers.training.presets import PRESETS  # noqa: E402


sys.path.insert(0, str(few_step.REPO_ROOT))
import train_qac  # noqa: E402


RECTIFIED_FLOW = ["--formulation", "rectified_flow"]
# The models of the tables, each a train_qac.py run with these flags. "qac" is FSQ with L = 2, d = 12: the paper's
# MNIST setting, and 2^12 codes against 1,257 training images.
MODEL_FLAGS = {
    "rectified_flow": [*RECTIFIED_FLOW, "--condition", "none"],
    "rne": [*RECTIFIED_FLOW, "--condition", "none", "--noise_encoder", "own"],
    "qac": [*RECTIFIED_FLOW, "--code_dim", "12"],
    "rne_qac": [*RECTIFIED_FLOW, "--code_dim", "12", "--noise_encoder", "shared"],
    "vae": [*RECTIFIED_FLOW, "--condition", "gaussian", "--code_dim", "12"],
    "fsq_L8_d4": [*RECTIFIED_FLOW, "--code_levels", "8", "--code_dim", "4"],
    "fsq_L4_d6": [*RECTIFIED_FLOW, "--code_levels", "4", "--code_dim", "6"],
    **{f"fsq_L2_d{d}": [*RECTIFIED_FLOW, "--code_dim", str(d)] for d in (6, 8, 10, 16, 20)},
}
# Not trained: the "qac" model with offline code weights (paper Table 2), made from it after training.
OFFLINE = "qac_offline"


@dataclass
class Table:
    """One of the paper's tables: its rows (label -> model), its columns and the paper's values (label -> column)."""

    title: str
    rows: dict[str, str]
    columns: list[str]
    paper: dict[str, dict[str, float]] = field(default_factory=dict)
    paper_note: str = ""


TABLES = {
    1: Table(
        "Table 1: rectified flow vs RNE vs adaptive condition",
        {"Rectified flow": "rectified_flow", "RNE": "rne", "Adaptive condition (QAC)": "qac"},
        ["L_CFM", "curvature", "heun 5", "rk45", "rk45 NFE"],
        {
            "Rectified flow": {"L_CFM": 0.176, "curvature": 0.46, "heun 5": 37.19, "rk45": 2.66},
            "RNE": {"L_CFM": 0.153, "curvature": 0.38, "heun 5": 24.54, "rk45": 2.45},
            "Adaptive condition (QAC)": {"L_CFM": 0.132, "curvature": 0.40, "heun 5": 19.68, "rk45": 2.43},
        },
        "CIFAR-10 FID, 15M training images, beta = 20.",
    ),
    2: Table(
        "Table 2: online vs offline code weights",
        {"online (EMA during training)": "qac", "offline (count under the final EMA encoder)": OFFLINE},
        ["heun 5", "heun 9", "rk45", "rk45 NFE"],
        paper_note="The table's numbers are lost in our text of the paper (CIFAR-10, 2^20 codes); its text says the "
        "online weights are significantly better, both at few-step Heun and with RK45.",
    ),
    3: Table(
        "Table 3: condition encoders",
        {
            "w/o condition": "rectified_flow", "VAE (KL weight 1)": "vae", "FSQ (L=8, d=4)": "fsq_L8_d4",
            "FSQ (L=4, d=6)": "fsq_L4_d6", "FSQ (L=2, d=12)": "qac",
        },
        ["euler 4", "euler 16", "heun 9"],
        {
            "w/o condition": {"euler 4": 31.67, "euler 16": 11.16, "heun 9": 12.92},
            "VAE (KL weight 1)": {"euler 4": 10.75, "euler 16": 5.63, "heun 9": 12.23},
            "FSQ (L=8, d=4)": {"euler 4": 8.50, "euler 16": 1.81, "heun 9": 11.07},
            "FSQ (L=4, d=6)": {"euler 4": 7.49, "euler 16": 1.71, "heun 9": 10.85},
            "FSQ (L=2, d=12)": {"euler 4": 6.36, "euler 16": 1.19, "heun 9": 10.83},
        },
        "Euler columns: MNIST FID; Heun 9: CIFAR-10 FID. The paper's VAE row is at its 'optimal weight'; ours is not "
        "tuned (KL weight 1).",
    ),
    4: Table(
        "Table 4: codebook size",
        {
            "w/o a codebook": "rectified_flow", "2^6": "fsq_L2_d6", "2^8": "fsq_L2_d8", "2^10": "fsq_L2_d10",
            "2^12": "qac", "2^16": "fsq_L2_d16", "2^20": "fsq_L2_d20",
        },
        ["heun 5", "heun 7", "heun 9"],
        {
            "w/o a codebook": {"heun 5": 37.19, "heun 7": 18.60, "heun 9": 12.92},
            "2^12": {"heun 5": 21.86, "heun 7": 13.78, "heun 9": 10.83},
            "2^16": {"heun 5": 20.18, "heun 7": 13.22, "heun 9": 10.60},
            "2^20": {"heun 5": 19.68, "heun 7": 13.11, "heun 9": 10.28},
        },
        "CIFAR-10 FID (the paper has no rows below 2^12). The middle column's header is lost in our text of the "
        "paper; we read it as 7 NFE, between 5 and 9.",
    ),
    5: Table(
        "Table 5: RNE and QAC together",
        {"Rectified flow": "rectified_flow", "w/ RNE only": "rne", "w/ QAC only": "qac", "w/ RNE & QAC": "rne_qac"},
        ["heun 5", "heun 7", "heun 9"],
        {
            "Rectified flow": {"heun 5": 37.19, "heun 7": 18.60, "heun 9": 12.92},
            "w/ RNE only": {"heun 5": 24.54, "heun 7": 13.99, "heun 9": 10.21},
            "w/ QAC only": {"heun 5": 19.68, "heun 7": 13.11, "heun 9": 10.28},
            "w/ RNE & QAC": {"heun 5": 18.20, "heun 7": 12.11, "heun 9": 9.58},
        },
        "CIFAR-10 FID; the middle column read as 7 NFE (see Table 4).",
    ),
}
# The options a table's numbers depend on, saved with each table (a rerun of other tables may use others).
TABLE_SETTINGS = ("seeds", "max_train_steps", "train_batch_size", "num_samples", "rk45_batch_size",
                  "curvature_samples", "curvature_steps")
# Lower is better in every column but the reference solver's NFE.
RANKED_COLUMNS = ("L_CFM", "curvature", "euler", "heun", "rk45")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = few_step.build_parser(__doc__)
    parser.add_argument("--tables", type=int, nargs="+", choices=sorted(TABLES), default=[1, 5, 3, 2, 4],
                        help="In this order; each is written as soon as it is measured.")
    parser.add_argument("--jobs", type=int, default=1, help="Trainings run at a time, one thread each when > 1.")
    parser.add_argument("--rk45_batch_size", type=int, default=500, help="Samples per RK45 solve.")
    # its own work dir: few_step_quality.py's holds EDM models under the same names ("qac-seed0")
    parser.set_defaults(max_train_steps=1200, results_name="rectified_flow_tables",
                        work_dir=str(few_step.REPO_ROOT / "benchmarks" / "work-rectified-flow"))
    return parser.parse_args(argv)


def models_of(table_numbers: list[int]) -> list[str]:
    """The trained models the tables need, in first-use order (the offline-weights model is made, not trained)."""
    models = [model for number in table_numbers for model in TABLES[number].rows.values()]
    models = ["qac" if model == OFFLINE else model for model in models]
    return list(dict.fromkeys(models))


def train_all(args, models: list[str], data_folder: Path, work_dir: Path) -> None:
    """Every (model, seed) not yet trained, `args.jobs` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if args.jobs > 1 else None
    runs = [(model, seed) for model in models for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trainings = [
            pool.submit(few_step.train_model, args, data_folder, work_dir / f"{model}-seed{seed}", seed,
                        MODEL_FLAGS[model], env)
            for model, seed in runs
        ]
        try:
            for training in trainings:
                training.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the queued trainings would run before the error is raised
            raise
    for model, seed in runs:
        check_reused_model(args, work_dir / f"{model}-seed{seed}", MODEL_FLAGS[model])


def check_reused_model(args, model_dir: Path, model_flags: list[str]) -> None:
    """Refuse a model folder trained with other flags or settings (e.g. another benchmark's model of the same name)."""
    trained = json.loads((model_dir / "training_config.json").read_text())["args"]
    expected = vars(train_qac.parse_args([*model_flags, "--max_train_steps", str(args.max_train_steps),
                                          "--train_batch_size", str(args.train_batch_size)]))
    keys = ("formulation", "condition", "code_dim", "code_levels", "noise_encoder", "max_train_steps",
            "train_batch_size")
    differing = {key: (trained.get(key), expected[key]) for key in keys if trained.get(key) != expected[key]}
    if differing:
        raise ValueError(
            f"{model_dir} was trained with other settings than this benchmark asks for ({{flag: (trained, asked)}}: "
            f"{differing}): pass another --work_dir, or delete the folder to train it anew."
        )


def make_offline_model(work_dir: Path, seed: int, train_images: torch.Tensor) -> None:
    """The "qac" model of `seed` with its online code weights replaced by the offline ones (paper section 3.3)."""
    folder = work_dir / f"{OFFLINE}-seed{seed}"
    if (folder / "model_index.json").is_file():
        return
    pipe = QACPipeline.from_pretrained(work_dir / f"qac-seed{seed}")
    weights = offline_code_weights(pipe.encoder.eval(), train_images.split(256))
    pipe.encoder.code_weights.copy_(weights)
    pipe.save_pretrained(folder)


def trained_noise_encoder(model_dir: Path) -> NoiseEncoder | None:
    """
    RNE's q(z | x) of a model trained with `--noise_encoder own`, from the checkpoint of its last step (trained
    weights: train_qac.py keeps no EMA of it, and the pipeline none at all, since sampling draws z ~ N(0, I)), for
    L_CFM under the coupling it was trained on; else None.
    """
    config = json.loads((model_dir / "training_config.json").read_text())
    if config["args"].get("noise_encoder") != "own":
        return None
    checkpoint = model_dir / f"checkpoint-{config['args']['max_train_steps']}"
    if checkpoint not in list_checkpoints(model_dir):
        raise FileNotFoundError(f"{checkpoint} is missing: the noise encoder is only saved in checkpoints.")
    return NoiseEncoder.from_pretrained(checkpoint / "noise_encoder")


@torch.no_grad()
def rk45_frechet_distance(pipe, args, seed: int, classifier, heldout_features) -> list[float]:
    """[FD, mean NFE per solve] of `args.num_samples` RK45 samples, drawn with `few_step.sampling_seed(seed)`."""
    generator = torch.Generator().manual_seed(few_step.sampling_seed(seed))
    batches, nfes = [], []
    for start in range(0, args.num_samples, args.rk45_batch_size):
        size = min(args.rk45_batch_size, args.num_samples - start)
        output, nfe = pipe.sample_reference(batch_size=size, generator=generator, output_type="pt")
        batches.append(output.images * 2 - 1)
        nfes.append(nfe)
    samples = torch.cat(batches)
    return [frechet_distance(extract_features(classifier, samples), heldout_features), float(np.mean(nfes))]


def measure(args, model_dir: Path, seed: int, column: str, classifier, heldout_features, heldout_images) -> float:
    """One cell of a table for one model and seed, measured once and kept in the model's folder."""
    if column in ("L_CFM", "curvature"):
        noise_encoder = trained_noise_encoder(model_dir)
        key = f"straightness {args.curvature_samples} samples {args.curvature_steps} steps"
        key += " L_CFM under the RNE coupling" if noise_encoder is not None else ""
        curvature, loss = few_step.cached(
            model_dir, key, few_step.measure_straightness, args, model_dir, heldout_images, seed, noise_encoder
        )
        return loss if column == "L_CFM" else curvature
    if column.startswith("rk45"):
        key = f"frechet_distance rk45 {args.num_samples} samples {args.rk45_batch_size} per solve"
        distance, nfe = few_step.cached(
            model_dir, key, lambda: rk45_frechet_distance(loaded(model_dir), args, seed, classifier, heldout_features)
        )
        return nfe if column == "rk45 NFE" else distance
    solver, nfe = column.split()
    key = f"frechet_distance {solver} nfe {nfe} {args.num_samples} samples"
    return few_step.cached(
        model_dir, key, lambda: few_step.sample_frechet_distance(
            loaded(model_dir, solver), args.num_samples, int(nfe), seed, classifier, heldout_features
        ),
    )


def loaded(model_dir: Path, solver: str | None = None) -> QACPipeline:
    """The pipeline in `model_dir` (with the formulation's `solver`): loaded only for a value not yet cached."""
    pipe = QACPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if solver is not None:
        pipe.scheduler = pipe.formulation.solver(solver)
    return pipe


def measure_table(args, table: Table, work_dir: Path, classifier, heldout_features, heldout_images) -> dict:
    """values[row label][column] = list over seeds."""
    values = {}
    for label, model in table.rows.items():
        for column in table.columns:
            for seed in args.seeds:
                value = measure(
                    args, work_dir / f"{model}-seed{seed}", seed, column, classifier, heldout_features, heldout_images
                )
                values.setdefault(label, {}).setdefault(column, []).append(value)
            print(f"{table.title[:8]} {label:45s} {column:10s} {few_step.mean_std(values[label][column])}", flush=True)
    return values


def ordering(values: dict[str, dict[str, list[float]]], column: str) -> str:
    """The rows from best (lowest mean) to worst, as 'a < b < c'."""
    means = {label: np.mean(by_column[column]) for label, by_column in values.items() if column in by_column}
    return " < ".join(sorted(means, key=means.get))


def markdown_table(number: int, table: Table, values: dict, settings: dict) -> str:
    """Ours (mean ± std over seeds) beside the paper's, then the orderings of both per column."""
    paper_columns = [column for column in table.columns if any(column in row for row in table.paper.values())]
    header = ["row", *table.columns, *[f"paper: {column}" for column in paper_columns]]
    measured_with = ", ".join(f"{key} {settings[key]}" for key in TABLE_SETTINGS if key in settings)
    lines = [f"## {table.title}", "", f"Measured with: {measured_with}.", "", f"| {' | '.join(header)} |",
             "|---" * len(header) + "|"]
    for label, by_column in values.items():
        decimals = {"L_CFM": 4, "curvature": 4, "rk45 NFE": 0}
        ours = [few_step.mean_std(by_column[column], decimals.get(column, 2)) for column in table.columns]
        paper = [str(table.paper.get(label, {}).get(column, "")) for column in paper_columns]
        lines.append(f"| {' | '.join([label, *ours, *paper])} |")
    lines += ["", f"Paper: {table.paper_note}" if table.paper_note else "", ""]
    for column in table.columns:
        if not column.startswith(RANKED_COLUMNS) or column == "rk45 NFE":
            continue
        line = f"- {column}, best first: ours {ordering(values, column)}"
        paper_rows = {label: {column: [row[column]]} for label, row in table.paper.items() if column in row}
        lines.append(line + (f"; paper {ordering(paper_rows, column)}" if len(paper_rows) > 1 else ""))
    return "\n".join([*lines, "", f"![{table.title}](rectified_flow_table{number}.png)", ""])


def plot_table(number: int, table: Table, values: dict, path: Path) -> None:
    """One panel per column, one bar per row (mean, std as error bar)."""
    columns = [column for column in table.columns if column != "rk45 NFE"]
    figure, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.4), squeeze=False)
    labels = list(values)
    for axis, column in zip(axes[0], columns):
        means = [np.mean(values[label][column]) for label in labels]
        stds = [np.std(values[label][column]) for label in labels]
        axis.bar(range(len(labels)), means, yerr=stds, capsize=3, color=plt.cm.tab10(np.arange(len(labels))))
        axis.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
        axis.set_title("FD, " + column if column.startswith(("euler", "heun", "rk45")) else column, fontsize=9)
    figure.suptitle(f"{table.title} (digits, mean ± std over seeds)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    args, results: dict, settings: dict, commands: list[str], floor: float, accuracy: float, results_dir: Path
) -> None:
    """The markdown of every table measured so far (this run's and earlier runs'), and the JSON behind it."""
    stem = results_dir / args.results_name
    lines = [
        "# The paper's rectified-flow tables on the digits", "",
        "Commands, in the order they ran (each run adds or remeasures its `--tables` in this file):", "",
        *[f"    {command}" for command in commands], "",
        f"Every row: `train_qac.py --formulation rectified_flow`, preset `{args.preset}`, {args.max_train_steps} "
        f"steps at batch {args.train_batch_size}, seeds {args.seeds}, trained on {1 - args.holdout_fraction:.0%} of "
        f"the digits; the rows differ only in their condition and noise encoders. FD (lower is better) of "
        f"{args.num_samples} samples to the held-out split in the features of a classifier trained on the training "
        f"split (held-out accuracy {accuracy:.3f}); real training split vs held-out: {floor:.2f}. Mean ± std over "
        f"seeds. Euler N and Heun N: N UNet calls on RNE's grids (Heun: (N + 1) / 2 steps, the last one Euler); "
        f"RK45: scipy, rtol = atol = 1e-5, from t = 1 to 1e-3, {args.rk45_batch_size} samples per solve, its mean "
        f"NFE per solve reported. L_CFM on the held-out images (RNE: under its trained coupling z ~ q(z | x), "
        f"the noise encoder of its last checkpoint; the others: z ~ N(0, I)) and curvature of "
        f"{args.curvature_samples} Euler trajectories of {args.curvature_steps} steps from z ~ N(0, I), as every "
        f"model samples. The paper's numbers are CIFAR-10 or MNIST FIDs at a far larger scale: "
        f"compare orderings, not values.", "",
    ]
    for number in sorted(results, key=int):
        table = TABLES[int(number)]
        lines.append(markdown_table(int(number), table, results[number], settings.get(number, vars(args))))
        plot_table(int(number), table, results[number], results_dir / f"rectified_flow_table{number}.png")
    stem.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)
    work_dir.mkdir(parents=True, exist_ok=True), results_dir.mkdir(parents=True, exist_ok=True)
    train_split, heldout_split, data_folder = few_step.split_dataset(args, work_dir)
    resolution = args.resolution or PRESETS[args.preset]["resolution"]
    train_images, train_labels = few_step.to_tensor(train_split, resolution)
    heldout_images, heldout_labels = few_step.to_tensor(heldout_split, resolution)
    classifier = train_feature_classifier(train_images, train_labels, seed=0)
    accuracy = classifier.accuracy(heldout_images, heldout_labels)
    heldout_features = extract_features(classifier, heldout_images)
    floor = frechet_distance(extract_features(classifier, train_images), heldout_features)

    json_path = (results_dir / args.results_name).with_suffix(".json")
    saved = json.loads(json_path.read_text()) if json_path.is_file() else {"tables": {}}
    command = " ".join([f"python benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    saved["commands"] = [*saved.get("commands", []), command]
    for number in args.tables:  # table by table, so that a run stopped early leaves its first tables written
        train_all(args, models_of([number]), data_folder, work_dir)
        if number == 2:
            for seed in args.seeds:
                make_offline_model(work_dir, seed, train_images)
        values = measure_table(args, TABLES[number], work_dir, classifier, heldout_features, heldout_images)
        saved["tables"][str(number)] = values
        saved.setdefault("table_settings", {})[str(number)] = {key: vars(args)[key] for key in TABLE_SETTINGS}
        saved.update(args=vars(args), real_vs_heldout=floor, classifier_accuracy=accuracy)
        few_step.write_atomically(json_path, lambda partial: partial.write_text(json.dumps(saved, indent=1)))
        write_report(args, saved["tables"], saved["table_settings"], saved["commands"], floor, accuracy, results_dir)
    print((results_dir / args.results_name).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
