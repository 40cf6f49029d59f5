"""One pipeline for both formulations (issue 9): rectified flow and Gaussian conditions through QACPipeline."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)

from conftest import count_unet_calls, make_rf_pipeline, make_tiny_models, make_tiny_pipeline, seeded
from qac_diffusers import IPNDMScheduler, QACImageEditPipeline, QACPipeline
from qac_diffusers.formulations import RectifiedFlowFormulation
from qac_diffusers.metrics.trajectory import pipeline_conditional_flow_matching_loss, pipeline_curvature
from qac_diffusers.models import GaussianConditionEncoder


@pytest.fixture
def rf_pipe():
    return make_rf_pipeline()


def test_rectified_flow_pipeline_is_euler_on_rne_grid(rf_pipe):
    # The pipeline's Euler sampler is x_{i+1} = x_i - v(x_i, t_i) / N with t_i = 1 - i / N, code by code.
    output = rf_pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="pt")
    latents = torch.randn((2, 1, 8, 8), generator=seeded())
    code = rf_pipe.encoder.indices_to_codes(output.code_indices)
    x = latents
    for i in range(4):
        t = 1 - i / 4
        x = x - rf_pipe.unet(x, torch.full((2,), t * 1000), code=code).sample / 4
    torch.testing.assert_close(output.images, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "scheduler_class, nfe", [(FlowMatchEulerDiscreteScheduler, 4), (FlowMatchHeunDiscreteScheduler, 5)]
)
def test_diffusers_flow_matching_schedulers_spend_exactly_the_nfe(scheduler_class, nfe):
    pipe = make_rf_pipeline(scheduler_class())
    calls = count_unet_calls(pipe)
    images = pipe(batch_size=2, num_inference_steps=nfe, generator=seeded(), output_type="pt").images
    assert len(calls) == nfe and torch.isfinite(images).all()
    assert calls[0].flatten()[0].item() == 1000.0  # the first call is at t = 1, pure noise


def test_rk45_reference_reports_its_nfe_and_draws_as_call_does(rf_pipe):
    calls = count_unet_calls(rf_pipe)
    output, nfe = rf_pipe.sample_reference(batch_size=2, generator=seeded(), output_type="pt")
    assert nfe == len(calls) and nfe >= 6 and output.images.shape == (2, 1, 8, 8)
    # the same seed draws the same codes as __call__
    assert torch.equal(output.code_indices, rf_pipe(batch_size=2, generator=seeded(), output_type="pt").code_indices)
    # RK45 and a fine Euler grid solve the same ODE
    fine = rf_pipe(batch_size=2, num_inference_steps=200, generator=seeded(), output_type="pt").images
    assert (output.images - fine).abs().max() < 0.02


def test_edm_has_no_reference_solver():
    with pytest.raises(ValueError, match="'edm' formulation has no adaptive reference solver"):
        make_tiny_pipeline().sample_reference(batch_size=1, generator=seeded())


@pytest.mark.parametrize("scheduler", [FlowMatchEulerDiscreteScheduler(), FlowMatchHeunDiscreteScheduler()])
def test_rectified_flow_saves_and_loads_its_formulation(scheduler, tmp_path):
    pipe = make_rf_pipeline(scheduler)
    expected = pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt")
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["formulation"] == "rectified_flow"
    loaded = QACPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.formulation == "rectified_flow" and type(loaded.scheduler) is type(scheduler)
    assert isinstance(loaded.formulation, RectifiedFlowFormulation)
    again = loaded(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt")
    assert torch.equal(again.images, expected.images) and torch.equal(again.code_indices, expected.code_indices)


def test_plain_diffusers_loads_a_rectified_flow_folder(rf_pipe, tmp_path):
    rf_pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__module__.startswith("diffusers_modules") and loaded.config.formulation == "rectified_flow"
    assert torch.equal(
        loaded(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images,
        rf_pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images,
    )


def test_folders_saved_before_formulations_load_as_edm(tmp_path):
    pipe = make_tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index.pop("formulation") == "edm"
    (tmp_path / "model_index.json").write_text(json.dumps(model_index))
    loaded = QACPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.formulation == "edm"
    assert torch.equal(
        loaded(batch_size=2, generator=seeded(), output_type="pt").images,
        pipe(batch_size=2, generator=seeded(), output_type="pt").images,
    )


def test_each_formulation_refuses_the_others_schedulers():
    unet, encoder = make_tiny_models()
    with pytest.raises(
        ValueError,
        match=r"'rectified_flow' formulation cannot be sampled with IPNDMScheduler.*"
        r"FlowMatchEulerDiscreteScheduler",
    ):
        QACPipeline(unet=unet, scheduler=IPNDMScheduler(), encoder=encoder, formulation="rectified_flow")
    with pytest.raises(
        ValueError,
        match=r"'edm' formulation cannot be sampled with FlowMatchHeunDiscreteScheduler.*"
        r"solver_from_config",
    ):
        QACPipeline(unet=unet, scheduler=FlowMatchHeunDiscreteScheduler(), encoder=encoder)
    with pytest.raises(ValueError, match=r"Unknown formulation 'flow'.*'edm', 'rectified_flow'"):
        QACPipeline(unet=unet, scheduler=IPNDMScheduler(), encoder=encoder, formulation="flow")
    # a scheduler swapped in after loading is checked when sampling
    pipe = make_rf_pipeline()
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match="cannot be sampled with EDMEulerScheduler"):
        pipe(batch_size=1, generator=seeded())


def test_heun_needs_an_odd_nfe():
    with pytest.raises(ValueError, match="pass 3 or 5"):
        make_rf_pipeline(FlowMatchHeunDiscreteScheduler())(num_inference_steps=4)


def test_gaussian_conditions_come_from_the_prior(tmp_path):
    pipe = make_rf_pipeline(encoder="gaussian")
    output = pipe(batch_size=3, num_inference_steps=2, generator=seeded(), output_type="pt")
    assert output.code_indices is None
    # the noise first, then y ~ N(0, I): the UNet saw the generator's next 3 x 6 normals
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["code"]), with_kwargs=True)
    pipe(batch_size=3, num_inference_steps=1, generator=seeded(), output_type="pt")
    generator = seeded()
    torch.randn((3, 1, 8, 8), generator=generator)
    torch.testing.assert_close(calls[0], torch.randn((3, 6), generator=generator))
    pipe.save_pretrained(tmp_path)
    loaded = QACPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.encoder) is GaussianConditionEncoder
    assert torch.equal(
        loaded(batch_size=3, num_inference_steps=2, generator=seeded(), output_type="pt").images, output.images
    )


def test_gaussian_encoder_variations_and_refusals():
    pipe = make_rf_pipeline(encoder="gaussian")
    images = torch.rand((2, 1, 8, 8), generator=seeded()) * 2 - 1
    codes, indices = pipe.encode_conditions(images)
    assert indices is None and torch.equal(codes, pipe.encoder(images).mean)
    variations = pipe.variations(images, num_variations=2, num_inference_steps=2, generator=seeded(), output_type="pt")
    assert variations.code_indices is None and variations.images.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="continuous conditions, not code indices"):
        pipe.encode(images)
    with pytest.raises(ValueError, match="no codebook, code indices"):
        pipe(batch_size=1, code_indices=torch.tensor([0]))
    with pytest.raises(ValueError, match="Interpolation walks between codes of a codebook"):
        pipe.interpolate(0, 1)


def test_fsq_variations_keep_the_reference_codes(rf_pipe):
    images = torch.rand((2, 1, 8, 8), generator=seeded()) * 2 - 1
    variations = rf_pipe.variations(
        images, num_variations=2, num_inference_steps=2, generator=seeded(), output_type="pt"
    )
    assert torch.equal(variations.code_indices, rf_pipe.encode(images).repeat_interleave(2))
    same = rf_pipe(
        batch_size=4, num_inference_steps=2, generator=seeded(), code_indices=variations.code_indices, output_type="pt"
    )
    assert torch.equal(variations.images, same.images)


def test_rectified_flow_editing_keeps_the_known_part():
    pipe = make_rf_pipeline(pipeline_class=QACImageEditPipeline)
    sigmas = pipe.formulation.edit_sigmas(3)
    assert np.allclose(sigmas.tolist(), [999.0, (999 ** (1 / 7) / 2 + (1 / 999) ** (1 / 7) / 2) ** 7, 1 / 999])
    image = torch.rand((1, 1, 8, 8), generator=seeded()) * 2 - 1
    hole = torch.zeros((1, 1, 8, 8))
    hole[..., 2:6, 2:6] = 1
    output = pipe(image, task="inpaint", mask=hole, num_inference_steps=3, generator=seeded(), output_type="pt")
    kept = hole == 0
    assert torch.allclose((output.images * 2 - 1)[kept], image[kept], atol=1e-6)
    assert torch.isfinite(output.images).all()


def test_rectified_flow_denoiser_and_metrics():
    pipe = make_rf_pipeline()
    assert pipe.formulation.sigma_range == pytest.approx((1 / 999, 999))
    # D(x; sigma) = x_t - t v(x_t, t) at x_t = x / (1 + sigma), t = sigma / (1 + sigma)
    x, code = torch.randn((2, 1, 8, 8), generator=seeded()), pipe.encoder.indices_to_codes(torch.tensor([1, 2]))
    sigma = 3.0
    velocity = pipe.unet(x / 4, torch.full((2,), 750.0), code=code).sample
    torch.testing.assert_close(pipe.denoise(x, sigma, code), x / 4 - 0.75 * velocity)
    curvature = pipeline_curvature(pipe, num_samples=2, num_steps=3, generator=seeded())
    loss = pipeline_conditional_flow_matching_loss(pipe, torch.rand((2, 1, 8, 8)) * 2 - 1, generator=seeded())
    assert math.isfinite(curvature) and curvature >= 0 and math.isfinite(loss) and loss > 0
    gaussian = make_rf_pipeline(encoder="gaussian")
    assert math.isfinite(pipeline_curvature(gaussian, num_samples=2, num_steps=2, generator=seeded()))



def load_generate_script():
    path = Path(__file__).resolve().parents[2] / "pipelines" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_script_samples_rectified_flow_with_its_solvers(rf_pipe, tmp_path, capsys):
    generate = load_generate_script()
    rf_pipe.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--num_images", "2", "--device", "cpu"]
    generate.main([*common, "--scheduler", "heun", "--steps", "3", "--out", str(tmp_path / "heun.png")])
    assert "(3 NFE, heun)" in capsys.readouterr().out and (tmp_path / "heun.png").is_file()
    generate.main([*common, "--scheduler", "rk45", "--out", str(tmp_path / "rk45.png")])
    nfe = int(capsys.readouterr().out.split("(")[1].split(" NFE")[0])
    assert nfe > 3 and (tmp_path / "rk45.png").is_file()
    with pytest.raises(ValueError, match="Unknown rectified-flow solver 'ipndm'"):
        generate.main([*common, "--scheduler", "ipndm"])


def test_rectified_flow_loads_through_the_loopback_hub(rf_pipe, fake_hub, tmp_path):
    from huggingface_hub import HfApi

    rf_pipe.save_pretrained(tmp_path)
    api = HfApi()
    repo_id = api.create_repo("tiny-rf").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path)
    online = QACPipeline.from_pretrained(repo_id)
    online.set_progress_bar_config(disable=True)
    assert online.config.formulation == "rectified_flow"
    assert torch.equal(
        online(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images,
        rf_pipe(batch_size=2, num_inference_steps=3, generator=seeded(), output_type="pt").images,
    )
