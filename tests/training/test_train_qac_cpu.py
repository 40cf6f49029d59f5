"""train_qac.py on the CPU: the precision it really trains in and the threads each process uses."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, PartialState


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
import train_qac  # noqa: E402


FAST = ["--train_batch_size", "512", "--report_to", "none", "--max_train_steps", "1", "--validation_steps", "100",
        "--num_validation_images", "4", "--fit_schedule_nfe"]
CPU = SimpleNamespace(device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def test_fp16_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16 mixed precision .* does not run on the CPU: accelerate would train in "
                                         "fp32. Use --mixed_precision bf16"):
        train_qac.main(["--output_dir", str(tmp_path / "run"), *FAST, "--mixed_precision", "fp16"])
    assert not (tmp_path / "run").exists()


def test_the_config_records_the_precision_used(tmp_path):
    train_qac.main(["--output_dir", str(tmp_path), *FAST, "--mixed_precision", "bf16", "--dry_run"])
    assert json.loads((tmp_path / "training_config.json").read_text())["mixed_precision"] == "bf16"


@pytest.fixture
def launched(monkeypatch):
    """What `accelerate launch` without --cpu leaves in a process's environment; the threads are restored after."""
    threads = torch.get_num_threads()
    PartialState()  # accelerate's logger needs it
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    torch.set_num_threads(1)
    yield monkeypatch
    torch.set_num_threads(threads)


def test_accelerate_launch_on_the_cpu_uses_all_cores(launched):
    train_qac.use_all_cpu_cores(CPU)
    assert torch.get_num_threads() == 4


def test_local_processes_share_the_cores(launched):
    launched.setenv("LOCAL_WORLD_SIZE", "2")
    train_qac.use_all_cpu_cores(CPU)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "environment, device",
    [
        ({"OMP_NUM_THREADS": "3"}, "cpu"),  # the user's choice
        ({"ACCELERATE_DYNAMO_BACKEND": None}, "cpu"),  # not started by accelerate launch
        ({}, "meta"),  # an accelerator device: its processes need no CPU threads
    ],
)
def test_threads_are_left_alone(launched, environment, device):
    for name, value in environment.items():
        launched.delenv(name) if value is None else launched.setenv(name, value)
    train_qac.use_all_cpu_cores(SimpleNamespace(device=torch.device(device)))
    assert torch.get_num_threads() == 1
