# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints and the output folder of train_qac.py.

A checkpoint is a folder `checkpoint-<step>` written by `accelerator.save_state` with hooks that store the trained
models in diffusers format (`unet/`, `encoder/`), their EMA copies with the code weights (`unet_ema/`,
`encoder_ema/`), and `training_state.json`: the configuration a resumed run must match and the facts of the
checkpoint's last step. It is written to a temporary folder and renamed, so a run killed mid-save keeps its last good
checkpoint. Anything else in the output folder (`checkpoint-best`, `checkpoint-40-backup`, a half-written
`.tmp-checkpoint-N`) is not one of ours and is ignored.

One output folder holds one run: a new run refuses a folder that holds another run's state unless told to overwrite
it, and a resumed run refuses a checkpoint written with another configuration.
"""

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from safetensors import SafetensorError

from ..models import FSQConditionEncoder, GaussianConditionEncoder, NoiseEncoder, QACUNet2DModel


CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
TRAINING_STATE_NAME = "training_state.json"
METRICS_NAME = "metrics.jsonl"
# The project name given to `accelerator.init_trackers`: TensorBoard writes its events in logging_dir/<this>.
TRACKER_PROJECT = "train_qac"
_CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")
# Flags that may change when a run is resumed: where its files go, how long it trains, how often it saves, validates
# and logs, whether it publishes, and how fast a step runs (memory format, compilation: the same computation up to
# rounding). Every other flag, the model and the data must match the checkpoint's.
# (`model_config` is a file name: the model it resolves to is compared instead.)
CHANGEABLE_ON_RESUME = frozenset({
    "output_dir", "logging_dir", "report_to", "cache_dir", "dataloader_num_workers", "model_config", "max_train_steps",
    "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "num_validation_images", "validation_nfe",
    "logging_steps", "channels_last", "torch_compile", "resume_from_checkpoint", "overwrite_output_dir", "dry_run",
    "push_to_hub", "fit_schedule_nfe", "fit_schedule_search", "fit_schedule_bounded_budget", "fit_schedule_samples",
    "fit_schedule_validation_samples",
})
# What the failure of a write looks like: OSError (no space left on device), torch.save's RuntimeError
# ("basic_ios::clear: iostream error", "unexpected pos"), safetensors' SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


# ----- finding checkpoints -------------------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder of ours (`checkpoint-<digits>` holding `unet/`), else None."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    if match is None or not (path / "unet").is_dir():
        return None
    return int(match.group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints of ours in `output_dir`, oldest first; other folders are ignored."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from, or None ('latest' with no checkpoint yet starts a new run)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if checkpoint_step(path) is None:
        raise ValueError(
            f"--resume_from_checkpoint {path} is not a checkpoint folder (a '{CHECKPOINT_PREFIX}N' folder written by "
            "this script). Pass one of those, or 'latest'."
        )
    return path


# ----- one run per output folder -------------------------------------------------------------------------------------
def _run_state(output_dir: Path, logging_dir: Path) -> list[Path]:
    """What shows that a run used these folders: its checkpoints, metrics log, saved pipeline and summary."""
    candidates = [output_dir / "model_index.json", output_dir / "training_summary.json", logging_dir / METRICS_NAME]
    return list_checkpoints(output_dir) + [path for path in candidates if path.is_file()]


def _run_outputs(output_dir: Path, logging_dir: Path) -> list[Path]:
    """Everything a run writes besides `training_config.json` (which every start rewrites), where present."""
    pipeline_index = output_dir / "model_index.json"
    components = []
    if pipeline_index.is_file():
        components = [name for name in json.loads(pipeline_index.read_text()) if not name.startswith("_")]
    temporary = list(output_dir.glob(f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}*"))
    names = [*components, "samples", "samples.png", "README.md"]
    others = [output_dir / name for name in names] + [logging_dir / TRACKER_PROJECT]
    return _run_state(output_dir, logging_dir) + temporary + [path for path in others if path.exists()]


def _names(paths: list[Path], output_dir: Path, most: int = 6) -> str:
    names = [str(path.relative_to(output_dir)) if path.is_relative_to(output_dir) else str(path) for path in paths]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_output_dir(output_dir: Path, logging_dir: Path, checkpoint: Path | None, overwrite: bool) -> list[Path]:
    r"""
    Refuse to mix two runs in one output folder.

    A run that resumes from a checkpoint inside `output_dir` continues that folder's run. Any other run (a new one, or
    one resuming from a checkpoint elsewhere) needs folders that hold no other run's state (checkpoints, metrics log,
    saved pipeline, summary), unless `overwrite`.

    Args:
        output_dir (`Path`): the run's output folder.
        logging_dir (`Path`): the folder of its metrics log and TensorBoard events.
        checkpoint (`Path`, *optional*): the checkpoint the run resumes from.
        overwrite (`bool`): `--overwrite_output_dir`.

    Returns:
        `list[Path]`: the previous run's files and folders, which the caller removes before training (with
        [`remove_previous_run`]) once every check has passed; empty when there is nothing to remove.
    """
    if checkpoint is not None and checkpoint.resolve().parent == output_dir.resolve():
        if overwrite:
            raise ValueError(
                f"--overwrite_output_dir would delete {checkpoint}, which --resume_from_checkpoint resumes from: "
                "pass one of the two flags."
            )
        return []
    state = _run_state(output_dir, logging_dir)
    if not state:
        return []
    if not overwrite:
        checkpoints = list_checkpoints(output_dir)
        resume = (
            f"--resume_from_checkpoint latest to continue it (from {checkpoints[-1].name}), " if checkpoints else ""
        )
        raise ValueError(
            f"{output_dir} holds another run's state ({_names(state, output_dir)}); a new run there would mix with "
            f"it. Pass {resume}--overwrite_output_dir to remove it and start anew, or another --output_dir."
        )
    return _run_outputs(output_dir, logging_dir)


def remove_previous_run(paths: list[Path]) -> None:
    """Delete what [`check_output_dir`] returned (call it on the main process only)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ----- the configuration a resumed run must match --------------------------------------------------------------------
