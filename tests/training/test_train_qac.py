"""train_qac.py end to end, on the embedded digits: errors, resume, accumulation, output folders, failed writes, two
processes, Hub upload."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

from qac_diffusers import QACPipeline
from qac_diffusers.training.checkpoints import list_checkpoints, resolve_checkpoint
from qac_diffusers.utils import image_grid


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
import train_qac  # noqa: E402


# Small and fast: 3 batches of 512 digits per epoch, no trackers.
# No schedule fit after training (--fit_schedule_nfe without values) except where a test asks for one.
FAST = ["--train_batch_size", "512", "--report_to", "none", "--validation_steps", "100",
        "--num_validation_images", "4", "--fit_schedule_nfe"]
# Smaller still where a few steps of any size will do (a later flag overrides FAST's).
SMALL = ["--train_batch_size", "64"]
# Global batches of 3 micro-batches of 128 digits (FAST's batch size comes first, this one overrides it).
ACCUMULATION = ["--train_batch_size", "128", "--gradient_accumulation_steps", "3"]


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
        (["--fit_schedule_samples", "1"], "`--fit_schedule_samples` must be an integer >= 2"),
        (["--fit_schedule_validation_samples", "1"], "`--fit_schedule_validation_samples` must be an integer >= 2"),
        (["--fit_schedule_bounded_budget", "0"], "`--fit_schedule_bounded_budget` .* must be an integer >= 1"),
        (["--fit_schedule_nfe", "0", "3"], "NFE to fit must be a non-empty list of integers >= 1"),
        (["--fit_schedule_nfe", "64"], "must exceed the largest NFE fitted"),
        (["--hub_model_id", "me/model"], "need --push_to_hub"),
        (["--resolution", "9"], "divisible by 2"),
        (["--resume_from_checkpoint", "nowhere/checkpoint-3"], "not a checkpoint folder"),
        (["--train_data_dir", "no/such/folder"], "does not exist"),
        (["--train_batch_size", "4096"], "smaller than one global batch"),
        (["--train_batch_size", "512", "--gradient_accumulation_steps", "4"], "smaller than one global batch"),
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


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's models: trained parameters, EMA parameters and code weights."""
    return {f"{component}/{key}": value for component in ("unet", "encoder", "unet_ema", "encoder_ema")
            for key, value in weights(checkpoint, component).items()}


