import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import EDMEulerScheduler

from conftest import make_tiny_pipeline, seeded
from qac_diffusers import IPNDMScheduler, QACPipeline
from qac_diffusers.pipelines.qac.editing_operators import (
    LinearDegradation,
    colorization,
    dct_matrix,
    inpainting,
    super_resolution,
)
from qac_diffusers.pipelines.qac.pipeline_qac_edit import QACImageEditPipeline
from qac_diffusers.schedulers.scheduling_ipndm import karras_sigmas


REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline(pipeline_class=QACImageEditPipeline)


@pytest.fixture(scope="module")
def rgb_pipe():
    return make_tiny_pipeline(channels=3, pipeline_class=QACImageEditPipeline)


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 1, 8, 8, generator=seeded(1)) * 2 - 1


@pytest.fixture(scope="module")
def hole():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    return mask


def random_orthogonal_degradation(num_pixels: int, num_known: int) -> LinearDegradation:
    """A new task in a few lines: known = the first measurements of a random orthogonal matrix on the pixels."""
    q, _ = torch.linalg.qr(torch.randn(num_pixels, num_pixels, generator=seeded(5), dtype=torch.float64))
    q = q.float()
    mask = torch.ones(1, num_pixels)
    mask[:, :num_known] = 0
    return LinearDegradation(
        transform=lambda images: images.flatten(1) @ q.T,
        inverse=lambda coefficients: (coefficients @ q).reshape(-1, 1, 8, 8),
        mask=mask,
    )


DEGRADATIONS = {
    "inpainting": lambda: inpainting((torch.rand(2, 3, 8, 8, generator=seeded(2)) > 0.5).float()),
    "colorization": colorization,
    "super_resolution_1": lambda: super_resolution(1),
    "super_resolution_2": lambda: super_resolution(2),
    "super_resolution_4": lambda: super_resolution(4),
}


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_operators_are_orthogonal(name):
    degradation = DEGRADATIONS[name]()
    images = torch.randn(2, 3, 8, 8, generator=seeded())
    coefficients = degradation.transform(images)
    assert torch.allclose(degradation.inverse(coefficients), images, atol=1e-6)  # A^-1 A = I
    other = torch.randn(coefficients.shape, generator=seeded(3))
    assert torch.allclose(degradation.transform(degradation.inverse(other)), other, atol=1e-6)  # A A^T = I
    assert torch.allclose(coefficients.norm(), images.norm())


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_dct_matrix_is_orthonormal_with_the_mean_first(size):
    matrix = dct_matrix(size)
    assert torch.allclose(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(matrix[0], torch.full((size,), 1 / math.sqrt(size), dtype=torch.float64))


def test_colour_transform_is_luminance_and_two_chroma_rows():
    expected = torch.tensor([[1, 1, 1], [1, 0, -1], [1, -2, 1]], dtype=torch.float64)
    expected /= torch.tensor([[math.sqrt(3)], [math.sqrt(2)], [math.sqrt(6)]], dtype=torch.float64)
    assert torch.allclose(dct_matrix(3), expected, atol=1e-12)


def test_known_parts_are_what_each_task_keeps():
    images = torch.randn(2, 3, 8, 8, generator=seeded())
    mask = (torch.rand(1, 1, 8, 8, generator=seeded(2)) > 0.5).float()
    assert torch.equal(inpainting(mask).known_part(images), images * (1 - mask))
    channel_mean = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.allclose(colorization().known_part(images), channel_mean, atol=1e-6)
    block_means = F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="nearest")
    assert torch.allclose(super_resolution(2).known_part(images), block_means, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_project_takes_the_known_part_of_z_and_the_rest_of_x(name):
    degradation = DEGRADATIONS[name]()
    x, z = torch.randn(2, 2, 3, 8, 8, generator=seeded())
    projected = degradation.project(x, z)
    assert torch.allclose(degradation.known_part(projected), degradation.known_part(z), atol=1e-6)
    assert torch.allclose(projected - degradation.known_part(projected), x - degradation.known_part(x), atol=1e-6)


def test_karras_time_steps_match_the_scheduler_reference():
    expected = torch.tensor([80, 17.528, 2.5152, 0.1698, 0.002], dtype=torch.float64)  # DESIGN.md section 5
    assert torch.allclose(karras_sigmas(5, 0.002, 80.0, 7.0), expected, rtol=5e-4)
    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(3)
    assert torch.allclose(karras_sigmas(5, 0.002, 80.0, 7.0).float(), scheduler.sigmas, rtol=1e-6)
    assert karras_sigmas(1, 0.002, 80.0, 7.0).tolist() == [80.0]


def test_inpaint_keeps_the_known_pixels_and_is_deterministic(pipe, image, hole):
    output = pipe(image, task="inpaint", mask=hole, num_inference_steps=3, generator=seeded(), output_type="pt")
    assert output.images.shape == (2, 1, 8, 8)
    kept = hole.expand_as(image) == 0
    assert torch.allclose((output.images * 2 - 1)[kept], image[kept], atol=1e-6)
    assert not torch.allclose(output.images[~kept], (image[~kept] + 1) / 2, atol=1e-2)  # the hole was filled
    assert torch.allclose(output.degraded * 2 - 1, image * (1 - hole), atol=1e-6)
    again = pipe(image, task="inpaint", mask=hole, num_inference_steps=3, generator=seeded(), output_type="pt")
    assert torch.equal(again.images, output.images)
    other = pipe(image, task="inpaint", mask=hole, num_inference_steps=3, generator=seeded(1), output_type="pt")
    assert not torch.allclose(other.images, output.images)
    expected = np.array([0.32552, 0.44231, 0.38108, 0.59330, 0.54734, 0.58829, 0.35967, 0.47548, 0.26931])
    assert np.allclose(output.images[0, 0, 2:5, 3:6].flatten().numpy(), expected, atol=1e-4)


def test_colorize_keeps_the_luminance(rgb_pipe, image):
    x = rgb_pipe.zero_shot_edit(*rgb_pipe.prepare_colorize(image), num_inference_steps=3, generator=seeded())
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x.mean(dim=1, keepdim=True), image, atol=1e-6)
    assert x.std(dim=1).mean() > 1e-2  # the chroma was filled
    output = rgb_pipe(image, task="colorize", num_inference_steps=3, generator=seeded(), output_type="pt")
    # The output is the same result, clamped to the image range
    assert torch.allclose(output.images, ((x + 1) / 2).clamp(0, 1), atol=1e-6)
    assert torch.allclose(output.degraded * 2 - 1, image.expand(-1, 3, -1, -1), atol=1e-6)
    pil = rgb_pipe(image, task="colorize", num_inference_steps=3, generator=seeded()).images
    assert len(pil) == 2 and pil[0].mode == "RGB" and pil[0].size == (8, 8)


