import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from conftest import make_tiny_models, make_tiny_pipeline, seeded
from qac_diffusers import IPNDMScheduler, QACPipeline
from qac_diffusers.utils import image_grid


REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def test_output_types_and_pinned_values(pipe):
    output = pipe(batch_size=2, generator=seeded(), output_type="np")
    assert output.images.shape == (2, 8, 8, 1) and output.images.dtype == np.float32
    assert output.code_indices.tolist() == [31, 8]
    expected = np.array([0.16169, 0.10352, 0.39419, 0.44699, 0.00103, 0.41227, 0.16091, 0.0, 0.76536])
    assert np.allclose(output.images[0, :3, :3, 0].flatten(), expected, atol=1e-4)
    tensor = pipe(batch_size=2, generator=seeded(), output_type="pt").images
    assert tensor.shape == (2, 1, 8, 8) and torch.allclose(tensor.permute(0, 2, 3, 1), torch.from_numpy(output.images))
    pil = pipe(batch_size=2, generator=seeded()).images
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (8, 8)
    images, code_indices = pipe(batch_size=2, generator=seeded(), output_type="np", return_dict=False)
    assert np.array_equal(images, output.images) and torch.equal(code_indices, output.code_indices)


def test_exactly_num_inference_steps_unet_calls(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        for nfe in (1, 3, 6):
            calls.clear()
            pipe(batch_size=1, num_inference_steps=nfe, generator=seeded(), output_type="pt")
            assert len(calls) == nfe
    finally:
        hook.remove()


def test_generator_list_gives_per_image_reproducibility(pipe):
    batch = pipe(batch_size=2, generator=[seeded(3), seeded(4)], output_type="pt")
    single = pipe(batch_size=1, generator=[seeded(4)], output_type="pt")
    assert torch.allclose(batch.images[1], single.images[0], atol=1e-6)
    assert batch.code_indices[1] == single.code_indices[0]


def test_code_indices_and_latents_are_used(pipe):
    codes = torch.tensor([5, 5])
    output = pipe(batch_size=2, generator=seeded(), code_indices=codes, output_type="pt")
    assert torch.equal(output.code_indices, codes)
    # The noise is drawn before the codes: the same seed with given codes starts from the same latents.
    latents = torch.randn(2, 1, 8, 8, generator=seeded())
    from_latents = pipe(batch_size=2, latents=latents, code_indices=codes, output_type="pt")
    assert torch.allclose(output.images, from_latents.images, atol=1e-6)
    other_code = pipe(batch_size=2, latents=latents, code_indices=torch.tensor([40, 40]), output_type="pt")
    assert not torch.allclose(other_code.images, output.images)


def test_encode_tensor_and_pil_agree_and_make_more_like_them(pipe):
    images = pipe(batch_size=3, generator=seeded(1), output_type="pt").images * 2 - 1
    indices = pipe.encode(images)
    pil_images = [PIL.Image.fromarray(np.uint8(((image[0] + 1) * 127.5).round().numpy())) for image in images]
    assert torch.equal(pipe.encode(pil_images), indices)
    assert torch.equal(pipe(batch_size=3, code_indices=indices, output_type="pt").code_indices, indices)


@pytest.mark.parametrize("scheduler_class", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler, IPNDMScheduler])
def test_runs_with_each_edm_scheduler(scheduler_class):
    pipe = make_tiny_pipeline()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    output = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="pt")
    assert output.images.shape == (2, 1, 8, 8)
    assert torch.isfinite(output.images).all() and output.images.std() > 0


def test_save_and_load_restore_everything(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    # the modules shipped in the folder for plain diffusers (tests/pipelines/test_remote_code.py)
    assert model_index["unet"] == ["unet_2d_qac", "QACUNet2DModel"]
    assert model_index["encoder"] == ["fsq_condition_encoder", "FSQConditionEncoder"]
    assert model_index["scheduler"] == ["scheduling_ipndm", "IPNDMScheduler"]
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == ["diffusion_pytorch_model.safetensors"] * 2
    assert not list(tmp_path.rglob("*.bin"))
    loaded = QACPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded.encoder.code_weights, pipe.encoder.code_weights)
    before = pipe(batch_size=4, generator=seeded(7), output_type="pt")
    after = loaded(batch_size=4, generator=seeded(7), output_type="pt")
    assert torch.equal(before.images, after.images) and torch.equal(before.code_indices, after.code_indices)


