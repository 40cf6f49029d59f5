"""The EDM formulation is the library's existing EDM code, behind the formulation interface."""

import torch

from conftest import make_tiny_pipeline, seeded
from qac_diffusers.formulations import EDMFormulation, formulation_from_name
from qac_diffusers.models import edm_denoise
from qac_diffusers.schedulers import EDMEulerSigmaMinScheduler, solver_from_config
from qac_diffusers.training.edm_loss import EDMLoss


SHAPE = (3, 1, 8, 8)


def test_draws_and_loss_are_edm_loss():
    pipe = make_tiny_pipeline()
    formulation = EDMFormulation(P_mean=-0.5, P_std=0.8)
    reference = EDMLoss(pipe.scheduler, P_mean=-0.5, P_std=0.8)
    sigma, noise = formulation.sample_noise(SHAPE, seeded(0))
    expected_sigma, expected_noise = reference.sample_noise(SHAPE, seeded(0))
    torch.testing.assert_close(sigma, expected_sigma, rtol=0, atol=0)
    torch.testing.assert_close(noise, expected_noise, rtol=0, atol=0)
    images = torch.rand(SHAPE, generator=seeded(1)) * 2 - 1
    code = pipe.encoder(images).codes
    loss = formulation.loss(pipe.unet, images, sigma, noise, code)
    torch.testing.assert_close(loss, reference(pipe.unet, images, sigma, noise, code), rtol=0, atol=0)


def test_noising_is_x_plus_sigma_n():
    sigma = torch.tensor([0.1, 1.0, 40.0]).reshape(-1, 1, 1, 1)
    images, noise = torch.rand(SHAPE, generator=seeded(2)), torch.randn(SHAPE, generator=seeded(3))
    torch.testing.assert_close(EDMFormulation().add_noise(images, noise, sigma), images + sigma * noise)


def test_denoise_is_edm_denoise_in_both_coordinates():
    pipe = make_tiny_pipeline()
    formulation = formulation_from_name("edm", pipe.scheduler)
    sample, sigma = torch.randn(SHAPE, generator=seeded(4)), torch.full((3, 1, 1, 1), 2.5)
    code = pipe.encoder.indices_to_codes(torch.tensor([0, 5, 9]))
    expected = edm_denoise(pipe.unet, pipe.scheduler, sample, sigma, code)
    torch.testing.assert_close(formulation.denoise(pipe.unet, sample, sigma, code), expected, rtol=0, atol=0)
    torch.testing.assert_close(formulation.denoise_edm(pipe.unet, sample, sigma, code), expected, rtol=0, atol=0)


def test_solve_is_the_pipeline_loop_bit_for_bit():
    pipe = make_tiny_pipeline()
    latents = torch.randn(SHAPE, generator=seeded(5))
    indices = torch.tensor([1, 2, 3])
    expected = pipe(batch_size=3, num_inference_steps=4, code_indices=indices, latents=latents, output_type="pt")
    with torch.no_grad():
        sample = EDMFormulation(pipe.scheduler).solve(pipe.unet, latents, pipe.encoder.indices_to_codes(indices), 4)
    torch.testing.assert_close((sample / 2 + 0.5).clamp(0, 1), expected.images, rtol=0, atol=0)


def test_solvers_come_from_the_edm_solver_table():
    formulation = EDMFormulation()
    euler = formulation.solver("euler")
    assert type(euler) is EDMEulerSigmaMinScheduler
    assert euler.config.final_sigmas_type == solver_from_config("euler", formulation.scheduler.config).config[
        "final_sigmas_type"
    ]
    # and the formulation accepts what its table builds
    assert EDMFormulation(euler).scheduler is euler