# Micro-batches of 128 digits, 3 per step: 1,797 digits make 14.04 micro-batches per epoch, which 3 does not divide;
# 7 steps of 384 images cross the first epoch's end in step 5. The checkpoint at step 4 falls inside the first epoch.
RESUMED = [*ACCUMULATION, "--max_train_steps", "7", "--checkpointing_steps", "4", "--random_flip"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The uninterrupted run of RESUMED, and the (step, micro-step, images) of every micro-batch it trained on."""
    output_dir, seen = tmp_path_factory.mktemp("whole"), []
    micro_batch_loss = train_qac.Trainer.micro_batch_loss

    def counting(self, images, micro_step):
        seen.append((self.global_step, micro_step, images.shape[0]))
        return micro_batch_loss(self, images, micro_step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_qac.Trainer, "micro_batch_loss", counting)
        train(output_dir, *RESUMED)
    AcceleratorState._reset_state(True)
    return output_dir, seen


def test_accumulated_steps_see_one_full_global_batch(uninterrupted_run):
    output_dir, seen = uninterrupted_run
    assert seen == [(step, micro_step, 128) for step in range(7) for micro_step in range(3)]
    assert [m["kimg"] for m in metrics(output_dir)] == pytest.approx([0.384 * step for step in range(1, 8)])


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, uninterrupted_run):
    whole_dir = uninterrupted_run[0]
    train(tmp_path, *RESUMED[:-4], "4", *RESUMED[-3:])
    train(tmp_path, *RESUMED, "--resume_from_checkpoint", "latest")
    assert [m["loss"] for m in metrics(tmp_path)] == [m["loss"] for m in metrics(whole_dir)]
    whole, parts = checkpoint_weights(whole_dir / "checkpoint-7"), checkpoint_weights(tmp_path / "checkpoint-7")
    assert [key for key in whole if not torch.equal(whole[key], parts[key])] == []
    # The end of training is a checkpoint too: resuming a finished run (a second `make demo`) trains nothing.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-7"]
    train(tmp_path, *RESUMED, "--resume_from_checkpoint", "latest")
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 8))
    # Resuming from an earlier checkpoint trains steps 5-7 again; the metrics log keeps one line per step.
    train(tmp_path, *RESUMED, "--resume_from_checkpoint", str(tmp_path / "checkpoint-4"))
    assert [m["loss"] for m in metrics(tmp_path)] == [m["loss"] for m in metrics(whole_dir)]


def test_checkpoints_are_limited_and_a_half_written_one_is_ignored(tmp_path):
    for foreign in ("checkpoint-40-backup", "checkpoint-best"):  # a user's copies: not ours, neither used nor deleted
        (tmp_path / foreign / "unet").mkdir(parents=True)
    train(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-3", "checkpoint-40-backup", "checkpoint-best"
    ]
    assert not list(tmp_path.glob(".tmp-*"))
    (tmp_path / ".tmp-checkpoint-4").mkdir()  # what a run killed mid-save leaves behind
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-3"


def test_runs_never_mix_in_one_output_folder(tmp_path):
    # The reproduction of issue 13: run A, run B (another learning rate) into A's folder, then B resumed with latest.
    run_a = [*SMALL, "--max_train_steps", "4", "--checkpointing_steps", "2"]
    run_b = [*SMALL, "--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    train(tmp_path / "out", *run_a)
    with pytest.raises(ValueError, match=r"holds another run's state \(checkpoint-2, checkpoint-4, .*metrics.jsonl\)"):
        train(tmp_path / "out", *run_b)
    with pytest.raises(ValueError, match=r"configuration: args.learning_rate is 0.002 in the checkpoint, 0.001 now"):
        train(tmp_path / "out", *run_b, "--resume_from_checkpoint", "latest")
    # With --overwrite_output_dir nothing of run A is left; resuming then continues run B, whatever the order.
    train(tmp_path / "out", *run_b, "--overwrite_output_dir")
    assert [path.name for path in list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert [m["step"] for m in metrics(tmp_path / "out")] == [1, 2]
    train(tmp_path / "out", *run_b, "--resume_from_checkpoint", "latest")
    saved, ema = weights(tmp_path / "out", "unet"), weights(tmp_path / "out" / "checkpoint-2", "unet_ema")
    assert [key for key in ema if not torch.equal(saved[key], ema[key])] == []
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())["training_facts"]
    assert (summary["step"], summary["loss"]) == (2, metrics(tmp_path / "out")[-1]["loss"])
    assert '"learning_rate": 0.001' in (tmp_path / "out" / "README.md").read_text()


def test_samples_are_drawn_without_dropout(tmp_path):
    # samples.png must be what the saved pipeline (loaded in eval mode) samples with the validation seed.
    (tmp_path / "dropout.json").write_text(json.dumps({"unet": {"dropout": 0.5}}))
    train(tmp_path, *SMALL, "--max_train_steps", "1", "--model_config", str(tmp_path / "dropout.json"))
    pipe = QACPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(batch_size=4, num_inference_steps=6, generator=generator, output_type="pil").images
    expected = np.asarray(image_grid(images, tile_size=32))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "samples.png")), expected)


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    torch_save = torch.save

    def full_disk(obj, file, *args, **kwargs):  # what torch.save raises when the disk fills up
        if ".tmp-checkpoint-2" in str(file):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4312")
        return torch_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    message = (rf"Writing checkpoint checkpoint-2 to {tmp_path}/.tmp-checkpoint-2 failed: the disk is full or the "
               rf"write failed \(RuntimeError: .*unexpected pos.*The last good checkpoint, {tmp_path}/checkpoint-1, "
               "is intact")
    with pytest.raises(OSError, match=message):
        train(tmp_path, *SMALL, "--max_train_steps", "3", "--checkpointing_steps", "1")
    assert [path.name for path in tmp_path.iterdir() if "checkpoint" in path.name] == ["checkpoint-1"]


def test_a_failed_final_save_names_the_checkpoint_to_resume(tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(QACPipeline, "save_pretrained", full_disk)
    message = (rf"Writing the final pipeline to {tmp_path} failed: .*No space left on device.*The last good "
               rf"checkpoint, {tmp_path}/checkpoint-2, is intact: free space, then rerun with --resume_from_")
    with pytest.raises(OSError, match=message):
        train(tmp_path, *SMALL, "--max_train_steps", "2")


def test_short_run_loads_in_a_fresh_process_and_samples(tmp_path):
    train(tmp_path, "--max_train_steps", "3")
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["training_facts"]["step"] == 3 and summary["code_usage"]["codes_used"] >= 1
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "README.md").is_file()
    # w_N = sum_k (1 - mu_k) prod_{j>k} mu_j h_k with histograms h_k summing to 1: sum(w_N) = 1 - prod_k mu_k.
    decays = torch.tensor([m["ema_decay"] for m in metrics(tmp_path)], dtype=torch.float64)
    code_weights = weights(tmp_path, "encoder")["code_weights"]
    assert code_weights.sum().item() == pytest.approx(1 - decays.prod().item(), rel=1e-5)
    script = "import sys, torch; from qac_diffusers import QACPipeline; " \
             "p = QACPipeline.from_pretrained(sys.argv[1]); p.set_progress_bar_config(disable=True); " \
             "g = torch.Generator().manual_seed(0); " \
             "torch.save(p(batch_size=4, generator=g, output_type='pt').images, sys.argv[2])"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "images.pt")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "images.pt"), sample(tmp_path))


def test_baseline_is_the_same_unet_without_codes(tmp_path):
    train(tmp_path, "--max_train_steps", "2", "--no_condition")
    pipe = QACPipeline.from_pretrained(tmp_path)
    assert pipe.encoder is None and pipe.unet.config.code_dim == 0
    assert pipe.unet.config.block_out_channels == [32, 64]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process_over_the_same_global_batches(tmp_path):
    flags = ["--max_train_steps", "3", "--report_to", "none", "--validation_steps", "100",
             "--num_validation_images", "4", "--fit_schedule_nfe"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),  # a left-over run on the default port would block this one
               str(REPO_ROOT / "train_qac.py"), "--output_dir", str(tmp_path / "two"), "--train_batch_size", "256",
               *flags]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
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


class TeardownRecorder:
    """An accelerator of `num_processes` processes that records the end of a run."""

    def __init__(self, num_processes: int):
        self.num_processes, self.calls = num_processes, []

    def wait_for_everyone(self):
        self.calls.append("wait_for_everyone")

    def end_training(self):
        self.calls.append("end_training")


class Exited(Exception):
    pass


def test_end_training_leaves_a_multi_process_run_at_once_after_the_teardown(monkeypatch):
    def exit_now(status):
        raise Exited(status)

    monkeypatch.setattr(train_qac.os, "_exit", exit_now)
    accelerator = TeardownRecorder(num_processes=2)
    with pytest.raises(Exited) as exited:
        train_qac.end_training(accelerator)
    assert exited.value.args == (0,) and accelerator.calls == ["wait_for_everyone", "end_training"]
    single = TeardownRecorder(num_processes=1)
    train_qac.end_training(single)  # returns: one process exits the ordinary way
    assert single.calls == ["wait_for_everyone", "end_training"]


def test_end_training_ends_a_hanging_teardown_and_says_where_it_hung():
    script = (
        "import time, train_qac\n"
        "class Hanging:\n"
        "    num_processes = 2\n"
        "    def wait_for_everyone(self): pass\n"
        "    def end_training(self): time.sleep(60)\n"
        "train_qac.TEARDOWN_TIMEOUT_SECONDS = 1\n"
        "train_qac.end_training(Hanging())\n"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 1 and time.perf_counter() - started < 50
    assert "Timeout" in result.stderr and "in end_training" in result.stderr


def test_fits_the_sampling_schedules_after_training(tmp_path, monkeypatch, capsys):
    flags = ["--max_train_steps", "2", "--fit_schedule_nfe", "2", "1", "--fit_schedule_samples", "16",
             "--fit_schedule_validation_samples", "12"]
    searches, fit_schedules = [], train_qac.fit_schedules
    with monkeypatch.context() as patch:  # train_qac.py's default search: the bounded descent
        patch.setattr(train_qac, "fit_schedules", lambda *args, **kwargs: searches.append(
            (kwargs["search"], kwargs["bounded_budget"])) or fit_schedules(*args, **kwargs))
        train(tmp_path, *flags)
    fit = json.loads((tmp_path / "training_summary.json").read_text())["schedule_fit"]
    assert searches == [("bounded", 52)]  # with the library's budget of moves
    assert fit["settings"]["search"] == "bounded" and fit["settings"]["bounded_budget"] == 52
    assert 0 < fit["seconds"] and 0 < fit["training_seconds"]
    assert all(fit["fitted_distances"][nfe] <= fit["formula_distances"][nfe] for nfe in ("1", "2"))
    kept = [nfe for nfe in (1, 2)
            if fit["validation_fitted_distances"][str(nfe)] < fit["validation_formula_distances"][str(nfe)]]
    pipe = QACPipeline.from_pretrained(tmp_path)  # the fingerprint matches the saved weights, or this would raise
    assert fit["nfe"] == pipe.scheduler.fitted_num_inference_steps == kept
    for nfe, sigmas in zip(kept, pipe.scheduler.config.fitted_sigmas or []):
        pipe.scheduler.set_timesteps(nfe)
        assert pipe.scheduler.sigmas.tolist() == pytest.approx(sigmas, rel=1e-6)

    # A second run resumed from the end (a second `make demo`) trains nothing and keeps the fit: no new one
    def refuse(*args, **kwargs):
        raise AssertionError("fitted again")

    with monkeypatch.context() as patch:
        patch.setattr(train_qac, "fit_schedules", refuse)
        train(tmp_path, *flags, "--resume_from_checkpoint", "latest")
    assert json.loads((tmp_path / "training_summary.json").read_text())["schedule_fit"] == fit
    assert QACPipeline.from_pretrained(tmp_path).scheduler.config.fitted_sigmas == pipe.scheduler.config.fitted_sigmas
    # other fit settings fit again
    for other in (["--fit_schedule_search", "descent"], ["--fit_schedule_bounded_budget", "104"],
                  [*flags[-2:-1], "13"]):
        with monkeypatch.context() as patch, pytest.raises(AssertionError, match="fitted again"):
            patch.setattr(train_qac, "fit_schedules", refuse)
            train(tmp_path, *flags, *other, "--resume_from_checkpoint", "latest")
    # and say that this run trained nothing, instead of a share of its training time
    capsys.readouterr()
    train(tmp_path, *flags[:-1], "13", "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert "this run resumed at the last step and trained nothing" in printed and "of training" not in printed


def test_push_to_hub_then_load_the_repo(tmp_path, fake_hub):
    train(tmp_path, "--max_train_steps", "2", "--push_to_hub", "--hub_model_id", f"{fake_hub.user}/qac-digits",
          "--hub_token", fake_hub.token)
    files = fake_hub.files(f"{fake_hub.user}/qac-digits")
    assert {"model_index.json", "README.md", "encoder/diffusion_pytorch_model.safetensors"} <= set(files)
    assert not any(name.startswith(("checkpoint-", "logs/")) for name in files)
    assert torch.equal(sample(f"{fake_hub.user}/qac-digits"), sample(tmp_path))


def test_tensorboard_logs_losses_code_usage_and_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_qac.main(["--output_dir", str(tmp_path), "--train_batch_size", "512", "--max_train_steps", "2",
                    "--validation_steps", "2", "--num_validation_images", "4", "--report_to", "tensorboard",
                    "--fit_schedule_nfe", "1", "--fit_schedule_samples", "8",  # a list, which TensorBoard refuses
                    "--fit_schedule_validation_samples", "8"])
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss", "lr", "batch_distinct_codes", "code_weights/entropy_bits"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["validation"]
    assert (tmp_path / "samples" / "step-0000002.png").is_file()
    # the tracker's configuration is the public one: an uploading tracker (wandb) would publish it
    event_bytes = b"".join(path.read_bytes() for path in (tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert str(tmp_path).encode() not in event_bytes
