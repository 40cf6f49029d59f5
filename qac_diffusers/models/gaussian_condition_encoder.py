# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The Gaussian (VAE-style) condition encoder of the paper's Table 3: continuous conditions with a KL prior term.

An image x0 is mapped to q(y | x0) = N(mean(x0), diag exp(logvar(x0))) in R^d over the backbone of
[`FSQConditionEncoder`]; training adds `kl_weight` * KL(q(y | x0) || N(0, I)) to the loss, and sampling draws the
condition from the prior N(0, I). There is no codebook, so nothing here has code indices or code weights.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .fsq_condition_encoder import DownPathMixin, down_path_config


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""
    KL(N(mean, diag exp(logvar)) || N(0, I)) per dimension, averaged over the batch: the mean over all entries of
    0.5 * (mean^2 + exp(logvar) - 1 - logvar). This is RNE's `get_kl` (sangyun884/fast-ode, utils.py: the KL summed
    over a sample's dimensions, divided by their number, averaged over the batch), so a prior weight means the same
    for every encoder whatever its output size.

    Args:
        mean (`torch.Tensor` of shape `(batch, ...)`), logvar (`torch.Tensor` of the same shape): The posterior.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


def check_prior_weight(name: str, weight: float, fix: str) -> None:
    """Refuse a negative (or NaN) weight of a KL prior term: it would reward moving away from the prior."""
    if not weight >= 0:
        raise ValueError(
            f"`{name}` weighs the KL term that keeps the posterior near N(0, I) and must be >= 0, got {weight}. {fix}"
        )


@dataclass
class GaussianConditionEncoderOutput(BaseOutput):
    """
    The output of [`GaussianConditionEncoder`].

    Args:
        codes (`torch.Tensor` of shape `(batch_size, code_dim)`): The conditions y: a reparameterized sample of the
            posterior (`sample_posterior=True`, training) or its mean.
        mean (`torch.Tensor` of shape `(batch_size, code_dim)`), logvar (same shape): The posterior.
        kl (`torch.Tensor`): A scalar, [`gaussian_kl`] of the posterior.
        prior_loss (`torch.Tensor`): A scalar, `kl_weight * kl`: the term training adds to the loss.
    """

    # Defaults let diffusers' BaseOutput be rebuilt from a dict, as accelerate does under mixed precision.
    codes: torch.Tensor
    mean: torch.Tensor = None
    logvar: torch.Tensor = None
    kl: torch.Tensor = None
    prior_loss: torch.Tensor = None


