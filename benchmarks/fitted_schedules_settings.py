"""What the fit's settings cost and buy: noise draws and search steps of `fit_schedules` on the digits models.

For each setting (draws of the search, its steps in log sigma) the schedules of one model are fitted at NFE 3-10
without the validation, and then scored on the same 1,024 fresh noise draws for every setting: the pixel Frechet
distance to the teacher (the fit's own criterion, out of sample) and the classifier FD of 2,000 samples to the
held-out split (the benchmark's measure, as in benchmarks/fitted_schedules.py). The validation's cost is measured once
per model and number of draws. Seconds are wall-clock on a possibly shared core; the UNet calls times the images per
call do not depend on the load.

    python benchmarks/fitted_schedules_settings.py --work_dir benchmarks/work --models qac-seed0 baseline-seed0

Writes benchmarks/results/fitted_schedules_settings.{md,json}; resumable (each model and setting written as it ends).
"""

import argparse
import json
import time
from pathlib import Path

import few_step_quality as few_step
import torch

from qac_diffusers import QACPipeline
from qac_diffusers.metrics import extract_features, train_feature_classifier
from qac_diffusers.schedulers.schedule_fitting import (
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_TEACHER_STEPS,
    WARM_START_DESCENT_BUDGET,
    ScheduleDistance,
    fit_schedules,
    validate_schedules,
)


# name: (search draws, log steps, search). The first five were measured when EDM's descent started from Karras
# alone (before the starts of stop 22, `karras_starts`), "six starts" with the starts of stop 22 (80 / 2 among them):
# their rows in the results are kept as measured then, and a rerun without the results would measure them with
# today's starts. The results also keep the row of stop 22's "select" search (removed at stop 23), stop 23's
# "bounded" (52 / NFE moves, no warm start) and stop 24's (with the warm start, by steps 0.5 then 0.2). "bounded" is
# the library's default search since stop 23; since stop 25 it moves by the smallest of the log steps only.
SETTINGS = {
    "64 draws, steps 0.5/0.2": (64, (0.5, 0.2), "descent"),
    "64 draws, steps 0.5/0.25/0.125": (64, (0.5, 0.25, 0.125), "descent"),
    "256 draws, steps 0.5/0.25/0.125": (256, (0.5, 0.25, 0.125), "descent"),
    "32 draws, steps 0.5/0.2": (32, (0.5, 0.2), "descent"),
    "32 draws, step 0.35": (32, (0.35,), "descent"),
    "64 draws, steps 0.5/0.2, six starts": (64, (0.5, 0.2), "descent"),
    "64 draws, bounded": (64, (0.5, 0.2), "bounded"),
}
NFES = list(range(3, 11))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qac-seed0", "baseline-seed0"])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--validation_samples", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--score_samples", type=int, default=1024)
    parser.add_argument("--num_samples", type=int, default=2000, help="Samples of each classifier FD.")
    parser.add_argument("--work_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--results_dir", default=str(few_step.REPO_ROOT / "benchmarks" / "results"))
    training = vars(few_step.build_parser().parse_args([]))
    return argparse.Namespace(**{**training, **vars(parser.parse_args())})


def fit_and_score(pipe: QACPipeline, seed: int, setting: str, score: ScheduleDistance, classifier, heldout) -> dict:
    draws, log_steps, search = SETTINGS[setting]
    started = time.perf_counter()
    fit = fit_schedules(pipe, NFES, num_samples=draws, search=search, log_steps=log_steps, validate=False,
                        generator=torch.Generator().manual_seed(seed), progress_bar=False)
    seconds = time.perf_counter() - started
    fitted = fit.scheduler.config.fitted_sigmas
    pipe.scheduler = fit.scheduler
    classifier_fd = {nfe: few_step.sample_frechet_distance(pipe, 2000, nfe, seed, classifier, heldout)
                     for nfe in NFES}
    return {"seconds": seconds, "model_calls": fit.num_model_calls, "images_denoised": fit.num_model_calls * draws,
            "fitted_sigmas": fitted, "pixel_fd": {nfe: score(sigmas) for nfe, sigmas in zip(NFES, fitted)},
            "classifier_fd": classifier_fd}


def validation_cost(pipe: QACPipeline, seed: int, draws: int, fitted_sigmas: list) -> dict:
    """The cost of `fit_schedules`' validation of `fitted_sigmas` on `draws` fresh draws (`validate_schedules`)."""
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    started = time.perf_counter()
    try:
        validate_schedules(pipe, fitted_sigmas, draws, DEFAULT_TEACHER_STEPS, torch.Generator().manual_seed(seed))
    finally:
        hook.remove()
    return {"seconds": time.perf_counter() - started, "model_calls": len(calls), "images_denoised": len(calls) * draws}


