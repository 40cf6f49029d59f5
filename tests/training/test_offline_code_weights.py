"""Offline code weights (paper Table 2): a direct count of the codes of a data set, stored as the online ones."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import make_tiny_models, make_tiny_pipeline, seeded
from pipelines import offline_code_weights as script
from qac_diffusers import QACPipeline
from qac_diffusers.models.gaussian_condition_encoder import GaussianConditionEncoder
from qac_diffusers.training.code_usage import offline_code_weights


def test_offline_weights_are_the_share_of_each_code():
    _, encoder = make_tiny_models()
    images = torch.rand(40, 1, 8, 8, generator=seeded(0)) * 2 - 1
    weights = offline_code_weights(encoder, images.split(16))
    indices = encoder(images).indices
    expected = torch.zeros(encoder.codebook_size)
    for index in indices.tolist():
        expected[index] += 1 / 40
    torch.testing.assert_close(weights, expected)
    assert weights.dtype == encoder.code_weights.dtype == torch.float32


def test_no_images_is_refused():
    _, encoder = make_tiny_models()
    with pytest.raises(ValueError, match="Got no images"):
        offline_code_weights(encoder, [])


def test_a_gaussian_encoder_has_no_codes_to_count():
    unet, _ = make_tiny_models()
    with pytest.raises(ValueError, match="no codebook, code indices or code weights"):
        offline_code_weights(GaussianConditionEncoder.for_unet(unet, code_dim=4), [torch.zeros(1, 1, 8, 8)])


def test_the_script_saves_a_pipeline_with_the_offline_weights(tmp_path):
    pipe = make_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    for i, array in enumerate(pixels):
        PIL.Image.fromarray(array, mode="L").save(tmp_path / "images" / f"{i}.png")

    script.main(["--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "offline"),
                 "--train_data_dir", str(tmp_path / "images"), "--batch_size", "5"])

    loaded = QACPipeline.from_pretrained(tmp_path / "offline")
    images = torch.from_numpy(pixels).float().unsqueeze(1) / 127.5 - 1
    counts = torch.bincount(pipe.encoder(images).indices, minlength=pipe.encoder.codebook_size)
    torch.testing.assert_close(loaded.encoder.code_weights, counts.float() / 12)
    torch.testing.assert_close(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight, rtol=0, atol=0)


def test_the_script_refuses_to_overwrite_the_online_weights(tmp_path):
    make_tiny_pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="online code weights would be lost"):
        script.main(["--model", str(tmp_path), "--output_dir", str(tmp_path)])
