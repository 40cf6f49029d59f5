import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, UNet2DModel

from qac_diffusers.schedulers import IPNDMScheduler, IPNDMSchedulerOutput
from qac_diffusers.schedulers.scheduling_ipndm import adams_bashforth_weights, variable_step_adams_bashforth_weights


ALL_OPTIONS = [
    {"analytical_first_step": afs, "final_sigmas_type": final, "variable_step": variable}
    for afs in (True, False)
    for final in ("sigma_min", "zero")
    for variable in (False, True)
]


def dummy_model(model_input, timestep):
    """A deterministic stand-in for the UNet: any fixed smooth function of the scaled input and c_noise."""
    return torch.sin(model_input) * 0.5 + 0.1 * timestep


def sample_loop(scheduler, num_inference_steps, latents, model=dummy_model):
    """The generic diffusers loop; returns the final sample and the number of model calls."""
    scheduler.set_timesteps(num_inference_steps)
    sample = latents * scheduler.init_noise_sigma
    calls = 0
    for t in scheduler.timesteps:
        model_output = model(scheduler.scale_model_input(sample, t), t)
        calls += 1
        sample = scheduler.step(model_output, t, sample).prev_sample
    return sample, calls


def public_config(scheduler):
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def latents(shape=(2, 3, 4, 4), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize(
    "options, num_inference_steps, expected",
    [
        # DESIGN.md section 5 reference values [80, 17.528, 2.5152, 0.1698, 0.002], here to 6 digits
        ({}, 3, [80.0, 17.5278, 2.51522, 0.169753, 0.002]),
        # DESIGN.md: [80, 34.992, 13.699, 4.6371, 1.2866, 0.2675, 0.0352, 0.002]
        ({}, 6, [80.0, 34.9922, 13.6986, 4.63707, 1.28661, 0.267475, 0.0351867, 0.002]),
        ({"analytical_first_step": False}, 3, [80.0, 9.7232, 0.469979, 0.002]),
        ({"final_sigmas_type": "zero"}, 3, [80.0, 9.7232, 0.469979, 0.002, 0.0]),
        ({"analytical_first_step": False, "final_sigmas_type": "zero"}, 3, [80.0, 2.51522, 0.002, 0.0]),
    ],
)
def test_schedule_reference_values(options, num_inference_steps, expected):
    scheduler = IPNDMScheduler(**options)
    scheduler.set_timesteps(num_inference_steps)
    assert scheduler.sigmas.dtype == torch.float32
    assert scheduler.sigmas.device.type == "cpu"
    torch.testing.assert_close(scheduler.sigmas, torch.tensor(expected), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("options", ALL_OPTIONS)
@pytest.mark.parametrize("num_inference_steps", [1, 2, 3, 6, 10])
def test_timesteps_are_c_noise_of_the_model_calls(options, num_inference_steps):
    scheduler = IPNDMScheduler(**options)
    scheduler.set_timesteps(num_inference_steps)
    first_call = 1 if options["analytical_first_step"] else 0
    sigmas = scheduler.sigmas

    assert len(scheduler.timesteps) == num_inference_steps
    assert len(sigmas) == num_inference_steps + 1 + first_call
    assert sigmas[0].item() == pytest.approx(80.0)
    assert sigmas[-1].item() == (pytest.approx(0.002) if options["final_sigmas_type"] == "sigma_min" else 0.0)
    assert torch.all(sigmas[1:] < sigmas[:-1])
    expected = 0.25 * torch.log(sigmas[first_call : first_call + num_inference_steps])
    torch.testing.assert_close(scheduler.timesteps, expected)


@pytest.mark.parametrize("options", ALL_OPTIONS)
@pytest.mark.parametrize("max_order", [1, 4])
@pytest.mark.parametrize("num_inference_steps", [1, 3, 5])
def test_generic_loop_calls_the_model_nfe_times(options, max_order, num_inference_steps):
    scheduler = IPNDMScheduler(max_order=max_order, **options)
    sample, calls = sample_loop(scheduler, num_inference_steps, latents())
    assert calls == num_inference_steps
    assert torch.isfinite(sample).all()

    with pytest.raises(ValueError, match="called more often than the"):
        scheduler.step(torch.zeros_like(sample), scheduler.timesteps[-1], sample)


def test_generic_loop_with_a_unet2dmodel():
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    calls = []

    def model(model_input, timestep):
        calls.append(timestep)
        with torch.no_grad():
            return unet(model_input, timestep).sample

    scheduler = IPNDMScheduler()
    sample, _ = sample_loop(scheduler, 3, latents((1, 3, 8, 8)), model=model)
    assert len(calls) == 3
    assert all(t.dtype == torch.float32 and t.ndim == 0 for t in calls)  # a float tensor, never truncated to an int
    assert sample.shape == (1, 3, 8, 8) and torch.isfinite(sample).all()


def test_init_noise_sigma():
    scheduler = IPNDMScheduler(analytical_first_step=False)
    scheduler.set_timesteps(4)
    assert scheduler.init_noise_sigma == pytest.approx(80.0)

    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(3)
    sigma_0, sigma_1 = 80.0, scheduler.sigmas[1].item()
    k = (math.sqrt(1 + sigma_0**2) + sigma_1 - sigma_0) / math.sqrt(1 + sigma_0**2)
    assert scheduler.init_noise_sigma == pytest.approx(sigma_0 * k, rel=1e-12)


def test_analytical_first_step_joins_the_history():
    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(4)
    noise = latents(dtype=torch.float64)
    sample = noise * scheduler.init_noise_sigma  # x_1, the first Euler step from x_0 = noise * sigma_0 already taken
    t = scheduler.timesteps[0]
    model_output = dummy_model(scheduler.scale_model_input(sample, t), t)
    scheduler.step(model_output, t, sample)

    sigma_0 = scheduler.sigmas[0].item()
    sigma_1 = scheduler.sigmas[1].item()
    d_0 = noise * sigma_0 / math.sqrt(1 + sigma_0**2)
    denoised = scheduler.precondition_outputs(sample, model_output, sigma_1)
    d_1 = (sample - denoised) / sigma_1
    assert scheduler.lower_order_nums == 2
    torch.testing.assert_close(scheduler.derivatives[-2], d_0, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(scheduler.derivatives[-1], d_1, rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# configuration, saving and switching schedulers


@pytest.mark.parametrize(
    "key, value",
    [
        ("sigma_min", 0.01),
        ("sigma_max", 40.0),
        ("sigma_data", 1.0),
        ("rho", 5.0),
        ("max_order", 1),
        ("max_order", 2),
        ("max_order", 3),
        ("analytical_first_step", False),
        ("final_sigmas_type", "zero"),
        ("variable_step", True),
    ],
)
def test_save_pretrained_round_trip(tmp_path, key, value):
    scheduler = IPNDMScheduler(**{key: value})
    scheduler.save_pretrained(tmp_path)
    loaded = IPNDMScheduler.from_pretrained(tmp_path)

    assert loaded.config[key] == value
    assert public_config(loaded) == public_config(scheduler)
    expected, _ = sample_loop(scheduler, 4, latents())
    actual, _ = sample_loop(loaded, 4, latents())
    assert torch.equal(actual, expected)


def test_compatibles():
    compatibles = IPNDMScheduler().compatibles
    # diffusers has an unrelated `IPNDMScheduler` of its own: the list must hold this one
    assert IPNDMScheduler in compatibles
    assert EDMEulerScheduler in compatibles
    assert EDMDPMSolverMultistepScheduler in compatibles
    assert len(compatibles) == 3


@pytest.mark.parametrize("other_cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_from_config_to_diffusers_schedulers(other_cls):
    scheduler = IPNDMScheduler(sigma_min=0.005, sigma_max=60.0, sigma_data=0.6, rho=6.0, final_sigmas_type="zero")
    other = other_cls.from_config(scheduler.config)
    for key in ("sigma_min", "sigma_max", "sigma_data", "rho", "final_sigmas_type"):
        assert other.config[key] == scheduler.config[key]

    sample, calls = sample_loop(other, 5, latents())
    assert calls == 5
    assert torch.isfinite(sample).all()

    back = IPNDMScheduler.from_config(other.config)
    assert public_config(back) == public_config(scheduler)


@pytest.mark.parametrize("other_cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_from_config_from_diffusers_schedulers(other_cls):
    other = other_cls(sigma_min=0.005, sigma_max=60.0, sigma_data=0.6, rho=6.0, final_sigmas_type="sigma_min")
    scheduler = IPNDMScheduler.from_config(other.config)
    for key in ("sigma_min", "sigma_max", "sigma_data", "rho", "final_sigmas_type"):
        assert scheduler.config[key] == other.config[key]
    assert scheduler.config.max_order == 4 and scheduler.config.analytical_first_step

    sample, calls = sample_loop(scheduler, 5, latents())
    assert calls == 5
    assert torch.isfinite(sample).all()
    assert scheduler.sigmas[0].item() == pytest.approx(60.0)
    assert scheduler.sigmas[-1].item() == pytest.approx(0.005)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_order": 0}, "`max_order` must be one of 1, 2, 3 or 4"),
        ({"max_order": 5}, "`max_order` must be one of 1, 2, 3 or 4"),
        ({"sigma_min": 80.0}, "0 < sigma_min < sigma_max"),
        ({"sigma_min": 0.0}, "0 < sigma_min < sigma_max"),
        ({"sigma_data": 0.0}, "`sigma_data` must be positive"),
        ({"rho": -1.0}, "`rho` must be positive"),
        ({"final_sigmas_type": "denoise_to_zero"}, "`final_sigmas_type` must be 'sigma_min' or 'zero'"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IPNDMScheduler(**kwargs)


@pytest.mark.parametrize("num_inference_steps", [0, -3, 2.5])
def test_bad_num_inference_steps_raises(num_inference_steps):
    with pytest.raises(ValueError, match=rf"must be an integer >= 1, got {num_inference_steps}"):
        IPNDMScheduler().set_timesteps(num_inference_steps)


@pytest.mark.parametrize("error_class", [ValueError, AttributeError])
def test_use_before_set_timesteps_raises(error_class):
    scheduler = IPNDMScheduler()
    with pytest.raises(error_class, match="The schedule is not set: call `set_timesteps"):
        scheduler.init_noise_sigma
    with pytest.raises(error_class, match="The schedule is not set: call `set_timesteps"):
        scheduler.step(torch.zeros(1), 0.5, torch.zeros(1))


def test_attribute_probes_on_a_fresh_scheduler_do_not_raise():
    # `init_noise_sigma` depends on the schedule: before `set_timesteps` it is missing, as an AttributeError tells
    scheduler = IPNDMScheduler()
    assert not hasattr(scheduler, "init_noise_sigma")
    assert getattr(scheduler, "init_noise_sigma", None) is None
    members = dict(inspect.getmembers(scheduler))
    assert "init_noise_sigma" not in members and "config" in members

    scheduler.set_timesteps(3)
    assert hasattr(scheduler, "init_noise_sigma")
    assert dict(inspect.getmembers(scheduler))["init_noise_sigma"] == scheduler.init_noise_sigma


def test_timestep_not_in_schedule_raises():
    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(3)
    sample = latents()
    with pytest.raises(ValueError, match="is not in the schedule"):
        scheduler.step(sample, 0, sample)


# ---------------------------------------------------------------------------------------------------------------------
# step outputs


def test_tuple_and_dict_outputs_are_equal():
    sample = latents() * 10.0
    outputs = []
    for return_dict in (True, False):
        scheduler = IPNDMScheduler()
        scheduler.set_timesteps(3)
        results = []
        for t in scheduler.timesteps:
            model_output = dummy_model(scheduler.scale_model_input(sample, t), t)
            results.append(scheduler.step(model_output, t, sample, return_dict=return_dict))
        outputs.append(results)

    for dict_output, tuple_output in zip(*outputs):
        assert isinstance(dict_output, IPNDMSchedulerOutput)
        assert isinstance(tuple_output, tuple) and len(tuple_output) == 2
        assert torch.equal(dict_output.prev_sample, tuple_output[0])
        assert torch.equal(dict_output.pred_original_sample, tuple_output[1])


def test_pred_original_sample_is_the_denoiser():
    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(3)
    sample = latents() * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    model_output = dummy_model(scheduler.scale_model_input(sample, t), t)
    output = scheduler.step(model_output, t, sample)
    expected = scheduler.precondition_outputs(sample, model_output, scheduler.sigmas[1])
    torch.testing.assert_close(output.pred_original_sample, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sample_keeps_its_dtype(dtype):
    scheduler = IPNDMScheduler()
    sample, _ = sample_loop(scheduler, 3, latents().to(dtype), model=lambda x, t: dummy_model(x, t).to(dtype))
    assert sample.dtype == dtype
    assert torch.isfinite(sample).all()

    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    output = scheduler.step(torch.zeros(2, dtype=dtype), t, torch.ones(2, dtype=dtype))
    assert output.prev_sample.dtype == dtype
    assert output.pred_original_sample.dtype == dtype
    assert scheduler.derivatives[-1].dtype == torch.float32


@pytest.mark.parametrize(
    "options, expected_slice, expected_mean_abs",
    [
        ({}, [-1.00524, -1.02047, -0.28147, -0.46997], 0.70545),
        ({"variable_step": True}, [-0.70527, -0.71731, -0.18043, -0.30864], 0.49468),
        (
            {"analytical_first_step": False, "final_sigmas_type": "zero", "max_order": 3},
            [-0.80520, -0.81920, -0.21039, -0.35397],
            0.56087,
        ),
    ],
)
def test_full_loop_pinned_values(options, expected_slice, expected_mean_abs):
    sample, _ = sample_loop(IPNDMScheduler(**options), 5, latents())
    torch.testing.assert_close(sample[0, 0, 0], torch.tensor(expected_slice), rtol=1e-4, atol=1e-5)
    assert sample.abs().mean().item() == pytest.approx(expected_mean_abs, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# preconditioning and noise


def test_preconditioning_broadcasts_per_sample_sigmas():
    scheduler = IPNDMScheduler()
    reference = EDMEulerScheduler()
    sample = latents()
    model_output = latents() * 0.3
    sigmas = torch.tensor([0.05, 20.0])

    batched_inputs = scheduler.precondition_inputs(sample, sigmas.view(2, 1, 1, 1))
    batched_outputs = scheduler.precondition_outputs(sample, model_output, sigmas.view(2, 1, 1, 1))
    for i, sigma in enumerate(sigmas.tolist()):
        torch.testing.assert_close(batched_inputs[i], reference.precondition_inputs(sample[i], sigma))
        torch.testing.assert_close(
            batched_outputs[i], reference.precondition_outputs(sample[i], model_output[i], sigma)
        )
    assert batched_inputs[1, 0, 0, 0].item() == pytest.approx(sample[1, 0, 0, 0].item() / math.sqrt(400.25))

    assert scheduler.precondition_noise(sigmas).shape == (2,)
    assert scheduler.precondition_noise(sigmas.view(2, 1, 1, 1)).shape == (2, 1, 1, 1)
    torch.testing.assert_close(scheduler.precondition_noise(sigmas), 0.25 * torch.log(sigmas))
    torch.testing.assert_close(scheduler.precondition_noise(80.0), reference.precondition_noise(80.0))


def test_scale_model_input_uses_the_current_sigma():
    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(4)
    sample = latents()
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i + 1]
        torch.testing.assert_close(scheduler.scale_model_input(sample, t), sample / (sigma**2 + 0.25) ** 0.5)
        scheduler.step(torch.zeros_like(sample), t, sample)


@pytest.mark.parametrize(
    "sigmas", [0.7, torch.tensor(0.7), torch.tensor([0.7, 3.0]), torch.tensor([0.7, 3.0]).view(2, 1, 1, 1)]
)
def test_add_noise_at_noise_levels(sigmas):
    scheduler = IPNDMScheduler()
    original = latents()
    noise = latents() * -2.0
    noisy = scheduler.add_noise(original, noise, sigmas=sigmas)
    per_sample = torch.as_tensor(sigmas).flatten().expand(2).tolist()
    for i, sigma in enumerate(per_sample):
        torch.testing.assert_close(noisy[i], original[i] + sigma * noise[i])


def test_add_noise_at_timesteps_as_diffusers_edm_schedulers():
    # diffusers' convention: the third argument is a timestep of the schedule, c_noise = ln(sigma) / 4 (here
    # negative for the smaller sigmas); the same timesteps give the noise level of EDMEulerScheduler.add_noise
    scheduler = IPNDMScheduler(analytical_first_step=False, final_sigmas_type="zero")
    reference = EDMEulerScheduler()
    for s in (scheduler, reference):
        s.set_timesteps(4)
    torch.testing.assert_close(scheduler.timesteps, reference.timesteps)
    assert (scheduler.timesteps < 0).any()
    original = torch.zeros(4, 1, 2, 2)
    noise = torch.ones(4, 1, 2, 2)
    noisy = scheduler.add_noise(original, noise, scheduler.timesteps)
    torch.testing.assert_close(noisy, reference.add_noise(original, noise, reference.timesteps), rtol=1e-6, atol=0)
    torch.testing.assert_close(noisy[:, 0, 0, 0], scheduler.sigmas[:4], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"timesteps": torch.zeros(2), "sigmas": torch.ones(2)}])
def test_add_noise_needs_timesteps_or_sigmas(kwargs):
    sample = latents()
    with pytest.raises(ValueError, match="Pass either `timesteps` .* or `sigmas=`"):
        IPNDMScheduler().add_noise(sample, sample, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Adams-Bashforth weights


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("start, step", [(0.0, -1.0), (80.0, -7.5), (0.3, 0.01)])
def test_variable_step_weights_equal_fixed_weights_on_a_uniform_grid(order, start, step):
    sigmas = [start - j * step for j in range(order)]  # newest first
    weights = variable_step_adams_bashforth_weights(sigmas, start + step)
    np.testing.assert_allclose(weights, adams_bashforth_weights(order), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_variable_step_weights_integrate_polynomials_exactly(order):
    sigmas = [17.5, 30.0, 80.0, 81.5][:order]  # a non-uniform grid, newest first
    sigma_next = 2.5
    h = sigma_next - sigmas[0]
    weights = variable_step_adams_bashforth_weights(sigmas, sigma_next)
    for degree in range(order):
        # p(sigma) = sigma**degree: h * sum_j w_j p(sigma_j) must equal the integral of p over the step
        quadrature = h * sum(w * s**degree for w, s in zip(weights, sigmas))
        exact = (sigma_next ** (degree + 1) - sigmas[0] ** (degree + 1)) / (degree + 1)
        assert quadrature == pytest.approx(exact, rel=1e-10)
    if order < 4:
        # and not one degree more (the Lagrange extrapolation error is not zero)
        quadrature = h * sum(w * s**order for w, s in zip(weights, sigmas))
        assert quadrature != pytest.approx((sigma_next ** (order + 1) - sigmas[0] ** (order + 1)) / (order + 1))


@pytest.mark.parametrize("max_order", [2, 3, 4])
@pytest.mark.parametrize("analytical_first_step", [True, False])
def test_fixed_and_variable_step_agree_on_a_uniform_schedule(max_order, analytical_first_step):
    # rho = 1 makes the polynomial schedule uniform, where fixed and variable-step weights are the same numbers: the
    # fixed weights are checked against the independently verified Lagrange integrals, history wiring included. The
    # float32 sigmas are uniform up to rounding, hence the tolerance; dropping one order changes the result by > 1e-3.
    options = {"rho": 1.0, "sigma_max": 10.0, "analytical_first_step": analytical_first_step}
    fixed, _ = sample_loop(IPNDMScheduler(**options, max_order=max_order), 6, latents(dtype=torch.float64))
    variable, _ = sample_loop(
        IPNDMScheduler(**options, max_order=max_order, variable_step=True), 6, latents(dtype=torch.float64)
    )
    lower_order, _ = sample_loop(IPNDMScheduler(**options, max_order=max_order - 1), 6, latents(dtype=torch.float64))
    torch.testing.assert_close(fixed, variable, rtol=1e-5, atol=1e-6)
    assert (fixed - lower_order).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# closed-form accuracy: Gaussian data x0 ~ N(0, s^2 I)
#
# The exact denoiser is D(x; sigma) = x * s^2 / (s^2 + sigma^2), and the probability-flow ODE
# dx/dsigma = (x - D) / sigma has the solution x(sigma) = x(sigma_0) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_0^2).
# The "UNet" below returns the F whose preconditioned output is exactly D, so the only error left is the solver's. The
# ODE is linear, so one scalar sample of value 1 gives the relative error; float64 keeps rounding far below it.
# With s = sigma_data = 0.5 the analytical first step is not exact: its d_0 = x / sqrt(1 + sigma^2) is the exact
# derivative only for s^2 = sigma * (sqrt(1 + sigma^2) - sigma), about 1/2 at sigma = 80. Its relative error here is
# 4e-5 in an Euler step that shrinks with the NFE, too small to show at the NFE used below.

GAUSSIAN_STD = 0.5


def gaussian_unet(model_input, timestep, sigma_data=0.5):
    """The F of the exact denoiser: invert c_noise and c_in, then solve D = c_skip * x + c_out * F for F."""
    sigma = torch.exp(4.0 * timestep.double())
    sample = model_input * (sigma**2 + sigma_data**2) ** 0.5
    denoised = sample * GAUSSIAN_STD**2 / (GAUSSIAN_STD**2 + sigma**2)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return (denoised - c_skip * sample) / c_out


def gaussian_relative_error(scheduler, num_inference_steps):
    ones = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    sample, _ = sample_loop(scheduler, num_inference_steps, ones, model=gaussian_unet)
    sigma_0, sigma_end = scheduler.sigmas[0].item(), scheduler.sigmas[-1].item()
    exact = sigma_0 * math.sqrt(GAUSSIAN_STD**2 + sigma_end**2) / math.sqrt(GAUSSIAN_STD**2 + sigma_0**2)
    return abs(sample.item() / exact - 1)


CONVERGENCE_NFE = [8, 16, 32, 64, 128]


def convergence_errors(scheduler):
    """The relative errors at `CONVERGENCE_NFE` and the empirical order between the last two (NFE 64 -> 128)."""
    errors = [gaussian_relative_error(scheduler, n) for n in CONVERGENCE_NFE]
    order = math.log(errors[-2] / errors[-1]) / math.log(CONVERGENCE_NFE[-1] / CONVERGENCE_NFE[-2])
    return errors, order


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_gaussian_variable_step_converges_at_its_order(max_order):
    # Variable-step Adams-Bashforth of order p is p-th order on any smooth grid. Its Euler warm start would limit it
    # to second order in the limit, but that step is taken at sigma_max where the solution is nearly linear, so in
    # this NFE range the measured order approaches p from below (at 64 -> 128: 0.97, 1.90, 2.81, 3.70).
    errors, order = convergence_errors(IPNDMScheduler(variable_step=True, max_order=max_order))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert max_order - 0.5 < order < max_order + 0.3, (order, errors)


@pytest.mark.parametrize("max_order", [2, 3, 4])
def test_gaussian_fixed_weights_are_second_order_on_the_polynomial_schedule(max_order):
    # The fixed (uniform-step) weights on a non-uniform grid satisfy the first two order conditions only, whatever the
    # order: the mismatch of the f' term is h_n * (h_n - h_{n-j}) = O(h^3) per step, so iPNDM converges at second
    # order on the polynomial schedule (measured 2.0 for every max_order). Wrong first- or second-order weights would
    # give order <= 1; the higher weights are checked by `test_fixed_and_variable_step_agree_on_a_uniform_schedule`.
    # (max_order=1 is Euler for both kinds of weights: the variable-step test covers it.)
    errors, order = convergence_errors(IPNDMScheduler(max_order=max_order))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert 1.8 < order < 2.3, (order, errors)


@pytest.mark.parametrize(
    "variable_step, expected",
    [
        # fixed weights: far more accurate at 3-4 NFE but not monotone (NFE 5 is worse than NFE 4), as the prototype in
        # DESIGN.md section 9 saw on images
        (False, [9.117625e-02, 1.366002e-02, 9.546174e-02, 7.499874e-02]),
        # variable-step weights: monotone, less accurate at few steps
        (True, [5.083424e-01, 4.082874e-01, 3.004589e-01, 2.589473e-01]),
    ],
)
def test_gaussian_few_step_errors_pinned(variable_step, expected):
    scheduler = IPNDMScheduler(variable_step=variable_step)
    errors = [gaussian_relative_error(scheduler, n) for n in (3, 4, 5, 6)]
    np.testing.assert_allclose(errors, expected, rtol=1e-4)