def markdown(results: dict) -> str:
    lines = ["# Fit settings: cost and quality (digits models, NFE 3-10, fit without validation)", "",
             "Command: `PYTHONPATH=. python benchmarks/fitted_schedules_settings.py --work_dir benchmarks/work` "
             "(models of benchmarks/few_step_quality.py). Seconds: the 64-draw steps 0.5/0.2 row and "
             "the 32-draw rows ran with one job per core, after the search began to score each schedule once (the "
             "schedules and FDs are the same as before, with 13% fewer calls); the 0.5/0.25/0.125 rows and "
             "the training on a core shared by three to five jobs. The first five settings were measured when EDM's "
             "descent started from Karras alone; \"six starts\" (stop 22's default descent) started from the "
             "closest of Karras and Karras after a first step to 80 / 2, 4, 8, 16, 32 (`karras_starts`), and "
             "\"select\" (stop 22's cheaper search, removed at stop 23) kept that closest start (and descended only "
             "where it got no closer with one more call); these two ran with one job per core. \"bounded\" (the "
             "default search since stop 23) descends from the closest of Karras, Karras after a first step to 80 / "
             "4, 8, 16, 32 and (since stop 24) the fit for one NFE fewer stretched to one more point, by steps of 0.2 "
             f"(since stop 25), and stops after {BOUNDED_DESCENT_BUDGET} / NFE moved schedules "
             f"({WARM_START_DESCENT_BUDGET} after the warm start; \"bounded at stop 23\": without the fit one below, "
             "52 / NFE everywhere, by steps 0.5 then 0.2; \"bounded at stop 24\": with it, by steps 0.5 then 0.2); "
             "these three ran alone on the machine.", "",
             "Pixel FD: distance to the teacher on 1,024 fresh draws (the fit's criterion, out of sample). Classifier "
             "FD: 2,000 samples vs the held-out split. Images denoised = UNet calls x images per call; training = "
             "steps x batch (forward and backward).", ""]
    for model, result in results.items():
        training_images = result["training_images"]
        lines += [f"## {model} (trained on {training_images} images in {result['training_seconds']:.0f} s)", "",
                  "| setting | seconds | images denoised | / training images | pixel FD NFE 3-10 | "
                  "classifier FD NFE 3-10 |",
                  "|---|---|---|---|---|---|"]
        formula = result["formula"]
        lines.append(f"| Karras (no fit) | | | | {' '.join(f'{v:.3g}' for v in formula['pixel_fd'].values())} | "
                     f"{' '.join(f'{v:.1f}' for v in formula['classifier_fd'].values())} |")
        for setting, fit in result["settings"].items():
            lines.append(
                f"| {setting} | {fit['seconds']:.0f} | {fit['images_denoised']} | "
                f"{fit['images_denoised'] / training_images:.3f} | "
                f"{' '.join(f'{v:.3g}' for v in fit['pixel_fd'].values())} | "
                f"{' '.join(f'{v:.1f}' for v in fit['classifier_fd'].values())} |"
            )
        for draws, cost in result["validation"].items():
            lines.append(f"| validation on {draws} draws | {cost['seconds']:.0f} | {cost['images_denoised']} | "
                         f"{cost['images_denoised'] / training_images:.3f} | | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    work_dir, results_dir = Path(args.work_dir), Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "fitted_schedules_settings.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    train_split, heldout_split, _ = few_step.split_dataset(args, work_dir)
    train_images, train_labels = few_step.to_tensor(train_split, 8)
    classifier = train_feature_classifier(train_images, train_labels, seed=0)
    heldout = extract_features(classifier, few_step.to_tensor(heldout_split, 8)[0])

    def save() -> None:
        few_step.write_atomically(path, lambda partial: partial.write_text(json.dumps(results, indent=1)))
        path.with_suffix(".md").write_text(markdown(results))

    for model in args.models:
        model_dir = work_dir / model
        seed = int(model.rsplit("seed", 1)[1])
        pipe = QACPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        karras = pipe.scheduler
        generator = torch.Generator().manual_seed(10_000)
        score = ScheduleDistance(pipe, args.score_samples, DEFAULT_TEACHER_STEPS, generator)
        result = results.setdefault(model, {
            "training_seconds": float((model_dir / "benchmark_training_seconds.txt").read_text()),
            "training_images": args.max_train_steps * args.train_batch_size, "settings": {}, "validation": {},
        })
        if "formula" not in result:
            pipe.scheduler = karras
            result["formula"] = {
                "pixel_fd": {nfe: score(score.formula_sigmas(nfe)) for nfe in NFES},
                "classifier_fd": {nfe: few_step.sample_frechet_distance(pipe, 2000, nfe, seed, classifier, heldout)
                                  for nfe in NFES},
            }
            save()
        for setting in args.settings:
            if setting not in result["settings"]:
                pipe.scheduler = karras
                result["settings"][setting] = fit_and_score(pipe, seed, setting, score, classifier, heldout)
                print(model, setting, result["settings"][setting]["seconds"], flush=True)
                save()
        fitted = next(iter(result["settings"].values()))["fitted_sigmas"]
        for draws in args.validation_samples:
            if str(draws) not in result["validation"]:
                result["validation"][str(draws)] = validation_cost(pipe, seed, draws, fitted)
                save()
    print(markdown(results))


if __name__ == "__main__":
    main()
