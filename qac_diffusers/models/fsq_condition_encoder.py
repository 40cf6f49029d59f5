# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The quantized condition encoder of "Learning Quantized Adaptive Conditions for Diffusion Models" (QAC).

An image x0 is mapped to y = E_phi(x0) in R^d, and every channel is quantized to one of L levels with finite scalar
quantization (FSQ, Mentzer et al. 2023): f(y) = clamp(floor(L * sigmoid(y)), 0, L - 1). The code usage seen during
training is kept as `code_weights`, from which sampling draws a code.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import DownBlock2D
from diffusers.utils import BaseOutput
from torch import nn


# A dense weight table of L**d float32 entries: 2**24 entries are 64 MiB, the most we accept.
MAX_CODEBOOK_SIZE = 2**24


@dataclass
class FSQConditionEncoderOutput(BaseOutput):
    """
    The output of [`FSQConditionEncoder`].

    Args:
        codes (`torch.Tensor` of shape `(batch_size, code_dim)`):
            The quantized levels in `{0, ..., code_levels - 1}` as floats. They carry the straight-through gradient.
        indices (`torch.LongTensor` of shape `(batch_size,)`):
            The code index of every image (mixed radix, channel 0 least significant).
        pre_quantized (`torch.Tensor` of shape `(batch_size, code_dim)`):
            The encoder output y before quantization (useful to watch |y| during training).
    """

    # Defaults let diffusers' BaseOutput be rebuilt from a dict, as accelerate does under mixed precision.
    codes: torch.Tensor
    indices: torch.LongTensor = None
    pre_quantized: torch.Tensor = None


def quantize(y: torch.Tensor, code_levels: int) -> torch.Tensor:
    """FSQ level of every channel: f(y) = clamp(floor(L * sigmoid(y)), 0, L - 1); for L = 2 the bit [y >= 0]."""
    # The clamp matters: sigmoid rounds to exactly 1.0 in float32 for y >= ~17.
    return torch.floor(code_levels * torch.sigmoid(y)).clamp(0, code_levels - 1)


def straight_through_quantize(
    y: torch.Tensor, code_levels: int, straight_through: Literal["sigmoid", "identity"]
) -> torch.Tensor:
    """
    Quantized levels whose forward value is f(y) and whose gradient is that of a surrogate u (straight-through).

    "identity" is the paper's literal estimator, u = y: nothing bounds y. "sigmoid" passes the gradient through the
    bounded u = (L - 1) * sigmoid(y) (see DESIGN.md section 3 for why it is the default). The paper writes
    y_q = u + sg(f(y) - u); it is computed as f(y) + (u - sg(u)), the same in exact arithmetic and with the same
    gradient. In floating point only the second is exactly f(y): u - sg(u) is exactly 0 for every finite u, while
    u + (f(y) - u) rounds, and in float32 loses the level altogether once |u| >= 2**24 (|y| drifts there with
    "identity").
    """
    surrogate = y if straight_through == "identity" else (code_levels - 1) * torch.sigmoid(y)
    return quantize(y.detach(), code_levels) + (surrogate - surrogate.detach())