class GaussianConditionEncoder(ModelMixin, ConfigMixin, DownPathMixin):
    r"""
    The backbone of [`FSQConditionEncoder`] with two linear heads, the mean and the log-variance of a Gaussian
    condition y in R^d (the "VAE" row of the paper's Table 3). Conditions are drawn from the prior N(0, I) at
    sampling ([`sample_codes`]); they are continuous, so this encoder has no code indices, codebook or code weights.

    Parameters:
        in_channels (`int`, defaults to 3): Number of channels of the input images.
        sample_size (`int`, defaults to 32): Height and width of the input images.
        block_out_channels (`tuple[int, ...]`, defaults to `(32, 64, 64)`): Channels of each resolution level.
        layers_per_block (`int`, defaults to 1): ResNet blocks per resolution level.
        norm_num_groups (`int`, defaults to 8): Groups of the group normalisation layers.
        code_dim (`int`, defaults to 20): d, the dimension of the condition.
        kl_weight (`float`, defaults to 1.0): The weight of the KL term (per dimension, see [`gaussian_kl`]) in the
            training loss; 0 trains a plain autoencoder whose conditions the prior does not describe.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        code_dim: int = 20,
        kl_weight: float = 1.0,
    ):
        super().__init__()
        if code_dim < 1:
            raise ValueError(f"`code_dim` must be >= 1, got {code_dim}.")
        check_prior_weight("kl_weight", kl_weight, "Pass kl_weight=0 for no prior term.")
        self.init_down_path(in_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.proj_mean = nn.Linear(block_out_channels[-1], code_dim)
        self.proj_logvar = nn.Linear(block_out_channels[-1], code_dim)

    @classmethod
    def for_unet(cls, unet: ModelMixin, code_dim: int = 20, **kwargs) -> "GaussianConditionEncoder":
        """
        Build an encoder sized for a denoiser, as [`FSQConditionEncoder.for_unet`] does.

        Args:
            unet ([`QACUNet2DModel`]): The denoiser the conditions will condition.
            code_dim (`int`): d.
            kwargs: Any other constructor argument (e.g. `kl_weight`), overriding the derived one.
        """
        return cls(**{**down_path_config(unet), "code_dim": code_dim, **kwargs})

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample_posterior: bool = False,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> GaussianConditionEncoderOutput | tuple:
        """
        Encode clean images to Gaussian conditions.

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, sample_size, sample_size)`): Clean images in
                [-1, 1].
            generator (`torch.Generator` or a list of them, *optional*): Draws the posterior sample.
            sample_posterior (`bool`, defaults to `False`): Return y = mean + exp(logvar / 2) * n, n ~ N(0, I) (the
                reparameterization training needs) instead of the mean (as diffusers' `AutoencoderKL`).
            noise (`torch.Tensor` of shape `(batch_size, code_dim)`, *optional*): The unit noise n, e.g. a process's
                slice of noise drawn for a whole distributed batch; drawn with `generator` when `None`.
            return_dict (`bool`, defaults to `True`): Return a [`GaussianConditionEncoderOutput`] instead of a tuple.

        Returns:
            [`GaussianConditionEncoderOutput`] or `tuple` `(codes, mean, logvar, kl, prior_loss)`.
        """
        hidden, _ = self.down_path(images)
        return self.code_head(hidden, generator, sample_posterior, noise, return_dict)

    def code_head(
        self,
        hidden: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample_posterior: bool = False,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> GaussianConditionEncoderOutput | tuple:
        """The two linear heads on the backbone's pooled features `down_path(images)[0]`; arguments as [`forward`]."""
        mean, logvar = self.proj_mean(hidden).float(), self.proj_logvar(hidden).float()
        codes = mean
        if sample_posterior:
            if noise is None:
                noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            codes = mean + (0.5 * logvar).exp() * noise
        kl = gaussian_kl(mean, logvar)
        outputs = (codes, mean, logvar, kl, self.config.kl_weight * kl)
        return GaussianConditionEncoderOutput(*outputs) if return_dict else outputs

    def sample_codes(
        self, num_samples: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """
        Draw conditions from the prior N(0, I), as sampling does.

        Args:
            num_samples (`int`): How many conditions to draw.
            generator (`torch.Generator` or a list of `num_samples` of them, *optional*): The random source.

        Returns:
            `torch.Tensor` of shape `(num_samples, code_dim)`, float32, on the encoder's device.
        """
        return randn_tensor((num_samples, self.config.code_dim), generator=generator, device=self.device)

    def draw_conditions(
        self, num_samples: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, None]:
        """
        The conditions of sampling, as every condition encoder gives them: `(codes, None)`, codes from the prior
        ([`sample_codes`]) and no indices.
        """
        return self.sample_codes(num_samples, generator), None

    # No codebook: every question about code indices is answered with the same error.

    @property
    def codebook_size(self) -> int:
        raise self._no_indices("codebook_size")

    def sample_indices(self, *args, **kwargs) -> torch.LongTensor:
        raise self._no_indices("sample_indices")

    def indices_to_codes(self, *args, **kwargs) -> torch.Tensor:
        raise self._no_indices("indices_to_codes")

    def codes_to_indices(self, *args, **kwargs) -> torch.LongTensor:
        raise self._no_indices("codes_to_indices")

    def check_indices(self, *args, **kwargs) -> None:
        raise self._no_indices("check_indices")

    def update_code_weights(self, *args, **kwargs) -> None:
        raise self._no_indices("update_code_weights")

    @staticmethod
    def _no_indices(name: str) -> ValueError:
        return ValueError(
            f"GaussianConditionEncoder.{name}: this encoder's conditions are continuous vectors drawn from N(0, I), "
            "so it has no codebook, code indices or code weights. Draw conditions with `sample_codes(num_samples, "
            "generator)` and pass them as codes, or use an FSQConditionEncoder for indexed codes."
        )
