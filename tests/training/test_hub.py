"""The model card and the Hub upload of a trained pipeline, against the loopback Hub of tests/hub_server.py."""

import json
import re
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from huggingface_hub import ModelCard

import hub_server
from conftest import make_tiny_models, make_tiny_pipeline
from qac_diffusers import QACPipeline
from qac_diffusers.models import GaussianConditionEncoder
from qac_diffusers.training.code_usage import code_usage
from qac_diffusers.training.hub import check_hub_access, push_to_hub, without_local_paths, write_model_card


REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
import train_qac  # noqa: E402


TRAINING_CONFIG = {"learning_rate": 0.002, "train_batch_size": 128, "unet": {"block_out_channels": [16, 32]}}
TRAINING_FACTS = {"steps": 3000, "images_seen": 384000, "final_loss": 0.0412345}
TAGS = ["qac", "diffusers", "diffusers-training", "unconditional-image-generation"]
PIPELINE_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}
ENCODER_FILES = {"encoder/config.json", "encoder/diffusion_pytorch_model.safetensors"}
TOP_LEVEL_FILES = {"README.md", "training_config.json", "training_summary.json"}


@pytest.fixture
def read_only_token(monkeypatch):
    """The loopback Hub says that every token is read-only (what `whoami` answers for a "read" token)."""

    def whoami(handler):
        access_token = {"displayName": "reader", "role": "read"}
        handler._send_json({"type": "user", "name": handler.hub.user, "auth": {"accessToken": access_token}})

    monkeypatch.setattr(hub_server._Handler, "ep_whoami", whoami)


def save_training_run(pipe: QACPipeline, output_dir: Path, sample_grid: bool = True) -> Path:
    """What train_qac.py leaves behind: the pipeline, a sample grid, its config, and files that must stay local."""
    pipe.save_pretrained(output_dir)
    (output_dir / "training_config.json").write_text(json.dumps(TRAINING_CONFIG))
    (output_dir / "training_summary.json").write_text(json.dumps({"training_facts": TRAINING_FACTS}))
    if sample_grid:
        PIL.Image.new("L", (16, 16), color=128).save(output_dir / "samples.png")
    (output_dir / "samples").mkdir()
    (output_dir / "samples" / "step-0000500.png").write_bytes(b"png")
    for checkpoint in ("checkpoint-500", ".tmp-checkpoint-1000"):
        (output_dir / checkpoint / "unet").mkdir(parents=True)
        (output_dir / checkpoint / "unet" / "config.json").write_text("{}")
        (output_dir / checkpoint / "samples.png").write_bytes(b"png")
        (output_dir / checkpoint / "random_states_0.pkl").write_bytes(b"rng")
    (output_dir / "logs" / "qac").mkdir(parents=True)
    (output_dir / "logs" / "qac" / "events.out.tfevents.1").write_bytes(b"events")
    (output_dir / "logs" / "metrics.json").write_text("{}")
    (output_dir / ".tmp-samples.png").write_bytes(b"half-written")
    (output_dir / "optimizer.bin").write_bytes(b"adam")
    return output_dir