def test_fresh_process_loads_the_folder_through_the_generate_script(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "grid.png"
    command = [sys.executable, str(REPO_ROOT / "pipelines" / "generate.py"), "--model", str(tmp_path / "model"),
               "--num_images", "4", "--steps", "3", "--out", str(out), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    expected = image_grid(pipe(batch_size=4, num_inference_steps=3, generator=seeded(0)).images)
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))


def test_custom_pipeline_entry_file(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=str(REPO_ROOT / "pipelines" / "qac_pipeline.py"), trust_remote_code=True
    )
    assert type(loaded).__name__ == "QACPipeline"
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(batch_size=2, generator=seeded(), output_type="pt").images,
                       pipe(batch_size=2, generator=seeded(), output_type="pt").images)


def test_unconditional_baseline_pipeline(tmp_path):
    pipe = make_tiny_pipeline(code_dim=0)
    assert pipe.encoder is None
    output = pipe(batch_size=2, generator=seeded(), output_type="pt")
    assert output.code_indices is None and output.images.shape == (2, 1, 8, 8)
    pipe.save_pretrained(tmp_path)
    loaded = QACPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.encoder is None
    assert torch.equal(loaded(batch_size=2, generator=seeded(), output_type="pt").images, output.images)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(batch_size=1, code_indices=torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional"):
        pipe.encode(torch.zeros(1, 1, 8, 8))


def test_mismatched_components_are_refused():
    unet, encoder = make_tiny_models()
    baseline_unet, _ = make_tiny_models(code_dim=0)
    with pytest.raises(ValueError, match="pass the FSQConditionEncoder"):
        QACPipeline(unet=unet, scheduler=IPNDMScheduler())
    with pytest.raises(ValueError, match="pass `encoder=None`"):
        QACPipeline(unet=baseline_unet, scheduler=IPNDMScheduler(), encoder=encoder)
    _, other_encoder = make_tiny_models(code_dim=5)
    with pytest.raises(ValueError, match="code_dim=5"):
        QACPipeline(unet=unet, scheduler=IPNDMScheduler(), encoder=other_encoder)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, "must be an integer >= 1"),
        ({"batch_size": 0}, "positive integer"),
        ({"output_type": "latent"}, "must be one of"),
        ({"generator": [torch.Generator()]}, "one per image"),
        ({"code_indices": torch.tensor([0, 64])}, r"\[0, 64\)"),
        ({"code_indices": torch.tensor([0, 1, 2])}, r"shape \(2,\)"),
        ({"code_indices": [0, 1]}, r"shape \(2,\)"),
        ({"code_indices": torch.tensor([0.0, 1.0])}, "integer"),
        ({"latents": torch.zeros(2, 3, 8, 8)}, r"shape \(2, 1, 8, 8\)"),
    ],
)
def test_bad_call_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{"batch_size": 2, **kwargs})


def test_bad_images_to_encode(pipe):
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 8, 8\)"):
        pipe.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="size 8x8"):
        pipe.encode([PIL.Image.new("L", (16, 16))])


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.full((1, 1, 8, 8), 255.0), r"in \[-1, 1\], got values in \[255, 255\]: .* `images / 127.5 - 1`"),
        (torch.full((1, 1, 8, 8), -1.5), r"got values in \[-1.5, -1.5\]"),
        (torch.full((1, 1, 8, 8), float("nan")), r"in \[-1, 1\], got values in \[nan, nan\]"),
        ([], "Got an empty list of images: pass at least one image."),
        (torch.zeros(0, 1, 8, 8), r"Got no images \(a tensor of shape \(0, 1, 8, 8\)\)"),
        ([torch.zeros(1, 8, 8)], r"A list of images must hold PIL images, got \['Tensor'\]"),
    ],
)
def test_images_outside_the_range_or_no_images_are_refused(pipe, images, message):
    with pytest.raises(ValueError, match=message):
        pipe.encode(images)


