# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""A `UNet2DModel` conditioned on a quantized adaptive code (QAC, DESIGN.md section 4)."""

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up in this module)
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from torch import nn


class CodeEmbedding(nn.Module):
    """
    Two linear layers (d -> emb, SiLU, emb -> emb) on the code mapped to [-1, 1]. The last layer starts at zero, so a
    fresh model ignores the code.
    """

    def __init__(self, code_dim: int, code_levels: int, embedding_dim: int):
        super().__init__()
        self.code_levels = code_levels
        self.linear_1 = nn.Linear(code_dim, embedding_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embedding_dim, embedding_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        centred = code * 2 / (self.code_levels - 1) - 1
        return self.linear_2(self.act(self.linear_1(centred)))


class QACUNet2DModel(UNet2DModel):
    r"""
    A [`UNet2DModel`] whose time embedding gets an added code embedding ([`CodeEmbedding`]).

    Every argument of [`UNet2DModel`] is accepted and saved with the config; see its documentation. The extra ones:

    Parameters:
        code_dim (`int`, defaults to 20): d, the number of code channels. `0` builds the unconditional baseline: no
            code embedding, and `forward` takes no code.
        code_levels (`int`, defaults to 2): L, the levels per code channel.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        code_dim: int = 20,
        code_levels: int = 2,
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type=class_embed_type,
            num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )
        if code_dim < 0 or (code_dim > 0 and code_levels < 2):
            raise ValueError(f"Need `code_dim` >= 0 and `code_levels` >= 2, got code_dim={code_dim}, code_levels={code_levels}.")
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.code_embedding = CodeEmbedding(code_dim, code_levels, time_embed_dim) if code_dim > 0 else None

    @classmethod
    def from_unet(cls, unet: UNet2DModel, code_dim: int = 20, code_levels: int = 2) -> "QACUNet2DModel":
        """
        Build a QAC UNet from a (pretrained) [`UNet2DModel`]: its config and weights are copied and the code
        embedding starts at zero, so the result computes exactly what `unet` computes, for any code.
        """
        unet_config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
        model = cls(**unet_config, code_dim=code_dim, code_levels=code_levels)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any(not key.startswith("code_embedding.") for key in missing):
            raise ValueError(f"Could not copy the UNet's weights: missing {missing}, unexpected {unexpected}.")
        model.to(unet.device)
        return model if unet.dtype == model.dtype else model.to(unet.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        code: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): The noisy input.
            timestep (`torch.Tensor` or `float` or `int`): The noise condition (c_noise under EDM). A Python number is
                turned into a float tensor (UNet2DModel itself would truncate it to an integer).
            code (`torch.Tensor` of shape `(batch_size, code_dim)`, *optional*): Code levels in
                `{0, ..., code_levels - 1}` (as [`FSQConditionEncoder`] returns them). Required when `code_dim > 0`;
                must be `None` for the unconditional baseline (`code_dim == 0`).
            class_labels (`torch.Tensor`, *optional*): As in [`UNet2DModel`], when it was built with class embeddings.
            return_dict (`bool`, defaults to `True`): Return a [`UNet2DOutput`] instead of a tuple.
        """
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        if self.code_embedding is None:
            if code is not None:
                raise ValueError("This QACUNet2DModel has code_dim=0 (the unconditional baseline): pass `code=None`.")
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)

        code_emb = self.code_embedding(self._check_code(code, sample).to(self.dtype))
        # The code embedding is added to the time embedding, where UNet2DModel adds its class embedding.
        hook = self.time_embedding.register_forward_hook(lambda module, inputs, time_emb: time_emb + code_emb)
        try:
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            hook.remove()

    def _check_code(self, code: torch.Tensor | None, sample: torch.Tensor) -> torch.Tensor:
        expected = (sample.shape[0], self.config.code_dim)
        if code is None:
            raise ValueError(
                f"This QACUNet2DModel is conditioned on codes (code_dim={self.config.code_dim}): pass `code` of shape "
                f"{expected}, e.g. `encoder(images).codes` or `encoder.indices_to_codes(indices)`."
            )
        if tuple(code.shape) != expected:
            raise ValueError(f"`code` must have shape {expected} (batch, code_dim), got {tuple(code.shape)}.")
        return code