def shipped_code(output_dir: Path) -> set[str]:
    """The .py files that `save_pretrained` ships for plain diffusers, at the top and in the component folders."""
    return {path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*.py")}


def write_card(output_dir: Path, pipe: QACPipeline, **kwargs) -> Path:
    has_codebook = hasattr(pipe.encoder, "code_weights")  # FSQ; not a Gaussian encoder nor the baseline
    arguments = {
        "repo_id": "fake-user/tiny-qac",
        "dataset_name": "uoft-cs/cifar10",
        "training_config": TRAINING_CONFIG,
        "code_usage": code_usage(pipe.encoder.code_weights) if has_codebook else None,
        "training_facts": TRAINING_FACTS,
        "is_baseline": pipe.encoder is None,
        "has_codebook": has_codebook or pipe.encoder is None,
    }
    return write_model_card(output_dir, **{**arguments, **kwargs})


def sample(pipe: QACPipeline) -> tuple[torch.Tensor, torch.Tensor | None]:
    output = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    return output.images, output.code_indices


def test_push_uploads_the_pipeline_and_its_card_only(fake_hub, tmp_path):
    pipe = make_tiny_pipeline()
    output_dir = save_training_run(pipe, tmp_path / "run")
    assert write_card(output_dir, pipe, repo_id=f"{fake_hub.user}/tiny-qac") == output_dir / "README.md"

    repo_id = push_to_hub(output_dir, "tiny-qac")  # no namespace: the token's user
    assert repo_id == f"{fake_hub.user}/tiny-qac"
    stored = fake_hub.files(repo_id)
    uploaded = PIPELINE_FILES | ENCODER_FILES | TOP_LEVEL_FILES | {"samples.png"} | shipped_code(output_dir)
    assert set(stored) == uploaded | {".gitattributes"}  # no checkpoint-*, .tmp-*, logs/, samples/, optimizer.bin
    assert all(stored[path] == (output_dir / path).read_bytes() for path in uploaded)
    assert {token for method, _, token in fake_hub.requests if method == "POST"} == {fake_hub.token}

    loaded = QACPipeline.from_pretrained(repo_id)
    loaded.set_progress_bar_config(disable=True)
    images, code_indices = sample(loaded)
    expected_images, expected_code_indices = sample(pipe)
    assert torch.equal(images, expected_images) and torch.equal(code_indices, expected_code_indices)
    assert fake_hub.server.unhandled == [] and fake_hub.server.errors == []


def test_qac_card_metadata_and_contents(tmp_path):
    pipe = make_tiny_pipeline()
    output_dir = save_training_run(pipe, tmp_path / "run")
    card = ModelCard.load(write_card(output_dir, pipe))

    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.tags == TAGS
    assert card.data.datasets == ["uoft-cs/cifar10"]
    assert card.data.license == "apache-2.0"
    assert "https://arxiv.org/abs/2409.17487" in card.text and "installed from its source repository" in card.text
    assert 'pipe = QACPipeline.from_pretrained("fake-user/tiny-qac")' in card.text
    assert "pipe(batch_size=16, num_inference_steps=6" in card.text
    assert "![Samples from this pipeline](samples.png)" in card.text
    assert "[uoft-cs/cifar10](https://huggingface.co/datasets/uoft-cs/cifar10)" in card.text
    assert "| steps | 3000 |\n| images seen | 384000 |\n| final loss | 0.04123 |" in card.text

    usage = code_usage(pipe.encoder.code_weights)
    assert f"| codes used | {usage['codes_used']} |" in card.text
    assert f"| entropy (bits) | {usage['entropy_bits']:.3f} |" in card.text
    assert f"| codes carrying half of the weight | {usage['codes_for_half_weight']} |" in card.text
    config_block = re.search(r"```json\n(.*?)\n```", card.text, re.DOTALL).group(1)
    assert json.loads(config_block) == TRAINING_CONFIG

    card = ModelCard.load(write_card(output_dir, pipe, license="mit"))
    assert card.data.license == "mit"


def test_card_names_the_formulation_the_condition_and_the_scheduler(tmp_path):
    edm = make_tiny_pipeline()
    edm_card = ModelCard.load(write_card(save_training_run(edm, tmp_path / "edm"), edm))
    assert "**quantized adaptive\nconditions**" in edm_card.text and "(an EDM-preconditioned UNet)" in edm_card.text
    assert "with the saved `IPNDMScheduler` (iPNDM with the analytical first step)." in edm_card.text

    unet, _ = make_tiny_models(code_dim=6)
    encoder = GaussianConditionEncoder.for_unet(unet, code_dim=6)
    flow = QACPipeline(unet, FlowMatchEulerDiscreteScheduler(), encoder, formulation="rectified_flow")
    flow_card = ModelCard.load(write_card(save_training_run(flow, tmp_path / "flow"), flow))
    assert "**adaptive\nconditions**" in flow_card.text and "Gaussian condition" in flow_card.text
    assert "(a UNet that predicts the velocity of rectified flow)" in flow_card.text
    assert "with the saved `FlowMatchEulerDiscreteScheduler` (N Euler steps of 1 / N;" in flow_card.text
    assert "EDM" not in flow_card.text and "iPNDM" not in flow_card.text and "Code usage" not in flow_card.text

    flow.scheduler = FlowMatchHeunDiscreteScheduler()  # the note follows the saved scheduler
    heun_card = ModelCard.load(write_card(save_training_run(flow, tmp_path / "heun"), flow))
    assert "with the saved `FlowMatchHeunDiscreteScheduler` (an odd NFE: (N + 1) / 2 Heun steps" in heun_card.text


def test_card_shows_no_absolute_path(tmp_path):
    pipe = make_tiny_pipeline()
    output_dir = save_training_run(pipe, tmp_path / "run")
    card = ModelCard.load(write_card(output_dir, pipe, training_config={"output_dir": tmp_path / "run", "seed": 0}))
    assert '"output_dir": "run"' in card.text
    assert str(tmp_path) not in card.text


def test_without_local_paths():
    config = {
        "args": {"train_data_dir": "data/faces", "cache_dir": Path("/home/me/.cache"), "dataset_name": "user/data"},
        "output_dir": ".",
        "files": ("/srv/a.json", "b.json"),
        "lr": 0.002,
        "logging_dir": None,
    }
    assert without_local_paths(config, path_keys={"train_data_dir", "output_dir"}) == {
        "args": {"train_data_dir": "faces", "cache_dir": ".cache", "dataset_name": "user/data"},
        "output_dir": Path.cwd().name,  # "." is the working folder, named
        "files": ["a.json", "b.json"],
        "lr": 0.002,
        "logging_dir": None,
    }


def test_baseline_card_and_push(fake_hub, tmp_path):
    pipe = make_tiny_pipeline(code_dim=0)
    output_dir = save_training_run(pipe, tmp_path / "baseline", sample_grid=False)
    card = ModelCard.load(write_card(output_dir, pipe, dataset_name="digits"))

    assert card.data.tags == [*TAGS, "baseline"]
    assert card.data.datasets is None  # a built-in data set is not a Hub id
    assert "**unconditional baseline**" in card.text and "trained the same way" in card.text
    assert "`digits`, a data set built into qac-diffusers" in card.text
    assert "Code usage" not in card.text and "![" not in card.text  # no codes, no samples.png

    repo_id = push_to_hub(output_dir, "tiny-baseline")
    uploaded = PIPELINE_FILES | TOP_LEVEL_FILES | shipped_code(output_dir)
    assert set(fake_hub.files(repo_id)) == uploaded | {".gitattributes"}
    loaded = QACPipeline.from_pretrained(repo_id)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.encoder is None and torch.equal(sample(loaded)[0], sample(pipe)[0])


def test_local_folder_is_named_without_its_path(tmp_path):
    pipe = make_tiny_pipeline()
    output_dir = save_training_run(pipe, tmp_path / "run")
    (tmp_path / "my_images").mkdir()
    card = ModelCard.load(write_card(output_dir, pipe, dataset_name=str(tmp_path / "my_images")))
    assert card.data.datasets is None
    assert "A local image folder, `my_images`." in card.text and str(tmp_path) not in card.text


def test_explicit_token_private_repo_and_second_push(fake_hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    pipe = make_tiny_pipeline()
    output_dir = save_training_run(pipe, tmp_path / "run")
    write_card(output_dir, pipe)
    seen = len(fake_hub.requests)

    repo_id = push_to_hub(output_dir, "secret-qac", token="hf_explicit", private=True)
    assert fake_hub.repo(repo_id).private
    write_card(output_dir, pipe, training_facts={**TRAINING_FACTS, "steps": 6000})
    assert push_to_hub(output_dir, repo_id, token="hf_explicit", commit_message="More steps") == repo_id
    assert fake_hub.repo(repo_id).head.message == "More steps"
    assert b"| steps | 6000 |" in fake_hub.files(repo_id)["README.md"]
    assert {token for method, _, token in fake_hub.requests[seen:] if method == "POST"} == {"hf_explicit"}


def test_refuses_to_publish_the_token(fake_hub, tmp_path):
    pipe = make_tiny_pipeline()
    output_dir = save_training_run(pipe, tmp_path / "run")
    write_card(output_dir, pipe, training_config={"args": {"hub_token": "hf_explicit"}})
    with pytest.raises(ValueError, match="README.md holds the Hub token, which the upload would publish"):
        push_to_hub(output_dir, "leaky", token="hf_explicit")
    assert not any(method == "POST" for method, _, _ in fake_hub.requests)  # no repo created, nothing uploaded


def test_refuses_to_publish_a_local_path(fake_hub, tmp_path):
    pipe = make_tiny_pipeline()
    save_training_run(pipe, tmp_path / "first")
    # diffusers records where a pipeline was loaded from (`_name_or_path`) and saves it again.
    reloaded = QACPipeline.from_pretrained(tmp_path / "first")
    output_dir = save_training_run(reloaded, tmp_path / "run")
    write_card(output_dir, reloaded)
    loaded_from = re.escape(str(tmp_path / "first"))
    with pytest.raises(ValueError, match=f"model_index.json names the local path '{loaded_from}', which the upload"):
        push_to_hub(output_dir, "leaky")
    pipe.save_pretrained(output_dir)  # a pipeline built in this process has no `_name_or_path`
    (output_dir / "training_config.json").write_text(json.dumps({"output_dir": str(output_dir)}))
    with pytest.raises(ValueError, match=f"training_config.json names the local path '{re.escape(str(output_dir))}'"):
        push_to_hub(output_dir, "leaky")
    assert not any(method == "POST" for method, _, _ in fake_hub.requests)


def test_check_hub_access_creates_the_repo(fake_hub):
    assert check_hub_access("tiny-qac", private=True) == f"{fake_hub.user}/tiny-qac"
    assert fake_hub.repo(f"{fake_hub.user}/tiny-qac").private
    assert check_hub_access(f"{fake_hub.user}/tiny-qac") == f"{fake_hub.user}/tiny-qac"  # an existing repo is fine


def test_check_hub_access_without_token(fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="needs a token with write access, and none was found: log in with `hf auth"):
        check_hub_access("tiny-qac")
    assert fake_hub.requests == []


def test_check_hub_access_read_only_token(fake_hub, read_only_token):
    with pytest.raises(ValueError, match="The Hub token 'reader' is read-only: pushing to tiny-qac needs one with"):
        check_hub_access("tiny-qac")
    assert fake_hub.server.repos == {}


def test_check_hub_access_unreachable_or_offline(fake_hub):
    fake_hub.stop()
    with pytest.raises(ConnectionError, match=f"Cannot reach the Hub at {re.escape(fake_hub.url)} to check the token"):
        check_hub_access("tiny-qac")
    with fake_hub.offline():
        with pytest.raises(ValueError, match="needs the network, but HF_HUB_OFFLINE is set"):
            check_hub_access("tiny-qac")


@pytest.mark.parametrize("function", [write_card, lambda output_dir, pipe: push_to_hub(output_dir, "any")])
def test_output_dir_errors(function, tmp_path):
    pipe = make_tiny_pipeline()
    with pytest.raises(OSError, match="does not exist or is not a folder.*save_pretrained"):
        function(tmp_path / "missing", pipe)
    with pytest.raises(OSError, match="has no model_index.json.*save_pretrained"):
        function(tmp_path, pipe)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"code_usage": None}, "or `is_baseline=True`"),
        ({"is_baseline": True}, "pass `code_usage=None`"),
        ({"code_usage": {"codes_used": 3}}, r"`code_usage` lacks \['entropy_bits', 'perplexity'"),
        ({"training_facts": {"steps": 10}}, r"`training_facts` lacks \['images_seen', 'final_loss'\]"),
        ({"sample_grid": "grids/samples.png"}, "`sample_grid` must name a .png file at the top of output_dir"),
        ({"sample_grid": "samples.jpg"}, "`sample_grid` must name a .png file"),
    ],
)
def test_card_input_errors(kwargs, match, tmp_path):
    pipe = make_tiny_pipeline()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=match):
        write_card(tmp_path, pipe, **kwargs)
    assert not (tmp_path / "README.md").exists()


