"""train_qac.py's GPU path, checked on the CPU: noise drawn on the training device, values read from the device only at
logged steps (--logging_steps), --channels_last and --torch_compile computing the same losses, and their errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from qac_diffusers import IPNDMScheduler, QACPipeline
from qac_diffusers.training.edm_loss import EDMLoss


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
import train_qac  # noqa: E402


# 5 steps of 2 micro-batches of 64 digits: a few seconds per run.
RUN = ["--train_batch_size", "64", "--gradient_accumulation_steps", "2", "--max_train_steps", "5", "--report_to",
       "none", "--validation_steps", "100", "--num_validation_images", "4", "--fit_schedule_nfe"]
# Ways a tensor's value reaches the host (each waits for a GPU to finish the work queued before it).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def train(output_dir: Path, *flags: str) -> None:
    train_qac.main(["--output_dir", str(output_dir), *RUN, *flags])
    AcceleratorState._reset_state(True)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    """RUN logged at every step (the default): today's metrics."""
    output_dir = tmp_path_factory.mktemp("every_step")
    train(output_dir)
    return output_dir


@pytest.fixture(scope="module")
def every_second_step(tmp_path_factory):
    """RUN with --logging_steps 2, recording the tensor reads of train_qac.py inside `Trainer.train_step`, the devices
    the noise generators were made for and whether the optimizer is fused."""
    output_dir, reads, devices, fused = tmp_path_factory.mktemp("every_second_step"), [], [], []
    inside_step = [False]

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if inside_step[0] and caller.f_code.co_filename == train_qac.__file__:
                reads.append(f"{name} at train_qac.py:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return read

    train_step, step_generator = train_qac.Trainer.train_step, train_qac.step_generator

    def watched_step(self, micro_batches):
        fused.append(self.optimizer.optimizer.param_groups[0]["fused"])
        inside_step[0] = True
        try:
            return train_step(self, micro_batches)
        finally:
            inside_step[0] = False

    def watched_generator(seed, step, micro_step, device):
        devices.append(device)
        return step_generator(seed, step, micro_step, device)

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, recording(name))
        patch.setattr(train_qac.Trainer, "train_step", watched_step)
        patch.setattr(train_qac, "step_generator", watched_generator)
        train(output_dir, "--logging_steps", "2")
    return output_dir, reads, devices, fused


def test_noise_is_todays_on_the_cpu():
    # Drawn with the CPU generator of (seed 0, step 5, micro-step 1) before the noise moved to the training device.
    generator = train_qac.step_generator(0, 5, 1, torch.device("cpu"))
    sigma, noise = EDMLoss(IPNDMScheduler()).sample_noise((2, 1, 2, 2), generator)
    assert sigma.flatten().tolist() == [0.10042557120323181, 0.12122858315706253]
    assert noise.flatten().tolist() == [
        -0.0972677543759346, 1.3082911968231201, 1.399997353553772, -2.4731521606445312, -0.45978814363479614,
        1.8202686309814453, 0.4058902859687805, -0.4929145872592926,
    ]


def test_noise_is_drawn_on_the_training_device(every_second_step):
    devices = every_second_step[2]
    assert devices == [torch.device("cpu")] * 10  # 5 steps of 2 micro-batches, on the accelerator's device


def test_a_training_step_reads_nothing_from_the_device(every_second_step):
    assert every_second_step[1] == []


def test_logged_steps_log_the_values_of_every_step_logging(every_step, every_second_step):
    logged = metrics(every_second_step[0])
    assert [m["step"] for m in logged] == [2, 4, 5]  # every 2nd step and the last one
    expected = {m["step"]: m for m in metrics(every_step)}
    for facts in logged:
        rate = facts.pop("images_per_second")
        assert rate > 0
        assert facts == {key: value for key, value in expected[facts["step"]].items() if key != "images_per_second"}


def test_the_summary_holds_the_last_step(every_step, every_second_step):
    summaries = [json.loads((run / "training_summary.json").read_text())["training_facts"]
                 for run in (every_step, every_second_step[0])]
    assert (summaries[1]["step"], summaries[1]["loss"]) == (summaries[0]["step"], summaries[0]["loss"])


def test_adam_is_not_fused_on_the_cpu(every_second_step):
    assert set(every_second_step[3]) == {None}  # torch's default implementation, as before


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """RUN with the UNet compiled (aot_eager: no C++ compiler needed) and channels-last weights."""
    output_dir = tmp_path_factory.mktemp("compiled")
    train(output_dir, "--torch_compile", "aot_eager", "--channels_last")
    return output_dir


def test_compiled_channels_last_run_computes_the_same_losses(every_step, compiled):
    losses = [m["loss"] for m in metrics(compiled)]
    assert losses == pytest.approx([m["loss"] for m in metrics(every_step)], rel=1e-5)


def test_compiled_channels_last_run_saves_a_loadable_pipeline(every_step, compiled):
    pipes = [QACPipeline.from_pretrained(run) for run in (every_step, compiled)]
    saved = [dict(pipe.unet.named_parameters()) for pipe in pipes]
    assert saved[1].keys() == saved[0].keys()  # no `_orig_mod.` prefix
    assert [key for key in saved[0] if not torch.allclose(saved[0][key], saved[1][key], atol=1e-5)] == []


def test_a_compiled_run_resumes_without_the_speed_flags(compiled):
    train(compiled, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--logging_steps", "3")
    assert [m["step"] for m in metrics(compiled)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--logging_steps", "0"], "--logging_steps must be >= 1, got 0"),
        (["--torch_compile", "no_such_backend"], "--torch_compile no_such_backend: torch.compile has no such backend"),
    ],
)
def test_bad_speed_flags_fail_before_training(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train(tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_torch_compile_with_accelerates_dynamo_backend_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # what `accelerate launch --dynamo_backend` sets
    message = (r"--torch_compile compiles the UNet, and accelerate's dynamo_backend \(inductor, .*would compile every "
               "model again: launch with --dynamo_backend no")
    with pytest.raises(ValueError, match=message):
        train(tmp_path / "out", "--torch_compile", "aot_eager")
    assert not (tmp_path / "out" / "logs").exists()
