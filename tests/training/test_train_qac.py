"""train_qac.py end to end, on the embedded digits: errors, resume, two processes, Hub upload."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from qac_diffusers import QACPipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
import train_qac  # noqa: E402

# Small and fast: 3 batches of 512 digits per epoch, no trackers.
FAST = ["--train_batch_size", "512", "--report_to", "none", "--validation_steps", "100", "--num_validation_images", "4"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def train(output_dir: Path, *flags: str) -> None:
    train_qac.main(["--output_dir", str(output_dir), *FAST, *flags])


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def weights(output_dir: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(output_dir / component / "diffusion_pytorch_model.safetensors")


def sample(folder, seed: int = 0) -> torch.Tensor:
    pipe = QACPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=4, generator=torch.Generator().manual_seed(seed), output_type="pt").images


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset_name", "digits", "--train_data_dir", "x"], "not both"),
        (["--no_condition", "--code_dim", "8"], "--no_condition trains without codes"),
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
        (["--hub_model_id", "me/model"], "need --push_to_hub"),
        (["--resolution", "9"], "divisible by 2"),
        (["--resume_from_checkpoint", "nowhere/checkpoint-3"], "not a checkpoint folder"),
        (["--train_data_dir", "no/such/folder"], "does not exist"),
        (["--train_batch_size", "4096"], "fewer batches"),
    ],
)
def test_bad_flags_fail_before_training(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train_qac.main(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags])
    assert not (tmp_path / "out" / "logs").exists()


def test_dry_run_writes_the_resolved_config_and_stops(tmp_path):
    train(tmp_path, "--dry_run", "--code_dim", "7")
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["model"]["code_dim"] == 7 and config["model"]["resolution"] == 8
    assert config["data"] == {"images": 1797, "channels": 1}
    assert config["parameters"]["encoder"] < 0.05 * config["parameters"]["unet"]
    assert not (tmp_path / "model_index.json").exists()


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    # 7 steps over 3 epochs with random flips; the interruption at step 4 falls inside the second epoch.
    flags = ["--max_train_steps", "7", "--checkpointing_steps", "4", "--random_flip"]
    train(tmp_path / "whole", *flags)
    train(tmp_path / "parts", *flags[:1], "4", *flags[2:])
    train(tmp_path / "parts", *flags, "--resume_from_checkpoint", "latest")
    assert [m["loss"] for m in metrics(tmp_path / "parts")] == [m["loss"] for m in metrics(tmp_path / "whole")]
    for component in ("unet", "encoder"):
        whole, parts = weights(tmp_path / "whole", component), weights(tmp_path / "parts", component)
        assert all(torch.equal(whole[key], parts[key]) for key in whole), component
    # The end of training is a checkpoint too: resuming a finished run (a second `make demo`) trains nothing.
    assert sorted(p.name for p in (tmp_path / "parts").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-7"]
    train(tmp_path / "parts", *flags, "--resume_from_checkpoint", "latest")
    assert [m["step"] for m in metrics(tmp_path / "parts")] == list(range(1, 8))
    # Resuming from an earlier checkpoint trains steps 5-7 again; the metrics log keeps one line per step.
    train(tmp_path / "parts", *flags, "--resume_from_checkpoint", str(tmp_path / "parts" / "checkpoint-4"))
    assert [m["loss"] for m in metrics(tmp_path / "parts")] == [m["loss"] for m in metrics(tmp_path / "whole")]


def test_checkpoints_are_limited_and_a_half_written_one_is_ignored(tmp_path):
    train(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(tmp_path.glob(".tmp-*"))
    (tmp_path / ".tmp-checkpoint-4").mkdir()  # what a run killed mid-save leaves behind
    assert train_qac.list_checkpoints(tmp_path)[-1].name == "checkpoint-3"


def test_short_run_loads_in_a_fresh_process_and_samples(tmp_path):
    train(tmp_path, "--max_train_steps", "3")
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["training_facts"]["step"] == 3 and summary["code_usage"]["codes_used"] >= 1
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "README.md").is_file()
    # w_N = sum_k (1 - mu_k) prod_{j>k} mu_j h_k with histograms h_k summing to 1: sum(w_N) = 1 - prod_k mu_k.
    decays = torch.tensor([m["ema_decay"] for m in metrics(tmp_path)], dtype=torch.float64)
    assert weights(tmp_path, "encoder")["code_weights"].sum().item() == pytest.approx(1 - decays.prod().item(), rel=1e-5)
    script = "import sys, torch; from qac_diffusers import QACPipeline; " \
             "p = QACPipeline.from_pretrained(sys.argv[1]); p.set_progress_bar_config(disable=True); " \
             "torch.save(p(batch_size=4, generator=torch.Generator().manual_seed(0), output_type='pt').images, sys.argv[2])"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "images.pt")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "images.pt"), sample(tmp_path))


def test_baseline_is_the_same_unet_without_codes(tmp_path):
    train(tmp_path, "--max_train_steps", "2", "--no_condition")
    pipe = QACPipeline.from_pretrained(tmp_path)
    assert pipe.encoder is None and pipe.unet.config.code_dim == 0
    assert pipe.unet.config.block_out_channels == [32, 64]


def test_two_processes_match_one_process_over_the_same_global_batches(tmp_path):
    flags = ["--max_train_steps", "3", "--report_to", "none", "--validation_steps", "100", "--num_validation_images", "4"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO_ROOT / "train_qac.py"), "--output_dir", str(tmp_path / "two"), "--train_batch_size", "256",
               *flags]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train_qac.main(["--output_dir", str(tmp_path / "one"), "--train_batch_size", "512", *flags])

    two = json.loads((tmp_path / "two" / "training_config.json").read_text())
    assert two["num_processes"] == 2 and two["global_batch"] == 512
    assert json.loads((tmp_path / "two" / "training_summary.json").read_text())["training_facts"]["processes_in_sync"]
    one_weights, two_weights = weights(tmp_path / "one", "encoder"), weights(tmp_path / "two", "encoder")
    assert torch.allclose(one_weights["code_weights"], two_weights["code_weights"], atol=1e-7)
    assert one_weights["code_weights"].sum() > 0
    losses = [m["loss"] for m in metrics(tmp_path / "one")], [m["loss"] for m in metrics(tmp_path / "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_push_to_hub_then_load_the_repo(tmp_path, fake_hub):
    train(tmp_path, "--max_train_steps", "2", "--push_to_hub", "--hub_model_id", f"{fake_hub.user}/qac-digits",
          "--hub_token", fake_hub.token)
    files = fake_hub.files(f"{fake_hub.user}/qac-digits")
    assert "model_index.json" in files and "README.md" in files and "encoder/diffusion_pytorch_model.safetensors" in files
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in files)
    assert torch.equal(sample(f"{fake_hub.user}/qac-digits"), sample(tmp_path))


def test_tensorboard_logs_losses_code_usage_and_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_qac.main(["--output_dir", str(tmp_path), "--train_batch_size", "512", "--max_train_steps", "2",
                    "--validation_steps", "2", "--num_validation_images", "4", "--report_to", "tensorboard"])
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss", "lr", "batch_distinct_codes", "code_weights/entropy_bits"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["validation"]
    assert (tmp_path / "samples" / "step-0000002.png").is_file()