def test_super_resolve_keeps_the_block_means(pipe, image):
    low = F.avg_pool2d(image, 2)
    x = pipe.zero_shot_edit(*pipe.prepare_super_resolve(low, 2), num_inference_steps=3, generator=seeded())
    assert x.shape == (2, 1, 8, 8)
    assert torch.allclose(F.avg_pool2d(x, 2), low, atol=1e-6)
    output = pipe(low, task="super_resolve", factor=2, num_inference_steps=3, generator=seeded(), output_type="np")
    assert output.images.shape == (2, 8, 8, 1)
    assert np.allclose(output.images, ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    nearest = low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert np.allclose(output.degraded * 2 - 1, nearest.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_a_new_degradation_plugs_into_algorithm_2(pipe, image):
    degradation = random_orthogonal_degradation(64, num_known=16)
    x = pipe.zero_shot_edit(image, degradation, num_inference_steps=3, generator=seeded())
    assert torch.allclose(degradation.known_part(x), degradation.known_part(image), atol=1e-5)


def test_one_unet_and_one_encoder_call_per_step(pipe, image, hole):
    calls = []
    hooks = [pipe.unet.register_forward_hook(lambda *args: calls.append("unet")),
             pipe.encoder.register_forward_hook(lambda *args: calls.append("encoder"))]
    try:
        pipe(image, task="inpaint", mask=hole, num_inference_steps=4, generator=seeded(), output_type="pt")
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["encoder", "unet"] * 4  # y <- E(x) before every denoising (Algorithm 2, lines 4-6)


def test_generator_list_gives_per_image_reproducibility(pipe, image, hole):
    batch = pipe(image, task="inpaint", mask=hole, num_inference_steps=3, generator=[seeded(3), seeded(4)],
                 output_type="pt")
    single = pipe(image[1:], task="inpaint", mask=hole, num_inference_steps=3, generator=[seeded(4)],
                  output_type="pt")
    assert torch.allclose(batch.images[1], single.images[0], atol=1e-5)


def test_pil_inputs_and_tuple_output(pipe, image, hole):
    pil_image = PIL.Image.fromarray(np.uint8(((image[0, 0] + 1) * 127.5).round().numpy()))
    pil_mask = PIL.Image.fromarray(np.uint8(hole[0, 0].numpy() * 255))
    images, degraded = pipe(pil_image, task="inpaint", mask=pil_mask, num_inference_steps=3, generator=seeded(),
                            return_dict=False)
    assert images[0].mode == "L" and images[0].size == (8, 8)
    kept = np.asarray(hole[0, 0]) == 0
    assert np.array_equal(np.asarray(images[0])[kept], np.asarray(pil_image)[kept])
    assert np.array_equal(np.asarray(degraded[0])[~kept], np.full((~kept).sum(), 128))


def test_other_edm_scheduler_and_baseline_model(pipe, image, hole):
    kwargs = {"task": "inpaint", "mask": hole, "num_inference_steps": 3, "output_type": "pt"}
    euler_scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)
    euler = QACImageEditPipeline(**{**pipe.components, "scheduler": euler_scheduler})
    euler.set_progress_bar_config(disable=True)
    assert torch.allclose(euler(image, generator=seeded(), **kwargs).images,
                          pipe(image, generator=seeded(), **kwargs).images, atol=1e-6)
    baseline = make_tiny_pipeline(code_dim=0, pipeline_class=QACImageEditPipeline)
    output = baseline(image, generator=seeded(), **kwargs)
    assert torch.isfinite(output.images).all() and output.images.shape == (2, 1, 8, 8)


def test_edit_script_end_to_end(pipe, image, hole, tmp_path):
    QACPipeline(**pipe.components).save_pretrained(tmp_path / "model")
    PIL.Image.fromarray(np.uint8(((image[0, 0] + 1) * 127.5).round().numpy())).save(tmp_path / "in.png")
    PIL.Image.fromarray(np.uint8(hole[0, 0].numpy() * 255)).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    command = [sys.executable, str(REPO_ROOT / "pipelines" / "edit.py"), "--model", str(tmp_path / "model"),
               "--task", "inpaint", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
               "--steps", "3", "--seed", "0", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    expected = pipe(PIL.Image.open(tmp_path / "in.png"), task="inpaint", mask=PIL.Image.open(tmp_path / "mask.png"),
                    num_inference_steps=3, generator=seeded(0)).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "inpaint", "mask": torch.ones(1, 1, 4, 4)}, "the same size"),
        ({"task": "inpaint", "mask": torch.full((1, 1, 8, 8), 0.5)}, "must be binary"),
        ({"task": "inpaint", "mask": torch.ones(3, 1, 8, 8)}, "batch and channel sizes"),
        ({"task": "inpaint"}, "needs a `mask`"),
        ({"task": "inpaint", "mask": torch.ones(8, 8), "factor": 2}, "only used by task='super_resolve'"),
        ({"task": "super_resolve", "factor": 3}, "divides the model size 8x8"),
        ({"task": "super_resolve", "factor": 2}, "must be 4x4"),
        ({"task": "super_resolve"}, "needs the upscaling `factor`"),
        ({"task": "colorize"}, "3-channel"),
        ({"task": "colorize", "mask": torch.ones(8, 8)}, "only used by task='inpaint'"),
        ({"task": "sharpen"}, "must be one of"),
        ({"task": "inpaint", "mask": torch.ones(8, 8), "num_inference_steps": 0}, "integer >= 1"),
        ({"task": "inpaint", "mask": torch.ones(8, 8), "output_type": "latent"}, "must be one of"),
        ({"task": "inpaint", "mask": torch.ones(8, 8), "generator": [seeded()]}, "one per image"),
    ],
)
def test_bad_inputs(pipe, image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(image, **kwargs)


@pytest.mark.parametrize(
    "images, kwargs",
    [
        (torch.full((1, 1, 8, 8), 255.0), {"task": "inpaint", "mask": torch.ones(8, 8)}),
        (torch.full((1, 1, 4, 4), 255.0), {"task": "super_resolve", "factor": 2}),
        (torch.full((1, 1, 8, 8), 255.0), {"task": "colorize"}),
    ],
)
def test_images_outside_the_range_are_refused(pipe, rgb_pipe, images, kwargs):
    edit = rgb_pipe if kwargs["task"] == "colorize" else pipe
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in \[255, 255\]: convert \[0, 255\] pixels"):
        edit(images, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"task": "inpaint", "mask": torch.ones(8, 8)}, {"task": "super_resolve", "factor": 2}, {"task": "colorize"}],
)
def test_no_images_are_refused(pipe, rgb_pipe, kwargs):
    edit = rgb_pipe if kwargs["task"] == "colorize" else pipe
    with pytest.raises(ValueError, match="Got an empty list of images: pass at least one image."):
        edit([], **kwargs)


def test_zero_shot_edit_refuses_a_reference_outside_the_range(pipe, hole):
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in \[0, 2\]"):
        pipe.zero_shot_edit(torch.full((1, 1, 8, 8), 2.0) * (1 - hole), inpainting(hole))


def test_colour_images_are_refused_by_colorize(rgb_pipe):
    with pytest.raises(ValueError, match=r"grey images of shape \(batch, 1, height, width\)"):
        rgb_pipe(torch.zeros(1, 3, 8, 8), task="colorize")
    with pytest.raises(ValueError, match="mode 'L'"):
        rgb_pipe(PIL.Image.new("RGB", (8, 8)), task="colorize")
    with pytest.raises(ValueError, match="the model makes 8x8"):
        rgb_pipe(PIL.Image.new("L", (4, 4)), task="colorize")
