"""The solvers by name: each spends its N model calls on N steps that move, whatever the origin of the config."""

import io
import json
import logging

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffusers.utils import logging as diffusers_logging

from conftest import make_tiny_pipeline, seeded
from qac_diffusers import IPNDMScheduler, QACPipeline
from qac_diffusers.schedulers import SOLVERS, solver_from_config


CONFIG_ORIGINS = ["fresh", "loaded"]
FINAL_SIGMAS_TYPES = ["sigma_min", "zero"]


def scheduler_config(origin: str, final_sigmas_type: str, folder):
    """An IPNDMScheduler config as a pipeline holds it: just built, or read back after `save_pretrained`."""
    # A fresh config records which keys hold default values, and diffusers' `from_config` drops those keys; a config
    # loaded from disk has no such record: the two origins take different paths through `from_config`.
    options = {} if final_sigmas_type == "sigma_min" else {"final_sigmas_type": final_sigmas_type}
    scheduler = IPNDMScheduler(**options)
    if origin == "fresh":
        return scheduler.config
    scheduler.save_pretrained(folder)
    return IPNDMScheduler.from_pretrained(folder).config


def polynomial_grid(num_inference_steps: int, final_sigmas_type: str) -> torch.Tensor:
    """N steps over the N + 1 points of the Karras schedule to sigma_min (or N points and a final 0)."""
    scheduler = IPNDMScheduler(analytical_first_step=False, final_sigmas_type=final_sigmas_type)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.sigmas


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("origin", CONFIG_ORIGINS)
@pytest.mark.parametrize("final_sigmas_type", FINAL_SIGMAS_TYPES)
@pytest.mark.parametrize("num_inference_steps", [1, 2, 4, 7])
def test_every_solver_spends_its_nfe_on_steps_that_move(
    name, origin, final_sigmas_type, num_inference_steps, tmp_path
):
    scheduler = solver_from_config(name, scheduler_config(origin, final_sigmas_type, tmp_path))
    scheduler.set_timesteps(num_inference_steps)
    sigmas = scheduler.sigmas

    assert len(scheduler.timesteps) == num_inference_steps
    assert torch.all(sigmas[1:] < sigmas[:-1]), sigmas  # no step of length 0
    assert sigmas[0].item() == pytest.approx(80.0)
    assert sigmas[-1].item() == (pytest.approx(0.002) if final_sigmas_type == "sigma_min" else 0.0)
    assert scheduler.config.final_sigmas_type == final_sigmas_type
    # every call is at a point of the grid that a step leaves
    called = torch.exp(4 * scheduler.timesteps.double())
    torch.testing.assert_close(called, sigmas[len(sigmas) - 1 - num_inference_steps : -1].double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["euler", "dpmsolver2", "dpmsolver3"])
@pytest.mark.parametrize("origin", CONFIG_ORIGINS)
@pytest.mark.parametrize("final_sigmas_type", FINAL_SIGMAS_TYPES)
def test_diffusers_solvers_run_on_the_grid_of_ipndm_without_the_analytical_first_step(
    name, origin, final_sigmas_type, tmp_path
):
    scheduler = solver_from_config(name, scheduler_config(origin, final_sigmas_type, tmp_path))
    for num_inference_steps in (1, 4, 20):
        scheduler.set_timesteps(num_inference_steps)
        expected = polynomial_grid(num_inference_steps, final_sigmas_type)
        # diffusers' DPM-Solver computes the schedule in float32, the others in float64
        torch.testing.assert_close(scheduler.sigmas, expected, rtol=1e-5, atol=0)
        assert scheduler.num_inference_steps == num_inference_steps


