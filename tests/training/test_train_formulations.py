"""train_qac.py with rectified flow, Gaussian conditions and RNE's noise encoder (issue 9): train, save, reload."""

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from qac_diffusers import FSQConditionEncoder, IPNDMScheduler, QACPipeline
from qac_diffusers.models import GaussianConditionEncoder, NoiseEncoder
from qac_diffusers.schedulers import FittedFlowMatchEulerDiscreteScheduler


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
import train_qac  # noqa: E402


# Two steps of 64 digits, no trackers, validation grid only at the end, no schedule fit unless a test asks for one.
TWO_STEPS = ["--train_batch_size", "64", "--max_train_steps", "2", "--report_to", "none", "--validation_steps", "100",
             "--num_validation_images", "4", "--checkpointing_steps", "2", "--fit_schedule_nfe"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def train(output_dir: Path, *flags: str) -> None:
    train_qac.main(["--output_dir", str(output_dir), *TWO_STEPS, *flags])


def reload_and_sample(folder: Path) -> QACPipeline:
    pipe = QACPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert images.images.shape == (2, 1, 8, 8) and torch.isfinite(images.images).all()
    return pipe


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--formulation", "rectified_flow", "--P_mean", "-1"], "--P_mean and --P_std set EDM's"),
        (["--kl_weight", "1"], "add --condition gaussian"),
        (["--condition", "gaussian", "--kl_weight", "-1"], "`kl_weight` .* must be >= 0"),
        (["--beta", "20"], "add --noise_encoder own"),
        (["--noise_encoder", "own", "--beta", "-1"], "`beta` .* must be >= 0, got -1.0. RNE's paper uses --beta 20"),
        (["--noise_encoder", "shared", "--no_condition"], "use --noise_encoder own"),
        (["--condition", "gaussian", "--code_levels", "3"], "drop them with --condition gaussian"),
        (["--formulation", "flow"], "invalid choice"),
        (["--fit_schedule_search", "grid"], "--fit_schedule_search: invalid choice: 'grid'"),
    ],
)
def test_bad_combinations_fail_before_training(tmp_path, flags, message, capsys):
    error = SystemExit if "invalid choice" in message else ValueError
    with pytest.raises(error, match=None if error is SystemExit else message):
        train_qac.main(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags])
    if error is SystemExit:
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "logs").exists()


def test_rectified_flow_trains_saves_and_reloads(tmp_path, monkeypatch):
    flags = ["--formulation", "rectified_flow", "--fit_schedule_nfe", "2", "3", "--fit_schedule_samples", "8",
             "--fit_schedule_validation_samples", "8"]
    train(tmp_path, *flags)
    assert json.loads((tmp_path / "model_index.json").read_text())["formulation"] == "rectified_flow"
    pipe = reload_and_sample(tmp_path)
    # the Euler grids fitted after training, in the scheduler that carries them
    assert isinstance(pipe.scheduler, FittedFlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.encoder, FSQConditionEncoder)
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    fit = summary["schedule_fit"]
    assert sorted(fit["fitted_distances"]) == ["2", "3"] and fit["nfe"] == pipe.scheduler.fitted_num_inference_steps
    assert summary["code_usage"]["codes_used"] >= 1  # the code weights are collected as for EDM
    _, nfe = pipe.sample_reference(batch_size=1, generator=torch.Generator().manual_seed(0))
    assert nfe > 0
    # resumed from the end, the run keeps the fitted grids in their scheduler instead of fitting again
    monkeypatch.setattr(train_qac, "fit_schedules", lambda *args, **kwargs: pytest.fail("fitted again"))
    train(tmp_path, *flags, "--resume_from_checkpoint", "latest")
    again = QACPipeline.from_pretrained(tmp_path).scheduler
    assert type(again) is FittedFlowMatchEulerDiscreteScheduler
    assert again.config.fitted_sigmas == pipe.scheduler.config.fitted_sigmas


def test_a_fresh_noise_encoder_is_the_independent_coupling(tmp_path):
    # Its output layer starts at zero: q(z | x) = N(0, I), z = n and a KL of 0, so the first step's loss is plain
    # rectified flow's on the same draws (the UNet and the condition encoder are built before it, from the seed).
    one_step = ["--formulation", "rectified_flow", "--max_train_steps", "1", "--checkpointing_steps", "1"]
    train(tmp_path / "plain", *one_step)
    train(tmp_path / "rne", *one_step, "--noise_encoder", "own")
    first = [json.loads((tmp_path / run / "logs" / "metrics.jsonl").read_text().splitlines()[0])
             for run in ("plain", "rne")]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-6) and 0.5 < first[0]["loss"] < 10


def test_noise_encoder_shared_with_gaussian_conditions(tmp_path):
    train(tmp_path, "--formulation", "rectified_flow", "--condition", "gaussian", "--noise_encoder", "shared",
          "--kl_weight", "0.1")
    checkpoint = tmp_path / "checkpoint-2"
    noise_encoder = NoiseEncoder.from_pretrained(checkpoint / "noise_encoder")
    assert noise_encoder.config.shared_backbone and noise_encoder.config.beta == 20.0
    # trained: the zero-initialised output layer moved
    assert noise_encoder.conv_out.weight.abs().sum() > 0
    encoder_ema = GaussianConditionEncoder.from_pretrained(checkpoint / "encoder_ema")
    assert encoder_ema.config.kl_weight == 0.1
    pipe = reload_and_sample(tmp_path)
    assert isinstance(pipe.encoder, GaussianConditionEncoder)
    assert not (tmp_path / "noise_encoder").exists()  # sampling draws z ~ N(0, I): the pipeline has no noise encoder
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["code_usage"] is None


def test_noise_encoder_of_its_own_resumes_exactly(tmp_path):
    flags = ["--formulation", "rectified_flow", "--noise_encoder", "own", "--beta", "5", "--checkpointing_steps", "1"]
    train(tmp_path / "full", *flags)
    train(tmp_path / "half", *flags, "--max_train_steps", "1")
    train(tmp_path / "half", *flags, "--resume_from_checkpoint", "latest")
    full, half = reload_and_sample(tmp_path / "full"), reload_and_sample(tmp_path / "half")
    for name, value in full.unet.state_dict().items():
        assert torch.equal(value, half.unet.state_dict()[name]), name
    assert NoiseEncoder.from_pretrained(tmp_path / "half" / "checkpoint-2" / "noise_encoder").config.beta == 5.0


def test_edm_stays_the_default(tmp_path):
    # (test_train_qac.py checks the schedule fit of EDM runs; it is skipped here to keep the suite fast)
    train(tmp_path, "--fit_schedule_nfe")
    pipe = reload_and_sample(tmp_path)
    assert pipe.config.formulation == "edm" and isinstance(pipe.scheduler, IPNDMScheduler)


@pytest.mark.parametrize("formulation, levels", [("edm", [-1.2, 1.2]), ("rectified_flow", [None, None])])
def test_the_resolved_config_shows_the_noise_levels_trained_with(tmp_path, formulation, levels):
    train(tmp_path, "--dry_run", "--formulation", formulation, "--noise_encoder", "own")
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert [config["args"]["P_mean"], config["args"]["P_std"]] == levels
    assert config["args"]["condition"] == "fsq" and 0 < config["parameters"]["noise_encoder"]
