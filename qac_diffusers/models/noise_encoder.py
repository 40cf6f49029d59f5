# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The reparameterized noise encoder (RNE) of Lee et al. 2023, "Minimizing Trajectory Curvature of ODE-based Generative
Models" (code: sangyun884/fast-ode), which the paper's Tables 1 and 5 compare with and combine with QAC.

Instead of independent noise, training couples each image x with noise z ~ q(z | x) = N(mean(x), diag exp(logvar(x)))
of the image's shape, and adds beta * KL(q(z | x) || N(0, I)) to the flow-matching loss (RNE,
train_reverse_img_ddp.py: `loss = loss_fm + weight_prior * loss_prior`; the paper's Table 1 uses beta = 20). Sampling
draws z ~ N(0, I), so a trained model needs no noise encoder to sample.

RNE's encoder is a whole UNet; here it is the backbone of the condition encoders with an up path, so that QAC and RNE
share one backbone with two heads, as the paper's section 4.2 does ([`encode_jointly`]).
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UpBlock2D
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .fsq_condition_encoder import DownPathMixin, down_path_config
from .gaussian_condition_encoder import check_prior_weight, gaussian_kl


# The beta of the paper's Table 1 ("a prior regularization beta = 20").
PAPER_BETA = 20.0


@dataclass
class NoiseEncoderOutput(BaseOutput):
    """
    The output of [`NoiseEncoder`].

    Args:
        noise (`torch.Tensor` of the images' shape): z = mean + exp(logvar / 2) * n, n ~ N(0, I): the noise the image
            is coupled with.
        mean (`torch.Tensor` of the images' shape), logvar (same shape): The posterior q(z | x).
        kl (`torch.Tensor`): A scalar, KL(q(z | x) || N(0, I)) per dimension (RNE's `get_kl`, see [`gaussian_kl`]).
        prior_loss (`torch.Tensor`): A scalar, `beta * kl`: the term training adds to the flow-matching loss.
    """

    # Defaults let diffusers' BaseOutput be rebuilt from a dict, as accelerate does under mixed precision.
    noise: torch.Tensor
    mean: torch.Tensor = None
    logvar: torch.Tensor = None
    kl: torch.Tensor = None
    prior_loss: torch.Tensor = None


