# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Trajectory curvature and the conditional flow-matching loss (paper Table 1; DESIGN.md section 8).

Both are measured in the coordinates of the Rectified Flow X_t = (1 - t) X_0 + t X_1, X_1 ~ N(0, I) (paper eq. 8),
the setting of the paper's Table 1 (it follows the code of RNE, Lee et al. 2023, "Minimizing Trajectory Curvature of
ODE-based Generative Models", https://huggingface.co/papers/2301.12003). An EDM model (paper eq. 7, X_sigma = X_0 +
sigma * X_1) describes the same family of distributions: X_t = X_sigma / (1 + sigma) with t = sigma / (1 + sigma), so
E[X_0 | X_t] = D(X_sigma; sigma) and everything below is expressed through the EDM denoiser D.

A *denoiser* is any callable `denoiser(x, sigma) -> D(x; sigma)` taking `x` of shape `(batch, ...)` and `sigma` of
shape `(batch, 1, ..., 1)` (same dtype and device as `x`, broadcastable against it) and returning a tensor shaped like
`x`: a closed-form ideal denoiser, or a trained pipeline through [`pipeline_denoiser`].
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor


if TYPE_CHECKING:
    from ..models import NoiseEncoder
    from ..pipelines import QACPipeline

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def uniform_time_sigmas(num_steps: int, sigma_max: float) -> torch.Tensor:
    """
    The EDM noise levels of a grid uniform in Rectified-Flow time: t_i = t_max (1 - i / N), sigma_i = t_i / (1 - t_i),
    i = 0..N, with t_max = sigma_max / (1 + sigma_max). This is the uniform Euler grid of the RNE code, started at
    sigma_max instead of pure noise (an EDM model is not defined at sigma = infinity, t = 1).

    Args:
        num_steps (`int`): N, the number of Euler steps, at least 1.
        sigma_max (`float`): The first noise level, positive.

    Returns:
        `torch.Tensor` of shape `(N + 1,)`, float64, from `sigma_max` down to exactly 0.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be an integer >= 1, got {num_steps!r}.")
    if not sigma_max > 0:
        raise ValueError(f"`sigma_max` must be positive, got {sigma_max!r}.")
    t_max = sigma_max / (1 + sigma_max)
    times = t_max * (1 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)
    sigmas = times / (1 - times)
    sigmas[0] = sigma_max  # exactly, not up to rounding
    return sigmas


def trajectory_curvature(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    r"""
    The curvature of the probability-flow ODE trajectories from `noise` (RNE's `straightness`, paper Table 1).

    The trajectory: Euler steps of dx/dsigma = (x - D(x; sigma)) / sigma over the EDM noise levels `sigmas`, from
    x(sigma_0) = sigma_0 * noise; a step to sigma = 0 lands on D. (An Euler step is the same update whether it is
    taken in the EDM or the Rectified-Flow coordinates, so this is also RNE's Euler sampler.) It is measured in
    Rectified-Flow coordinates, point i being y_i = x_i / (1 + sigma_i) at time t_i = sigma_i / (1 + sigma_i):

    - y_0 is the start (the noise, scaled to sigma_0) and y_N the end (the sample, at the last sigma); the trajectory
      runs from i = 0 to i = N;
    - time is normalised so that the whole trajectory has length 1: dt_i = (t_{i-1} - t_i) / (t_0 - t_N);
    - v_i = (y_{i-1} - y_i) / dt_i is the (negated) velocity of step i and y_0 - y_N the (negated) velocity of the
      straight line from start to end, with the same sign convention, so a trajectory that is straight and run at
      constant speed has curvature exactly 0;
    - C = sum_i dt_i * mean((v_i - (y_0 - y_N))^2), the mean taken over all dimensions of a sample.

    On a grid uniform in t (see [`uniform_time_sigmas`]) dt_i = 1/N and this is literally RNE's
    `mean_i mean(((y_{i-1} - y_i) / dt - (y_0 - y_N))^2)` (DESIGN.md section 8); on other grids it is the same
    integral over t, weighted by the step lengths. Since sum_i dt_i v_i = y_0 - y_N, C = sum_i dt_i mean(v_i^2) -
    mean((y_0 - y_N)^2): the energy of the path beyond that of the straight line, accumulated in float64 without
    storing the trajectory.

    Examples of closed-form answers: data concentrated at one point x_0 (D = x_0) gives y(t) = (1 - t) x_0 + t * noise,
    a straight line at constant speed, C = 0 on any grid; data from N(0, s^2 I) gives a straight line at varying
    speed, C > 0; a mixture of several points gives curved trajectories.

    Args:
        denoiser (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`): D(x; sigma), see the module docstring.
        noise (`torch.Tensor` of shape `(batch, ...)`): Standard normal noise; the dtype of the computation.
        sigmas (`torch.Tensor` of shape `(N + 1,)`): The noise levels, strictly decreasing from sigma_0 > 0 to
            sigma_N >= 0 (e.g. [`uniform_time_sigmas`]).

    Returns:
        `torch.Tensor` of shape `(batch,)`, float64: the curvature of each trajectory; `.mean()` is the paper's number.
    """
    sigmas = _check_sigmas(sigmas)
    times = sigmas / (1 + sigmas)
    dts = (times[:-1] - times[1:]) / (times[0] - times[-1])
    reduce_dims = tuple(range(1, noise.ndim))

    x = sigmas[0].item() * noise
    y_start = (x / (1 + sigmas[0].item())).to(torch.float64)
    y_prev = y_start
    energy = torch.zeros(noise.shape[0], dtype=torch.float64, device=noise.device)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        denoised = denoiser(x, _batch_sigma(sigma, x))
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
        y = (x / (1 + sigma_next)).to(torch.float64)
        velocity = (y_prev - y) / dts[i].item()
        energy += dts[i].item() * velocity.square().mean(dim=reduce_dims)
        y_prev = y
    chord = y_start - y_prev
    return energy - chord.square().mean(dim=reduce_dims)


def conditional_flow_matching_loss(
    denoiser: Denoiser,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    noise_encoder: "NoiseEncoder | None" = None,
) -> torch.Tensor:
    r"""
    One Monte Carlo draw of the conditional flow-matching loss L_CFM of paper eq. (12) and Table 1, per image.

    The paper: L_CFM = int_0^T w_t E_{X_0, Y ~ q_phi} || \dot X_t - v_theta(X_t, t, Y) ||^2 dt, with X_0 the data,
    Y its condition (the code of X_0 for QAC; none for an unconditional model), X_t the forward flow and \dot X_t
    its time derivative. As in Table 1 (RNE's setting) the flow is the Rectified Flow X_t = (1 - t) X_0 + t X_1,
    X_1 ~ N(0, I) (paper eq. 8), so \dot X_t = X_1 - X_0, with w_t uniform. For an EDM denoiser, the model's
    velocity is v_theta(X_t, t, Y) = E[X_1 - X_0 | X_t] = (X_t - D(X_sigma; sigma, Y)) / t with sigma = t / (1 - t)
    and X_sigma = X_t / (1 - t) = X_0 + sigma X_1, hence

        \dot X_t - v_theta(X_t, t, Y) = (D(X_0 + sigma X_1; sigma, Y) - X_0) / t.

    t is drawn uniformly from [t(sigma_min), t(sigma_max)], t(sigma) = sigma / (1 + sigma), the noise levels on which
    an EDM model is defined (with the defaults, 98.6% of (0, 1)); the squared norm is averaged over the dimensions
    of an image, as RNE's mean squared error is. The exact denoiser of the data gives the smallest possible value,
    the intersection term V((X_0, X_1)) of paper eq. (11); data concentrated at one point gives exactly 0.

    Args:
        denoiser (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`): D(x; sigma), see the module docstring.
            For a conditional model it must condition sample b on the code of `images[b]`.
        images (`torch.Tensor` of shape `(batch, ...)`): Held-out data X_0 (in [-1, 1] for images); its dtype and
            device are those of the computation.
        generator (`torch.Generator`, *optional*): The random source of t and X_1 (t first, then X_1).
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0): The range of noise levels.
        noise_encoder ([`NoiseEncoder`], *optional*): RNE's q(X_1 | X_0), for a model trained on that coupling:
            X_1 = mean(X_0) + exp(logvar(X_0) / 2) n with the unit noise n drawn as X_1 is without it (so a fresh
            noise encoder, q = N(0, I), gives the same value). `None`: the independent coupling X_1 ~ N(0, I).

    Returns:
        `torch.Tensor` of shape `(batch,)`: || \dot X_t - v_theta ||^2 / dim for one (t, X_1) per image; the mean over
        images and draws estimates L_CFM.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"Need 0 < sigma_min < sigma_max, got {sigma_min=} and {sigma_max=}.")
    batch_size = images.shape[0]
    t_min, t_max = sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max)
    uniform = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=_device(generator, images))
    times = (t_min + (t_max - t_min) * uniform).to(device=images.device, dtype=images.dtype)
    noise = randn_tensor(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    if noise_encoder is not None:
        to_encoder = {"device": noise_encoder.device, "dtype": noise_encoder.dtype}
        with torch.no_grad():
            noise = noise_encoder(images.to(**to_encoder), noise=noise.to(**to_encoder)).noise
        noise = noise.to(device=images.device, dtype=images.dtype)

    times = times.reshape(-1, *([1] * (images.ndim - 1)))
    sigmas = times / (1 - times)
    denoised = denoiser(images + sigmas * noise, sigmas)
    return ((denoised - images) / times).square().mean(dim=tuple(range(1, images.ndim)))


def pipeline_denoiser(pipeline: "QACPipeline", code: torch.Tensor | None = None) -> Denoiser:
    """
    The denoiser D(x; sigma, code) in EDM coordinates of a [`QACPipeline`] of either formulation
    ([`QACPipeline.denoise`]), without gradients.

    Args:
        pipeline ([`QACPipeline`]): The model.
        code (`torch.Tensor` of shape `(batch, code_dim)`, *optional*): The code levels each sample is conditioned on
            (`encoder.indices_to_codes(indices)`); `None` for an unconditional pipeline.

    Returns:
        A denoiser `(x, sigma) -> D(x; sigma, code)` that returns `x`'s dtype.
    """
    return lambda x, sigma: pipeline.denoise(x, sigma, code)


@torch.no_grad()
def pipeline_curvature(
    pipeline: "QACPipeline",
    num_samples: int,
    num_steps: int,
    generator: torch.Generator | None = None,
    code_indices: torch.LongTensor | None = None,
    batch_size: int | None = None,
) -> float:
    """
    The mean [`trajectory_curvature`] of a pipeline's probability-flow ODE, on `num_steps` Euler steps uniform in
    Rectified-Flow time from the formulation's `sigma_max` to 0 ([`uniform_time_sigmas`], RNE's grid): the
    scheduler's for EDM, t = 1 - 1/1000 for rectified flow ([`Formulation.sigma_range`]).

    As in [`QACPipeline.__call__`], the noise is drawn first and then, for a conditional pipeline without
    `code_indices`, one condition per sample: a code from the encoder's code weights, or a Gaussian encoder's draw
    from its prior (the unconditional baseline takes none).

    Args:
        pipeline ([`QACPipeline`]): The model to measure.
        num_samples (`int`): The number of trajectories.
        num_steps (`int`): N, the number of Euler steps (and UNet calls per trajectory).
        generator (`torch.Generator`, *optional*): The random source of the noise and the codes.
        code_indices (`torch.LongTensor` of shape `(num_samples,)`, *optional*): Fixed codes, for a conditional
            pipeline only.
        batch_size (`int`, *optional*): Trajectories per UNet call; all at once when `None`.

    Returns:
        `float`: the mean curvature over the trajectories.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    pipeline.check_inputs(num_samples, 1, generator, code_indices, None, "pt")
    # the noise, then the conditions, drawn as the pipeline draws them (a Gaussian encoder's from its prior)
    noise, codes, _ = pipeline._noise_and_conditions(num_samples, generator, code_indices, None)
    sigmas = uniform_time_sigmas(num_steps, pipeline.formulation.sigma_range[1])

    curvatures = []
    for start in range(0, num_samples, batch_size or num_samples):
        stop = start + (batch_size or num_samples)
        code = None if codes is None else codes[start:stop]
        curvatures.append(trajectory_curvature(pipeline_denoiser(pipeline, code), noise[start:stop], sigmas))
    return torch.cat(curvatures).mean().item()


@torch.no_grad()
def pipeline_conditional_flow_matching_loss(
    pipeline: "QACPipeline",
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    num_draws: int = 1,
    batch_size: int = 64,
    noise_encoder: "NoiseEncoder | None" = None,
) -> float:
    """
    [`conditional_flow_matching_loss`] of a pipeline on held-out images, each conditioned on its own code
    (Y = the encoder's code of X_0, paper eq. 12), or on none for the unconditional baseline; the noise levels are the
    formulation's `sigma_min` to `sigma_max` ([`Formulation.sigma_range`]: the scheduler's for EDM, t from 1/1000 to
    1 - 1/1000 for rectified flow).

    Args:
        pipeline ([`QACPipeline`]): The model to measure.
        images (`torch.Tensor` of shape `(num_images, channels, height, width)`): Held-out images in [-1, 1].
        generator (`torch.Generator`, *optional*): The random source of the times and the noise.
        num_draws (`int`, defaults to 1): (t, X_1) draws per image.
        batch_size (`int`, defaults to 64): Images per UNet call.
        noise_encoder ([`NoiseEncoder`], *optional*): For a model trained with RNE's noise encoder (its own
            backbone, e.g. loaded from a checkpoint's `noise_encoder` folder): L_CFM under the coupling it was trained
            on, X_1 ~ q(z | X_0), as RNE and the paper's Table 1 report it. `None`: X_1 ~ N(0, I).

    Returns:
        `float`: the Monte Carlo estimate of L_CFM.
    """
    if not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"`num_draws` must be a positive integer, got {num_draws!r}.")
    images = pipeline.images_to_tensor(images).to(pipeline._execution_device, torch.float32)
    sigma_min, sigma_max = pipeline.formulation.sigma_range
    losses = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        code = None if pipeline.encoder is None else pipeline.encoder(batch.to(pipeline.encoder.dtype)).codes
        denoiser = pipeline_denoiser(pipeline, code)
        for _ in range(num_draws):
            losses.append(
                conditional_flow_matching_loss(denoiser, batch, generator, sigma_min, sigma_max, noise_encoder)
            )
    return torch.cat(losses).mean().item()


def _check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"`sigmas` must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}.")
    if not (torch.isfinite(sigmas).all() and sigmas[0] > 0 and sigmas[-1] >= 0 and (sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(
            "`sigmas` must be finite and strictly decreasing from a positive first level to a last level >= 0, got "
            f"{sigmas.tolist()}."
        )
    return sigmas


def _batch_sigma(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a `(batch, 1, ..., 1)` tensor of `x`'s dtype and device."""
    return torch.full((x.shape[0], *([1] * (x.ndim - 1))), sigma, dtype=x.dtype, device=x.device)


def _device(generator: torch.Generator | None, tensor: torch.Tensor) -> torch.device:
    return tensor.device if generator is None else generator.device