def resume_config(args: dict, model_config: dict, data: dict, setup: dict) -> dict:
    """
    The configuration that a checkpoint records and a run resuming from it must match, as JSON values: the flags
    (except `CHANGEABLE_ON_RESUME` and the Hub's), the resolved model, facts of the data (size, channels) and of the
    setup (number of processes, the mixed precision really used).
    """
    kept = {key: value for key, value in sorted(args.items())
            if key not in CHANGEABLE_ON_RESUME and not key.startswith("hub_")}
    config = {"args": kept, "model": model_config, "data": data, "setup": setup}
    return json.loads(json.dumps(config, default=str))


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(saved: dict, current: dict) -> list[str]:
    saved, current = _flatten(saved), _flatten(current)
    absent = "(not set)"
    return [
        f"{key} is {saved.get(key, absent)!r} in the checkpoint, {current.get(key, absent)!r} now"
        for key in sorted(saved.keys() | current.keys())
        if saved.get(key, absent) != current.get(key, absent)
    ]


def read_training_state(checkpoint: Path) -> dict:
    """The `training_state.json` of a checkpoint: {"resume_config": ..., "last_step": the facts of its last step}."""
    path = checkpoint / TRAINING_STATE_NAME
    if not path.is_file():
        raise ValueError(
            f"{checkpoint} has no {TRAINING_STATE_NAME} (an older train_qac.py wrote it), so nothing shows that it "
            "belongs to this run's configuration. Start a new run: --overwrite_output_dir, or another --output_dir."
        )
    return json.loads(path.read_text())