def down_path_config(unet: ModelMixin) -> dict:
    """
    The backbone sized for a denoiser (DESIGN.md section 3): about 1/4 of its channels (rounded to its group size) and
    1/2 of its ResNet blocks per resolution, at its image size and channel count.

    Args:
        unet ([`UNet2DModel`] or [`QACUNet2DModel`]): The denoiser.

    Returns:
        `dict` with `in_channels`, `sample_size`, `block_out_channels`, `layers_per_block` and `norm_num_groups`.
    """
    groups = unet.config.norm_num_groups
    quarter = [max(groups, round(channels / 4 / groups) * groups) for channels in unet.config.block_out_channels]
    return {
        "in_channels": unet.config.in_channels,
        "sample_size": unet.config.sample_size,
        "block_out_channels": tuple(quarter),
        "layers_per_block": max(1, unet.config.layers_per_block // 2),
        "norm_num_groups": min(groups, min(quarter)),
    }


# The encoder backbone, shared by the condition encoders and the noise encoder: the down path of a UNet without time
# input (paper section 4.1, after RNE). It lives in this module because a component's module must import nothing from
# the package: plain diffusers downloads only that one file of a component folder from the Hub (see remote_code.py).


class DownPathMixin:
    """
    Gives an encoder the modules `conv_in`, `down_blocks`, `norm_out` and `act` (every resolution level but the last
    halves the resolution) and [`down_path`], which runs them. The modules are attributes of the encoder itself, so
    its weight names stay those of the first encoder that had them (`FSQConditionEncoder`).
    """

    def init_down_path(
        self, in_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int
    ) -> None:
        """Build the backbone's modules (call it in `__init__`)."""
        if any(channels % norm_num_groups for channels in block_out_channels):
            raise ValueError(
                f"Every entry of `block_out_channels` {tuple(block_out_channels)} must be divisible by "
                f"`norm_num_groups` ({norm_num_groups})."
            )
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(
                in_channels=block_out_channels[max(i - 1, 0)],
                out_channels=channels,
                temb_channels=None,
                num_layers=layers_per_block,
                resnet_groups=norm_num_groups,
                add_downsample=i < len(block_out_channels) - 1,
            )
            for i, channels in enumerate(block_out_channels)
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1])
        self.act = nn.SiLU()

    def down_path(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """
        Run the backbone.

        Args:
            images (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`): Clean images in [-1, 1].

        Returns:
            `tuple` `(pooled, skips)`: `pooled` of shape `(batch, block_out_channels[-1])`, the globally averaged
            normalised features the condition heads read; `skips`, the output of `conv_in` and of every ResNet and
            downsampling layer in order (as `UNet2DModel` collects them for its up path), which the noise head reads.
        """
        self.check_images(images)
        hidden = self.conv_in(images)
        skips = (hidden,)
        for block in self.down_blocks:
            hidden, states = block(hidden)
            skips += states
        pooled = self.act(self.norm_out(hidden)).mean(dim=(2, 3))
        return pooled, skips

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a `ValueError` unless `images` is a batch of the encoder's channel count and size."""
        expected = (self.config.in_channels, self.config.sample_size, self.config.sample_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}. Resize the images to {expected[1]}x{expected[2]} with {expected[0]} "
                "channel(s)."
            )


def _check_codebook(code_dim: int, code_levels: int) -> None:
    if code_dim < 1 or code_levels < 2:
        raise ValueError(
            f"Need `code_dim` >= 1 and `code_levels` >= 2, got code_dim={code_dim}, code_levels={code_levels}."
        )
    if code_levels**code_dim > MAX_CODEBOOK_SIZE:
        raise ValueError(
            f"code_levels**code_dim = {code_levels}**{code_dim} = {code_levels**code_dim} codes: the dense code "
            f"weights would not fit sensibly (at most {MAX_CODEBOOK_SIZE} = 2**24 codes). Lower `code_dim` or "
            "`code_levels`."
        )


