"""The model card and the Hub upload of a trained pipeline, against the loopback Hub of tests/hub_server.py."""

import json
import re
from pathlib import Path

import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard

from conftest import make_tiny_pipeline
from qac_diffusers import QACPipeline
from qac_diffusers.training.code_usage import code_usage
from qac_diffusers.training.hub import push_to_hub, write_model_card

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


def write_card(output_dir: Path, pipe: QACPipeline, **kwargs) -> Path:
    arguments = {
        "repo_id": "fake-user/tiny-qac",
        "dataset_name": "uoft-cs/cifar10",
        "training_config": TRAINING_CONFIG,
        "code_usage": code_usage(pipe.encoder.code_weights) if pipe.encoder is not None else None,
        "training_facts": TRAINING_FACTS,
        "is_baseline": pipe.encoder is None,
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
    uploaded = PIPELINE_FILES | ENCODER_FILES | TOP_LEVEL_FILES | {"samples.png"}
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
    assert "https://arxiv.org/abs/2409.17487" in card.text and "pip install qac-diffusers" in card.text
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

    card = ModelCard.load(write_card(output_dir, pipe, license="mit", training_config={"output_dir": tmp_path}))
    assert card.data.license == "mit"
    assert f'"output_dir": "{tmp_path}"' in card.text  # as train_qac.py writes it: json.dumps(..., default=str)


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
    assert set(fake_hub.files(repo_id)) == PIPELINE_FILES | TOP_LEVEL_FILES | {".gitattributes"}
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