# ----- train_qac.py --push_to_hub ----------------------------------------------------------------------------------
TRAIN_FLAGS = ["--train_batch_size", "4", "--report_to", "none", "--num_validation_images", "4",
               "--validation_steps", "100", "--max_train_steps", "1", "--push_to_hub", "--fit_schedule_nfe"]


@pytest.fixture
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def image_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index in range(8):
        PIL.Image.new("L", (8, 8), color=index * 30).save(folder / f"{index}.png")
    return folder


def test_training_publishes_no_local_path(fake_hub, tmp_path, fresh_accelerator_state):
    (tmp_path / "model.json").write_text(json.dumps({"code_dim": 5}))
    flags = ["--output_dir", str(tmp_path / "run"), "--train_data_dir", str(image_folder(tmp_path / "images")),
             "--cache_dir", str(tmp_path / "cache"), "--model_config", str(tmp_path / "model.json")]
    train_qac.main([*flags, *TRAIN_FLAGS, "--logging_dir", str(tmp_path / "run" / "logs")])
    files = fake_hub.files(f"{fake_hub.user}/run")
    assert {"README.md", "training_config.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    assert [name for name, content in files.items() if str(tmp_path).encode() in content] == []
    config = json.loads(files["training_config.json"])
    assert config["args"]["train_data_dir"] == "images" and config["args"]["model_config"] == "model.json"
    assert files["training_config.json"] == (tmp_path / "run" / "training_config.json").read_bytes()  # one form


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN")


@pytest.mark.parametrize(
    "hub_problem, message",
    [
        ("unreachable", "Cannot reach the Hub at http://127.0.0.1:[0-9]+ to check the token"),
        ("no_token", "needs a token with write access, and none was found: log in with `hf auth login` or set"),
        ("read_only_token", "The Hub token 'reader' is read-only: pushing to fake-user/run needs one with write"),
    ],
)
@pytest.mark.parametrize("dry_run", [[], ["--dry_run"]])
def test_training_that_cannot_be_pushed_fails_before_its_first_step(
    fake_hub, request, tmp_path, fresh_accelerator_state, hub_problem, message, dry_run
):
    if hub_problem == "unreachable":
        fake_hub.stop()
    else:
        request.getfixturevalue(hub_problem)
    output_dir = tmp_path / "run"
    flags = ["--output_dir", str(output_dir), "--hub_model_id", f"{fake_hub.user}/run", *TRAIN_FLAGS, *dry_run]
    with pytest.raises((ValueError, ConnectionError), match=message):
        train_qac.main(flags)
    assert not output_dir.exists()  # no checkpoint, metrics log or configuration written


def test_hub_token_flag_warns(fake_hub):
    args = train_qac.parse_args(["--push_to_hub", "--hub_token", fake_hub.token])
    with pytest.warns(UserWarning, match="--hub_token shows in process lists .* Log in with `hf auth login` or set"):
        train_qac.check_args(args)