class FSQConditionEncoder(ModelMixin, ConfigMixin, DownPathMixin):
    r"""
    A small image encoder (the down path of a UNet without time input, global pooling and a linear layer to `code_dim`
    channels) followed by finite scalar quantization. It also holds `code_weights`, the online estimate of how often
    each code is used, which [`QACPipeline`] samples codes from.

    Parameters:
        in_channels (`int`, defaults to 3): Number of channels of the input images.
        sample_size (`int`, defaults to 32): Height and width of the input images.
        block_out_channels (`tuple[int, ...]`, defaults to `(32, 64, 64)`): Channels of each resolution level;
            every level but the last halves the resolution.
        layers_per_block (`int`, defaults to 1): ResNet blocks per resolution level.
        norm_num_groups (`int`, defaults to 8): Groups of the group normalisation layers.
        code_dim (`int`, defaults to 20): d, the number of quantized channels.
        code_levels (`int`, defaults to 2): L, the number of levels per channel; the codebook has L**d codes.
        straight_through (`"sigmoid"` or `"identity"`, defaults to `"sigmoid"`): The gradient estimator of the
            quantizer (see [`straight_through_quantize`]).

    `code_weights` stay float32 whatever dtype the encoder is cast or loaded in: rare codes have weights below
    float16's resolution, and casting them would zero those codes.
    """

    # Loading with `torch_dtype` (diffusers' mechanism); casting with `.to()`, `.half()`, ... is handled in `_apply`.
    _keep_in_fp32_modules = ["code_weights"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        code_dim: int = 20,
        code_levels: int = 2,
        straight_through: Literal["sigmoid", "identity"] = "sigmoid",
    ):
        super().__init__()
        _check_codebook(code_dim, code_levels)
        if straight_through not in ("sigmoid", "identity"):
            raise ValueError(f"`straight_through` must be 'sigmoid' or 'identity', got {straight_through!r}.")
        self.init_down_path(in_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.proj_out = nn.Linear(block_out_channels[-1], code_dim)

        self.register_buffer("radix", code_levels ** torch.arange(code_dim), persistent=False)
        self.register_buffer("code_weights", torch.zeros(code_levels**code_dim, dtype=torch.float32))

    def _apply(self, fn, recurse: bool = True) -> "FSQConditionEncoder":
        # Every dtype and device change of a module (`.to()`, `.half()`, `.cuda()`, ...) goes through `_apply`: the
        # code weights take the new device from it but keep their float32 values.
        code_weights = self.code_weights
        super()._apply(fn, recurse)
        self.code_weights = code_weights.to(self.code_weights.device)
        return self

    @property
    def codebook_size(self) -> int:
        """|C| = L**d, the number of distinct codes."""
        return self.config.code_levels**self.config.code_dim

    @classmethod
    def for_unet(cls, unet: ModelMixin, code_dim: int = 20, code_levels: int = 2, **kwargs) -> "FSQConditionEncoder":
        """
        Build an encoder sized for a denoiser (DESIGN.md section 3): about 1/4 of its channels and 1/2 of its ResNet
        blocks per resolution, so that it adds a few percent of the denoiser's parameters.

        Args:
            unet ([`UNet2DModel`] or [`QACUNet2DModel`]): The denoiser the codes will condition.
            code_dim (`int`), code_levels (`int`): d and L.
            kwargs: Any other constructor argument, overriding the derived one.
        """
        config = {**down_path_config(unet), "code_dim": code_dim, "code_levels": code_levels}
        return cls(**{**config, **kwargs})

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> FSQConditionEncoderOutput | tuple:
        """
        Encode clean images to quantized codes.

        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, sample_size, sample_size)`):
                Clean images scaled to [-1, 1].
            return_dict (`bool`, defaults to `True`): Return a [`FSQConditionEncoderOutput`] instead of a tuple.

        Returns:
            [`FSQConditionEncoderOutput`] or `tuple` `(codes, indices, pre_quantized)`.
        """
        hidden, _ = self.down_path(images)
        return self.code_head(hidden, return_dict)

    def code_head(self, hidden: torch.Tensor, return_dict: bool = True) -> FSQConditionEncoderOutput | tuple:
        """
        The code head: the linear layer to `code_dim` channels and the quantizer, on the backbone's pooled features.

        Args:
            hidden (`torch.Tensor` of shape `(batch_size, block_out_channels[-1])`): `down_path(images)[0]`.
            return_dict (`bool`, defaults to `True`): Return a [`FSQConditionEncoderOutput`] instead of a tuple.
        """
        # Quantize in float32 whatever the model's dtype: floor(L * sigmoid(y)) is sensitive to rounding.
        y = self.proj_out(hidden).float()
        codes = straight_through_quantize(y, self.config.code_levels, self.config.straight_through)
        indices = self._levels_to_indices(codes.detach().round().long())  # in range by construction: no check
        if not return_dict:
            return codes, indices, y
        return FSQConditionEncoderOutput(codes=codes, indices=indices, pre_quantized=y)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.LongTensor:
        """
        Code index = sum_i q_i * L**i (mixed radix, channel 0 least significant).

        Args:
            codes (`torch.Tensor` of shape `(..., code_dim)`): Levels in `{0, ..., code_levels - 1}`.

        Returns:
            `torch.LongTensor` of shape `(...)`.
        """
        if codes.shape[-1] != self.config.code_dim:
            raise ValueError(
                f"`codes` must have {self.config.code_dim} channels in the last dim, got shape {tuple(codes.shape)}."
            )
        levels = codes.round().long()
        if levels.min() < 0 or levels.max() >= self.config.code_levels:
            raise ValueError(f"`codes` must hold levels in 0..{self.config.code_levels - 1}.")
        return self._levels_to_indices(levels)

    def _levels_to_indices(self, levels: torch.LongTensor) -> torch.LongTensor:
        # Without the range check, which reads the device (a GPU synchronisation in every training step).
        return (levels * self.radix).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """
        The inverse of [`codes_to_indices`]: q_i = (index // L**i) % L.

        Args:
            indices (`torch.LongTensor` of shape `(...)`): Code indices in `[0, L**d)`.

        Returns:
            `torch.Tensor` of shape `(..., code_dim)`: float levels.
        """
        self.check_indices(indices)
        return ((indices.unsqueeze(-1) // self.radix) % self.config.code_levels).float()

    def check_indices(self, indices: torch.Tensor) -> None:
        """Raise a `ValueError` unless `indices` is an integer tensor of codes in `[0, L**d)`."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"Code indices must be an integer torch tensor, got {type(indices).__name__} "
                             f"{getattr(indices, 'dtype', '')}.".strip())
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"Code indices must lie in [0, {self.codebook_size}) (code_levels**code_dim), got values in "
                f"[{indices.min().item()}, {indices.max().item()}]."
            )

    @torch.no_grad()
    def update_code_weights(self, indices: torch.LongTensor, decay: float, check_indices: bool = True) -> None:
        """
        Online code weights (paper Algorithm 1, lines 11-12): w <- mu * w + (1 - mu) * counts / B.

        Args:
            indices (`torch.LongTensor` of shape `(B,)`): The code indices of the whole (global) batch.
            decay (`float`): mu, the decay the parameter EMA used at this step.
            check_indices (`bool`, defaults to `True`): Refuse indices outside the codebook. The check reads the
                device (a GPU synchronisation); the trainer passes `False` for the encoder's own indices, which are in
                range by construction.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"`decay` must lie in [0, 1], got {decay}.")
        if check_indices:
            self.check_indices(indices)
        indices = indices.flatten().to(self.code_weights.device)
        # index_add_ rather than bincount, which reads the largest index back to size its output. Sums of ones are
        # exact in float32 (B < 2**24), so the counts, and the weights, are bincount's whatever the order of the adds.
        ones = torch.ones_like(indices, dtype=torch.float32)
        counts = torch.zeros_like(self.code_weights, dtype=torch.float32).index_add_(0, indices, ones)
        self.code_weights.mul_(decay).add_((counts / indices.numel()).to(self.code_weights.dtype), alpha=1.0 - decay)

    def sample_indices(
        self, num_samples: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.LongTensor:
        """
        Draw code indices from Categorical(w / sum w).

        Args:
            num_samples (`int`): How many indices to draw.
            generator (`torch.Generator` or a list of `num_samples` of them, *optional*): The random source; with a
                list, index i is drawn with generator i.

        Returns:
            `torch.LongTensor` of shape `(num_samples,)`, on the device of the (first) generator or the weights.
        """
        if not self.code_weights.sum() > 0:
            raise ValueError(
                "The encoder's `code_weights` are all zero: no code usage was collected, so there is nothing to "
                "sample codes from. Train the model (train_qac.py collects them) or pass `code_indices` explicitly."
            )
        if isinstance(generator, list):
            if len(generator) != num_samples:
                raise ValueError(
                    f"Got a list of {len(generator)} generators for {num_samples} samples: pass one per sample."
                )
            return torch.cat([self._draw(1, g) for g in generator])
        return self._draw(num_samples, generator)

    def draw_conditions(
        self, num_samples: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """
        The conditions of sampling, as every condition encoder gives them: `(codes, indices)`, indices drawn with
        [`sample_indices`] and their code levels (float32, on the encoder's device).
        """
        indices = self.sample_indices(num_samples, generator)
        return self.indices_to_codes(indices.to(self.device)), indices

    def _draw(self, num_samples: int, generator: torch.Generator | None) -> torch.LongTensor:
        weights = self.code_weights if generator is None else self.code_weights.to(generator.device)
        return torch.multinomial(weights, num_samples, replacement=True, generator=generator)