def test_folder_without_a_pipeline_is_an_os_error(tmp_path):
    with pytest.raises(OSError, match="no model_index.json"):
        QACPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("path", ["no-such/parent/model", "./no-such-model", "/no/such/model"])
def test_a_mistyped_local_path_is_named_as_missing(path):
    with pytest.raises(FileNotFoundError, match=r"is not a folder \(no such directory: .*\) and not a Hub repo id"):
        QACPipeline.from_pretrained(path)


def test_a_path_to_a_file_asks_for_the_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file: pass the folder that holds model_index.json"):
        QACPipeline.from_pretrained(tmp_path / "model_index.json")


def test_a_missing_folder_that_could_be_a_repo_id_names_both(fake_hub):
    message = r"(?s)'no-such/model' is not a folder \(no such directory: .*\), and as a Hub repo id it could not be "
    with pytest.raises(FileNotFoundError, match=message + ".*Repository Not Found"):
        QACPipeline.from_pretrained("no-such/model")
    with fake_hub.offline(), pytest.raises(FileNotFoundError, match=message + ".*outgoing traffic has been disabled"):
        QACPipeline.from_pretrained("no-such/model")


@pytest.mark.parametrize(
    "removed, message",
    [
        ("encoder", r"lists the encoder \(FSQConditionEncoder\), but there is no encoder/ folder"),
        ("unet", r"lists the unet \(QACUNet2DModel\), but there is no unet/ folder"),
        ("scheduler", r"lists the scheduler \(IPNDMScheduler\), but there is no scheduler/ folder"),
        ("encoder/diffusion_pytorch_model.safetensors", "encoder/ has no weights file diffusion_pytorch_model.safet"),
        ("unet/diffusion_pytorch_model.safetensors", "unet/ has no weights file diffusion_pytorch_model.safetensors"),
        ("encoder/config.json", "encoder/ has no config.json"),
        ("scheduler/scheduler_config.json", "scheduler/ has no scheduler_config.json"),
    ],
)
def test_an_incomplete_saved_pipeline_names_the_missing_part(pipe, tmp_path, removed, message):
    pipe.save_pretrained(tmp_path)
    if (tmp_path / removed).is_dir():
        shutil.rmtree(tmp_path / removed)
    else:
        (tmp_path / removed).unlink()
    expected = f"The saved pipeline {re.escape(str(tmp_path))} is incomplete: .*{message}"
    with pytest.raises(FileNotFoundError, match=expected):
        QACPipeline.from_pretrained(tmp_path)


def test_a_component_passed_to_from_pretrained_need_not_be_saved(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "scheduler")
    loaded = QACPipeline.from_pretrained(tmp_path, scheduler=EDMEulerScheduler())
    assert isinstance(loaded.scheduler, EDMEulerScheduler)


def test_repo_id_loads_through_the_hub_and_then_from_the_offline_cache(pipe, fake_hub, tmp_path):
    from huggingface_hub import HfApi

    pipe.save_pretrained(tmp_path)
    api = HfApi()
    repo_id = api.create_repo("tiny-qac").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path)
    expected = pipe(batch_size=2, generator=seeded(), output_type="pt").images
    online = QACPipeline.from_pretrained(repo_id)
    online.set_progress_bar_config(disable=True)
    assert torch.equal(online(batch_size=2, generator=seeded(), output_type="pt").images, expected)
    with fake_hub.offline(stop_server=True):
        cached = QACPipeline.from_pretrained(repo_id)
    cached.set_progress_bar_config(disable=True)
    assert torch.equal(cached(batch_size=2, generator=seeded(), output_type="pt").images, expected)