def test_euler_is_first_order_ipndm_on_the_same_grid():
    # Euler steps over the 5 points of the Karras schedule to sigma_min; iPNDM with max_order 1 and no analytical
    # first step is the same method: the same start gives the same end, so no step is lost or repeated.
    config = IPNDMScheduler().config
    euler = solver_from_config("euler", config)
    ipndm = IPNDMScheduler.from_config(config, max_order=1, analytical_first_step=False)
    start = torch.randn(2, 1, 4, 4, generator=seeded(), dtype=torch.float64) * 80.0
    ends = []
    for scheduler in (euler, ipndm):
        scheduler.set_timesteps(4)
        sample = start
        for t in scheduler.timesteps:
            model_output = torch.tanh(scheduler.scale_model_input(sample, t)) + 0.1 * t
            sample = scheduler.step(model_output, t, sample).prev_sample
        ends.append(sample)
    torch.testing.assert_close(ends[0].double(), ends[1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    """Tiny QAC pipelines saved with each `final_sigmas_type`, as `train_qac.py` leaves them."""
    folders = {}
    for final_sigmas_type in FINAL_SIGMAS_TYPES:
        pipe = make_tiny_pipeline()
        pipe.scheduler = IPNDMScheduler(final_sigmas_type=final_sigmas_type)
        folders[final_sigmas_type] = tmp_path_factory.mktemp(final_sigmas_type)
        pipe.save_pretrained(folders[final_sigmas_type])
    return folders


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("final_sigmas_type", FINAL_SIGMAS_TYPES)
def test_loaded_pipeline_calls_the_unet_once_per_step(name, final_sigmas_type, saved_pipelines):
    pipe = QACPipeline.from_pretrained(saved_pipelines[final_sigmas_type])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = solver_from_config(name, pipe.scheduler.config)
    timesteps = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(float(args[1])))
    try:
        pipe(batch_size=1, num_inference_steps=4, generator=seeded(), output_type="pt")
    finally:
        hook.remove()

    assert len(timesteps) == 4
    sigmas = pipe.scheduler.sigmas
    assert torch.all(sigmas[1:] < sigmas[:-1]), sigmas
    assert timesteps == sorted(set(timesteps), reverse=True)  # four distinct noise levels, from high to low


@pytest.mark.parametrize("name", ["euler", "dpmsolver2"])
def test_pipeline_saved_with_a_diffusers_solver_loads_it_back(name, saved_pipelines, tmp_path):
    pipe = QACPipeline.from_pretrained(saved_pipelines["sigma_min"])
    pipe.scheduler = solver_from_config(name, pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    module, class_name = json.loads((tmp_path / "model_index.json").read_text())["scheduler"]
    assert class_name == type(pipe.scheduler).__name__
    assert (tmp_path / "scheduler" / f"{module}.py").is_file()  # shipped for plain diffusers

    loaded = QACPipeline.from_pretrained(tmp_path).scheduler
    assert type(loaded) is type(pipe.scheduler)
    loaded.set_timesteps(3)
    torch.testing.assert_close(loaded.sigmas, polynomial_grid(3, "sigma_min"), rtol=1e-6, atol=0)


def test_solvers_by_name_share_the_sigma_range():
    config = IPNDMScheduler(sigma_max=60.0).config
    for name in SOLVERS:
        assert solver_from_config(name, config).config.sigma_max == 60.0
    assert solver_from_config("ipndm_variable", config).config.variable_step is True
    assert solver_from_config("ipndm", IPNDMScheduler(variable_step=True).config).config.variable_step is False
    assert isinstance(solver_from_config("euler", config), EDMEulerScheduler)
    dpm = solver_from_config("dpmsolver3", config)
    assert isinstance(dpm, EDMDPMSolverMultistepScheduler) and dpm.config.solver_order == 3
    with pytest.raises(ValueError, match="Unknown solver 'heun'"):
        solver_from_config("heun", config)


@pytest.mark.parametrize("name", ["euler", "dpmsolver2"])
def test_diffusers_solvers_are_built_from_an_ipndm_config_without_warnings(name):
    fitted = [[60.0, 5.0, 1.0, 0.002]]
    config = IPNDMScheduler(sigma_max=60.0, max_order=3, variable_step=True, fitted_sigmas=fitted).config
    logger, captured = diffusers_logging.get_logger("diffusers.configuration_utils"), io.StringIO()
    handler = logging.StreamHandler(captured)
    logger.addHandler(handler)
    try:
        solver = solver_from_config(name, config)
    finally:
        logger.removeHandler(handler)
    assert captured.getvalue() == ""
    assert solver.config.sigma_max == 60.0 and "fitted_sigmas" not in solver.config
