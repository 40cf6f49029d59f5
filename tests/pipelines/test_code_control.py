"""Code-controlled generation: variations of a reference, interpolation between codes, the code usage report."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import make_tiny_pipeline, seeded
from qac_diffusers.training.code_usage import code_usage, codes_for_share, cumulative_shares, top_codes
from qac_diffusers.utils import image_grid


REPO_ROOT = Path(__file__).resolve().parents[2]
# With code_dim = 6: 5 = levels (1, 0, 1, 0, 0, 0) and 58 = (0, 1, 0, 1, 1, 1) (channel 0 first) differ everywhere.
CODE_A, CODE_B = 5, 58


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def test_variations_share_the_reference_code_are_seeded_and_differ(pipe):
    references = pipe(batch_size=2, num_inference_steps=3, generator=seeded(1), output_type="pt").images * 2 - 1
    output = pipe.variations(
        references, num_variations=3, num_inference_steps=3, generator=seeded(2), output_type="pt"
    )
    assert output.images.shape == (6, 1, 8, 8)
    assert output.code_indices.tolist() == pipe.encode(references).repeat_interleave(3).tolist()
    again = pipe.variations(references, num_variations=3, num_inference_steps=3, generator=seeded(2), output_type="pt")
    assert torch.equal(again.images, output.images)
    for first in range(6):
        for second in range(first + 1, 6):
            assert not torch.allclose(output.images[first], output.images[second], atol=1e-3)
    pil = PIL.Image.fromarray(np.uint8(((references[0, 0] + 1) * 127.5).round().numpy()))
    from_pil = pipe.variations(pil, num_variations=2, num_inference_steps=1, generator=seeded(), output_type="pt")
    assert from_pil.code_indices.tolist() == pipe.encode(pil).tolist() * 2


@pytest.mark.parametrize("path", ["bits", "linear"])
def test_interpolation_endpoints_are_the_plain_samples_from_the_same_noise(pipe, path):
    latents = torch.randn(1, 1, 8, 8, generator=seeded(3))
    row = pipe.interpolate(CODE_A, CODE_B, num_points=4, num_inference_steps=3, latents=latents, output_type="pt",
                           path=path).images
    for image, code in ((row[0], CODE_A), (row[-1], CODE_B)):
        plain = pipe(batch_size=1, num_inference_steps=3, code_indices=torch.tensor([code]), latents=latents,
                     output_type="pt").images[0]
        assert torch.allclose(image, plain, atol=1e-6)
    assert not torch.allclose(row[1], row[0], atol=1e-3) and not torch.allclose(row[1], row[-1], atol=1e-3)


def test_every_point_starts_from_the_same_noise_image(pipe):
    row = pipe.interpolate(CODE_A, CODE_A, num_points=3, num_inference_steps=2, generator=seeded(), output_type="pt",
                           path="linear").images
    # Equal up to float rounding: identical inputs in one batch are not always bitwise equal.
    assert torch.allclose(row[0], row[1], atol=1e-6) and torch.allclose(row[0], row[2], atol=1e-6)
    latents = torch.randn(1, 1, 8, 8, generator=seeded())
    same_seed = pipe.interpolate(CODE_A, CODE_A, num_points=3, num_inference_steps=2, latents=latents,
                                 output_type="pt", path="linear").images
    assert torch.allclose(same_seed, row, atol=1e-6)


def test_bits_path_walks_through_real_codes_one_channel_at_a_time(pipe):
    codes = pipe.interpolation_codes(CODE_A, CODE_B)
    assert codes.shape == (7, 6)  # Hamming distance 6, + 1
    assert torch.equal(codes, codes.round())
    assert ((codes[1:] != codes[:-1]).sum(dim=1) == 1).all()
    # channel 0 changes first, then channel 1, ...
    assert pipe.encoder.codes_to_indices(codes).tolist() == [5, 4, 6, 2, 10, 26, 58]
    output = pipe.interpolate(CODE_A, CODE_B, num_inference_steps=1, generator=seeded(), output_type="pt")
    assert output.images.shape == (7, 1, 8, 8) and output.code_indices.tolist() == [5, 4, 6, 2, 10, 26, 58]
    # num_points picks evenly spaced steps of the walk, rounded half up, endpoints included
    four = pipe.interpolation_codes(CODE_A, CODE_B, num_points=4)
    assert pipe.encoder.codes_to_indices(four).tolist() == [5, 6, 10, 58]
    assert pipe.encoder.codes_to_indices(pipe.interpolation_codes(CODE_A, 26, num_points=3)).tolist() == [5, 2, 26]
    assert pipe.interpolation_codes(CODE_A, CODE_A).shape == (1, 6)


def test_linear_path_blends_the_levels(pipe):
    # 5 = (1, 0, 1, 0, 0, 0) and 7 = (1, 1, 1, 0, 0, 0) differ in channel 1 only.
    codes = pipe.interpolation_codes(CODE_A, 7, num_points=3, path="linear")
    assert codes.tolist() == [[1, 0, 1, 0, 0, 0], [1, 0.5, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    middle = pipe.interpolation_codes(CODE_A, CODE_B, num_points=5, path="linear")[2]
    assert middle.tolist() == [0.5] * 6
    levels = torch.tensor([1, 0, 1, 0, 0, 0])
    assert torch.equal(pipe.interpolation_codes(levels, torch.tensor(7), num_points=3, path="linear"), codes)
    output = pipe.interpolate(CODE_A, 7, num_points=3, num_inference_steps=1, generator=seeded(), path="linear")
    assert len(output.images) == 3 and output.code_indices is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_points": 1}, "integer >= 2"),
        ({"num_points": 8}, "`num_points` <= 7"),
        ({"path": "spline"}, "'bits' or 'linear'"),
        ({"code_a": 64}, r"\[0, 64\)"),
        ({"code_a": torch.tensor(1.0)}, "integer"),
        ({"code_a": torch.zeros(5)}, r"shape \(6,\)"),
        ({"code_a": [0, 1, 0, 1, 0, 1]}, r"shape \(6,\)"),
        ({"code_b": torch.tensor([0, 2, 0, 0, 0, 0])}, r"integer levels in \[0, 1\]"),
        ({"code_b": torch.tensor([0, 0.5, 0, 0, 0, 0])}, r"integer levels in \[0, 1\]"),
        ({"latents": torch.zeros(2, 1, 8, 8)}, r"shape \(1, 1, 8, 8\)"),
        ({"output_type": "latent"}, "must be one of"),
        ({"num_inference_steps": 0}, "must be an integer >= 1"),
    ],
)
def test_bad_interpolate_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.interpolate(**{"code_a": CODE_A, "code_b": CODE_B, **kwargs})


def test_variations_refuse_references_outside_the_range(pipe):
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in \[0, 255\]"):
        pipe.variations(torch.arange(64.0).reshape(1, 1, 8, 8) * 255 / 63)
    with pytest.raises(ValueError, match="Got an empty list of images"):
        pipe.variations([])


def test_bad_variations_and_unconditional_pipeline(pipe):
    for num_variations in (0, 2.0):
        with pytest.raises(ValueError, match="`num_variations` must be a positive integer"):
            pipe.variations(torch.zeros(1, 1, 8, 8), num_variations=num_variations)
    baseline = make_tiny_pipeline(code_dim=0)
    with pytest.raises(ValueError, match="unconditional"):
        baseline.variations(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        baseline.interpolate(0, 1)


def test_code_usage_shares_and_top_codes_pinned():
    weights = torch.tensor([0.0, 3.0, 0.0, 4.0, 2.0, 1.0, 0.0, 0.0])
    assert cumulative_shares(weights).tolist() == [0.4, 0.7, 0.9, 1.0]
    assert [codes_for_share(weights, share) for share in (0.3, 0.5, 0.7, 0.9, 0.99, 1.0)] == [1, 2, 2, 3, 4, 4]
    assert codes_for_share(weights, 0.5) == code_usage(weights)["codes_for_half_weight"]
    indices, shares = top_codes(weights, 3)
    assert indices.tolist() == [3, 1, 4] and shares.tolist() == [0.4, 0.3, 0.2]
    assert top_codes(weights, 10)[0].tolist() == [3, 1, 4, 5]  # only the used codes
    assert top_codes(torch.tensor([1.0, 2.0, 2.0, 0.0]), 2)[0].tolist() == [1, 2]  # ties: lower index first
    with pytest.raises(ValueError, match="all zero"):
        top_codes(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="all zero"):
        codes_for_share(torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        codes_for_share(weights, 0.0)
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        top_codes(weights, 0)


def test_report_script_writes_the_report(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    out_dir = tmp_path / "report"
    command = [sys.executable, str(REPO_ROOT / "pipelines" / "code_usage.py"), "--model", str(tmp_path / "model"),
               "--top_codes", "3", "--samples_per_code", "2", "--steps", "2", "--tile_size", "16",
               "--device", "cpu", "--out_dir", str(out_dir)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr

    weights = pipe.encoder.code_weights
    indices, shares = top_codes(weights, 3)
    report = (out_dir / "code_usage.md").read_text()
    assert "| codes used | 64 of 64 (L=2, d=6) |" in report
    assert f"| entropy | {code_usage(weights)['entropy_bits']:.3f} bits (at most 6.000) |" in report
    assert f"| codes for 90% of the weight | {codes_for_share(weights, 0.9)} |" in report
    levels = "".join(str(int(level)) for level in pipe.encoder.indices_to_codes(indices[0]).tolist())
    assert f"| 1 | {indices[0].item()} | `{levels}` | {shares[0].item():.2%} | {shares[0].item():.2%} |" in report
    assert PIL.Image.open(out_dir / "cumulative_share.png").size == (720, 480)

    # One row per top code, in order, from one generator seeded with --seed (default 0).
    generator, samples = seeded(0), []
    for index in indices.tolist():
        samples += pipe(batch_size=2, num_inference_steps=2, generator=generator,
                        code_indices=torch.full((2,), index)).images
    expected = np.asarray(image_grid(samples, tile_size=16, columns=2))
    assert expected.shape == (54, 36, 3)  # 3 rows and 2 columns of 16-pixel tiles, each with a 2-pixel border
    assert np.array_equal(np.asarray(PIL.Image.open(out_dir / "top_codes.png")), expected)



def test_editing_pipeline_inherits_working_code_control():
    from qac_diffusers import QACImageEditPipeline

    pipe = make_tiny_pipeline(pipeline_class=QACImageEditPipeline)
    reference = torch.rand(1, 1, 8, 8) * 2 - 1
    output = pipe.variations(reference, num_variations=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert output.images.shape == (2, 1, 8, 8) and (output.code_indices == pipe.encode(reference)).all()
    row = pipe.interpolate(0, 3, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert row.images.shape == (3, 1, 8, 8)
