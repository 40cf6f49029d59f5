# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The EDM training loss (Karras et al. 2022, "Elucidating the Design Space...", Table 1 and eq. 8)."""

import torch

from ..models.edm_denoiser import edm_denoise


class EDMLoss:
    r"""
    loss = lambda(sigma) * || D(x0 + sigma * n; sigma, y) - x0 ||^2 with ln(sigma) ~ N(P_mean, P_std^2) and
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, averaged over pixels and images.

    The preconditioning (c_in, c_noise, c_skip, c_out) comes from the scheduler's `precondition_*` methods, the same
    code the sampler uses. Randomness is injected by the caller (`sample_noise`), so a training step is a pure function
    of its seed.

    Args:
        scheduler ([`IPNDMScheduler`] or another EDM scheduler): Gives `sigma_data` and the preconditioning.
        P_mean (`float`, defaults to -1.2): Mean of ln(sigma).
        P_std (`float`, defaults to 1.2): Standard deviation of ln(sigma).
    """

    def __init__(self, scheduler, P_mean: float = -1.2, P_std: float = 1.2):
        self.scheduler = scheduler
        self.sigma_data = scheduler.config.sigma_data
        self.P_mean = P_mean
        self.P_std = P_std

    def sample_noise(self, shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw sigma of shape (B, 1, 1, 1) and unit noise n of `shape` (B, C, H, W), on the generator's device."""
        rnd_normal = torch.randn((shape[0], 1, 1, 1), generator=generator, device=generator.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        noise = torch.randn(shape, generator=generator, device=generator.device)
        return sigma, noise

    def __call__(
        self, unet, images: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, code: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            unet ([`QACUNet2DModel`]): The network F.
            images (`torch.Tensor` of shape `(B, C, H, W)`): Clean images x0 in [-1, 1].
            sigma (`torch.Tensor` of shape `(B, 1, 1, 1)`), noise (`torch.Tensor` of shape `(B, C, H, W)`): From
                [`sample_noise`].
            code (`torch.Tensor` of shape `(B, d)`, *optional*): The quantized code y_q (None for the baseline).

        Returns:
            `torch.Tensor`: the scalar loss.
        """
        noisy = self.scheduler.add_noise(images, noise, sigmas=sigma.flatten())
        denoised = edm_denoise(unet, self.scheduler, noisy, sigma, code)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return (weight * (denoised - images) ** 2).mean()