def check_resumable(checkpoint: Path, config: dict, max_train_steps: int) -> None:
    """Refuse a checkpoint written with another configuration (naming every difference), or past the last step."""
    differences = _differences(read_training_state(checkpoint)["resume_config"], config)
    if differences:
        raise ValueError(
            f"{checkpoint} was written by a run with another configuration: {'; '.join(differences)}. Resume with "
            "the checkpoint's settings, or start a new run with --overwrite_output_dir or another --output_dir."
        )
    step = checkpoint_step(checkpoint)
    if step > max_train_steps:
        raise ValueError(
            f"{checkpoint} is at step {step}, past --max_train_steps {max_train_steps}: the saved model would not be "
            f"the one asked for. Pass --max_train_steps {step} or more, or resume from an earlier checkpoint."
        )


# ----- writing and reading -------------------------------------------------------------------------------------------
def _component_name(model) -> str:
    if isinstance(model, NoiseEncoder):
        return "noise_encoder"
    return "encoder" if isinstance(model, (FSQConditionEncoder, GaussianConditionEncoder)) else "unet"


def register_checkpoint_hooks(
    accelerator: Accelerator, ema_unet: QACUNet2DModel, ema_encoder: FSQConditionEncoder | None
) -> None:
    """Make `save_state` / `load_state` store the models and their EMA copies in diffusers format."""

    def save_models(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                model.save_pretrained(os.path.join(output_dir, _component_name(model)))
                weights.pop()
            ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if ema_encoder is not None:
                ema_encoder.save_pretrained(os.path.join(output_dir, "encoder_ema"))

    def load_models(models, input_dir):
        while models:
            model = models.pop()
            loaded = type(model).from_pretrained(input_dir, subfolder=_component_name(model))
            model.load_state_dict(loaded.state_dict())
        ema_unet.load_state_dict(QACUNet2DModel.from_pretrained(input_dir, subfolder="unet_ema").state_dict())
        if ema_encoder is not None:
            loaded = type(ema_encoder).from_pretrained(input_dir, subfolder="encoder_ema")
            ema_encoder.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_models)
    accelerator.register_load_state_pre_hook(load_models)


@contextlib.contextmanager
def explained_write_failure(what: str, where: Path, last_checkpoint: Path | None, remove: bool) -> Iterator[None]:
    """
    Turn a failed write (a full disk shows up as torch's "basic_ios::clear: iostream error") into an `OSError` that
    says what failed, where, how much space was free, and which checkpoint is intact; `remove` deletes `where`.
    """
    try:
        yield
    except WRITE_ERRORS as error:
        existing = next(path for path in (where, *where.parents) if path.exists())
        free_mib = shutil.disk_usage(existing).free / 2**20
        if remove:
            shutil.rmtree(where, ignore_errors=True)
        intact = (
            f"The last good checkpoint, {last_checkpoint}, is intact: free space, then rerun with "
            "--resume_from_checkpoint latest."
            if last_checkpoint is not None else "No checkpoint had been written yet."
        )
        raise OSError(
            f"Writing {what} to {where} failed: the disk is full or the write failed ({type(error).__name__}: "
            f"{error}; {free_mib:.0f} MiB free on that disk). {'The partial folder was removed. ' if remove else ''}"
            f"{intact}"
        ) from error


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, training_state: dict, total_limit: int | None
) -> Path:
    """
    Save the accelerator's state as `output_dir/checkpoint-<step>` with `training_state` as `training_state.json`:
    written to a temporary folder, then renamed, so that a run killed mid-save keeps its last good checkpoint. Only the
    newest `total_limit` checkpoints are kept. Returns the checkpoint folder.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{TEMPORARY_PREFIX}{final.name}"
    previous = list_checkpoints(output_dir)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    with explained_write_failure(f"checkpoint {final.name}", temporary, previous[-1] if previous else None, True):
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            (temporary / TRAINING_STATE_NAME).write_text(json.dumps(training_state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, metrics_file: Path) -> dict:
    """
    Load a checkpoint into the accelerator (models, EMA copies, optimizer, learning rate, random states); the metrics
    log forgets the steps after it, which are trained again. Returns its `training_state.json`.
    """
    accelerator.load_state(str(checkpoint))
    step = checkpoint_step(checkpoint)
    if accelerator.is_main_process and metrics_file.is_file():
        lines = metrics_file.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    return read_training_state(checkpoint)