class NoiseEncoder(ModelMixin, ConfigMixin, DownPathMixin):
    r"""
    q(z | x): a UNet without time input (the backbone of the condition encoders, then an up path with skip
    connections) whose last convolution gives the mean and the log-variance of noise of the image's shape. The last
    convolution starts at zero, so a fresh noise encoder gives q(z | x) = N(0, I): the independent coupling of plain
    rectified flow, with a KL term of 0.

    Parameters:
        in_channels (`int`, defaults to 3): Number of channels of the images (and of the noise).
        sample_size (`int`, defaults to 32): Height and width of the images.
        block_out_channels (`tuple[int, ...]`, defaults to `(32, 64, 64)`): Channels of each resolution level.
        layers_per_block (`int`, defaults to 1): ResNet blocks per resolution level of the down path (the up path
            has one more, as in `UNet2DModel`).
        norm_num_groups (`int`, defaults to 8): Groups of the group normalisation layers.
        beta (`float`, defaults to 20.0): The weight of the KL term in the training loss (the paper's Table 1: 20).
        shared_backbone (`bool`, defaults to `False`): Hold only the up path and read the backbone of a condition
            encoder (QAC and RNE together, paper section 4.2): build it with [`for_encoder`] and run it with
            [`encode_jointly`]. The backbone's settings above must then be the condition encoder's.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        beta: float = PAPER_BETA,
        shared_backbone: bool = False,
    ):
        super().__init__()
        check_prior_weight("beta", beta, f"RNE's paper uses beta = {PAPER_BETA:g}; beta = 0 leaves q(z | x) free.")
        if not shared_backbone:
            self.init_down_path(in_channels, block_out_channels, layers_per_block, norm_num_groups)
        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList(
            UpBlock2D(
                in_channels=reversed_channels[min(i + 1, len(reversed_channels) - 1)],
                prev_output_channel=reversed_channels[max(i - 1, 0)],
                out_channels=channels,
                temb_channels=None,
                num_layers=layers_per_block + 1,
                resnet_groups=norm_num_groups,
                add_upsample=i < len(reversed_channels) - 1,
            )
            for i, channels in enumerate(reversed_channels)
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0])
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], 2 * in_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def for_unet(cls, unet: ModelMixin, beta: float = PAPER_BETA, **kwargs) -> "NoiseEncoder":
        """
        A noise encoder with its own backbone, sized for a denoiser as the condition encoders are (RNE alone).

        Args:
            unet ([`QACUNet2DModel`]): The denoiser trained with the coupling.
            beta (`float`, defaults to 20.0): The weight of the KL term.
            kwargs: Any other constructor argument, overriding the derived one.
        """
        return cls(**{**down_path_config(unet), "beta": beta, **kwargs})

    @classmethod
    def for_encoder(cls, encoder: DownPathMixin, beta: float = PAPER_BETA) -> "NoiseEncoder":
        """
        A noise head on the backbone of a condition encoder (QAC and RNE together, paper section 4.2): only the up
        path, with the encoder's backbone settings; run both heads with [`encode_jointly`].

        Args:
            encoder ([`FSQConditionEncoder`] or [`GaussianConditionEncoder`]): The condition encoder whose backbone
                is shared.
            beta (`float`, defaults to 20.0): The weight of the KL term.
        """
        backbone = {key: encoder.config[key] for key in _BACKBONE_KEYS}
        return cls(**backbone, beta=beta, shared_backbone=True)

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> NoiseEncoderOutput | tuple:
        """
        Couple clean images with noise: z ~ q(z | x).

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, sample_size, sample_size)`): Clean images in
                [-1, 1].
            generator (`torch.Generator` or a list of them, *optional*): Draws n in z = mean + exp(logvar / 2) * n.
            noise (`torch.Tensor` of the images' shape, *optional*): n itself, e.g. a process's slice of noise drawn
                for a whole distributed batch; drawn with `generator` when `None`.
            return_dict (`bool`, defaults to `True`): Return a [`NoiseEncoderOutput`] instead of a tuple.

        Returns:
            [`NoiseEncoderOutput`] or `tuple` `(noise, mean, logvar, kl, prior_loss)`.
        """
        if self.config.shared_backbone:
            raise ValueError(
                "This NoiseEncoder has no backbone of its own (shared_backbone=True): it reads the condition "
                "encoder's. Run both with `encode_jointly(condition_encoder, noise_encoder, images, generator)`."
            )
        _, skips = self.down_path(images)
        return self.noise_head(skips, generator, noise, return_dict)

    def noise_head(
        self,
        skips: tuple[torch.Tensor, ...],
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> NoiseEncoderOutput | tuple:
        """
        The up path on a backbone's features `down_path(images)[1]`, then the posterior and a sample of it.

        Args:
            skips (`tuple[torch.Tensor, ...]`): The backbone's skip features, as [`DownPathMixin.down_path`] returns
                them (the last one is where the up path starts).
            generator, noise, return_dict: As in [`forward`].
        """
        hidden = skips[-1]
        for block in self.up_blocks:
            hidden = block(hidden, skips[-len(block.resnets) :])
            skips = skips[: -len(block.resnets)]
        mean, logvar = self.conv_out(self.conv_act(self.conv_norm_out(hidden))).float().chunk(2, dim=1)
        if noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        kl = gaussian_kl(mean, logvar)
        outputs = (mean + (0.5 * logvar).exp() * noise, mean, logvar, kl, self.config.beta * kl)
        return NoiseEncoderOutput(*outputs) if return_dict else outputs


# The settings a shared noise head must have in common with the condition encoder whose backbone it reads.
_BACKBONE_KEYS = ("in_channels", "sample_size", "block_out_channels", "layers_per_block", "norm_num_groups")


def encode_jointly(
    condition_encoder: DownPathMixin,
    noise_encoder: NoiseEncoder,
    images: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    code_head_kwargs: dict | None = None,
) -> tuple[BaseOutput, NoiseEncoderOutput]:
    """
    QAC and RNE on one backbone (paper section 4.2): one pass of the condition encoder's backbone, read by its code
    head and by the noise head of a `shared_backbone` [`NoiseEncoder`].

    Args:
        condition_encoder ([`FSQConditionEncoder`] or [`GaussianConditionEncoder`]): Holds the backbone.
        noise_encoder ([`NoiseEncoder`]): Built with [`NoiseEncoder.for_encoder`] from `condition_encoder`.
        images (`torch.Tensor` of shape `(batch_size, in_channels, sample_size, sample_size)`): Clean images.
        generator (`torch.Generator` or a list of them, *optional*), noise (`torch.Tensor`, *optional*): The unit
            noise of the noise head, or what draws it (see [`NoiseEncoder.forward`]).
        code_head_kwargs (`dict`, *optional*): Passed to the condition encoder's `code_head` (e.g.
            `{"sample_posterior": True, "noise": unit_noise}` for a [`GaussianConditionEncoder`] in training): a
            dict, since that head takes a `noise` of its own.

    Returns:
        `tuple` `(condition_output, noise_output)`: what `condition_encoder(images)` and a noise encoder with its own
        backbone would return.
    """
    if not noise_encoder.config.shared_backbone:
        raise ValueError(
            "This NoiseEncoder has its own backbone (shared_backbone=False): call it on its own, `noise_encoder("
            "images, generator)`, or build a shared one with `NoiseEncoder.for_encoder(condition_encoder)`."
        )
    mismatched = {
        key: (condition_encoder.config[key], noise_encoder.config[key])
        for key in _BACKBONE_KEYS
        if _as_tuple(condition_encoder.config[key]) != _as_tuple(noise_encoder.config[key])
    }
    if mismatched:
        raise ValueError(
            f"The noise encoder was not built for this condition encoder's backbone: (encoder, noise encoder) differ "
            f"in {mismatched}. Build it with `NoiseEncoder.for_encoder(condition_encoder)`."
        )
    pooled, skips = condition_encoder.down_path(images)
    code_head = condition_encoder.code_head(pooled, **(code_head_kwargs or {}))
    return code_head, noise_encoder.noise_head(skips, generator, noise)


def _as_tuple(value) -> tuple:
    """A config value as a tuple: `block_out_channels` reads back from JSON as a list."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
