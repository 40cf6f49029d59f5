"""Checkpoint I/O of train_qac.py without training: what counts as a checkpoint, output folders, resume checks."""

import json
import re
from pathlib import Path

import pytest

from qac_diffusers.training.checkpoints import (
    TRAINING_STATE_NAME,
    check_output_dir,
    check_resumable,
    explained_write_failure,
    list_checkpoints,
    resolve_checkpoint,
    resume_config,
)


ARGS = {"learning_rate": 2e-3, "seed": 0, "max_train_steps": 20, "output_dir": "a", "hub_model_id": None}
MODEL = {"resolution": 8, "unet": {"block_out_channels": (32, 64), "dropout": 0.0}}
DATA = {"images": 1797, "channels": 1}
SETUP = {"num_processes": 1, "mixed_precision": "no"}


def make_checkpoint(folder: Path, config: dict | None = None) -> Path:
    (folder / "unet").mkdir(parents=True)
    if config is not None:
        (folder / TRAINING_STATE_NAME).write_text(json.dumps({"resume_config": config, "last_step": {}}))
    return folder


def test_only_our_checkpoints_count(tmp_path):
    for name in ("checkpoint-3", "checkpoint-12", "checkpoint-40-backup", "checkpoint-best", ".tmp-checkpoint-20"):
        make_checkpoint(tmp_path / name)
    (tmp_path / "checkpoint-7").mkdir()  # no unet/: not written by train_qac.py
    (tmp_path / "checkpoint-50").write_text("a file")
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-12"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-12"


def test_a_folder_that_is_not_our_checkpoint_cannot_be_resumed(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        resolve_checkpoint(str(make_checkpoint(tmp_path / "checkpoint-best")), tmp_path)


def test_latest_without_checkpoints_starts_a_new_run(tmp_path):
    assert resolve_checkpoint("latest", tmp_path / "missing") is None


def test_a_new_run_refuses_a_folder_with_another_runs_metrics(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=re.escape("holds another run's state (logs/metrics.jsonl)")):
        check_output_dir(tmp_path, tmp_path / "logs", None, overwrite=False)


def test_overwrite_never_deletes_the_checkpoint_being_resumed(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="would delete .*checkpoint-4"):
        check_output_dir(tmp_path, tmp_path / "logs", checkpoint, overwrite=True)


def test_a_folder_with_only_foreign_files_is_free(tmp_path):
    make_checkpoint(tmp_path / "checkpoint-best")
    (tmp_path / "notes.txt").write_text("mine")
    assert check_output_dir(tmp_path, tmp_path / "logs", None, overwrite=False) == []


def test_resuming_lists_every_configuration_difference(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-20", resume_config(ARGS, MODEL, DATA, SETUP))
    other_model = {"resolution": 8, "unet": {"block_out_channels": (32, 64), "dropout": 0.1}}
    with pytest.raises(ValueError) as error:
        check_resumable(checkpoint, resume_config({**ARGS, "learning_rate": 1e-3}, other_model, DATA, SETUP), 20)
    message = str(error.value)
    assert "args.learning_rate is 0.002 in the checkpoint, 0.001 now" in message
    assert "model.unet.dropout is 0.0 in the checkpoint, 0.1 now" in message
    assert "seed" not in message


def test_resuming_may_change_where_and_how_long(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-20", resume_config(ARGS, MODEL, DATA, SETUP))
    moved = {**ARGS, "max_train_steps": 40, "output_dir": "b", "hub_model_id": "me/model"}
    check_resumable(checkpoint, resume_config(moved, MODEL, DATA, SETUP), 40)


def test_a_checkpoint_past_the_last_step_is_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-20", resume_config(ARGS, MODEL, DATA, SETUP))
    with pytest.raises(ValueError, match="at step 20, past --max_train_steps 10"):
        check_resumable(checkpoint, resume_config({**ARGS, "max_train_steps": 10}, MODEL, DATA, SETUP), 10)


def test_a_checkpoint_without_its_configuration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no training_state.json"):
        check_resumable(make_checkpoint(tmp_path / "checkpoint-20"), resume_config(ARGS, MODEL, DATA, SETUP), 20)


def test_a_failed_write_says_where_and_what_is_intact(tmp_path):
    partial = tmp_path / ".tmp-checkpoint-2"
    partial.mkdir()
    with pytest.raises(OSError) as error:
        with explained_write_failure("checkpoint checkpoint-2", partial, tmp_path / "checkpoint-1", remove=True):
            raise RuntimeError("basic_ios::clear: iostream error")
    message = str(error.value)
    assert f"Writing checkpoint checkpoint-2 to {partial} failed: the disk is full or the write failed" in message
    assert "RuntimeError: basic_ios::clear: iostream error" in message
    assert f"The last good checkpoint, {tmp_path / 'checkpoint-1'}, is intact" in message
    assert not partial.exists()
