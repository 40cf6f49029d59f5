# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The EDM denoiser D of a UNet F (Karras et al. 2022, eq. 7): the one code path of training, sampling and editing."""

import torch


def edm_denoise(
    unet, scheduler, sample: torch.Tensor, sigma: float | torch.Tensor, code: torch.Tensor | None = None
) -> torch.Tensor:
    """
    D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y), with c_skip, c_out, c_in and c_noise from the scheduler's
    `precondition_*` methods (DESIGN.md section 2).

    Args:
        unet ([`QACUNet2DModel`]): F.
        scheduler ([`IPNDMScheduler`] or another EDM scheduler): The preconditioning.
        sample (`torch.Tensor` of shape `(batch, channels, height, width)`): The noisy images x.
        sigma (`float` or `torch.Tensor` of shape `(batch, 1, 1, 1)`): The noise level(s).
        code (`torch.Tensor` of shape `(batch, code_dim)`, *optional*): The code levels y; `None` for the baseline.

    Returns:
        `torch.Tensor` of the shape and dtype of `sample`.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    unet_dtype = next(unet.parameters()).dtype  # `unet.dtype` is missing when DistributedDataParallel wraps it
    model_input = scheduler.precondition_inputs(sample, sigma).to(unet_dtype)
    c_noise = scheduler.precondition_noise(sigma.flatten())
    model_output = unet(model_input, c_noise, code=code).sample
    return scheduler.precondition_outputs(sample, model_output.to(sample.dtype), sigma)
