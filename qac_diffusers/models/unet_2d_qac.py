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


# Why the other time embeddings of UNet2DModel cannot take EDM's c_noise = ln(sigma) / 4 (non-integer, and negative
# below sigma = 1) as their timestep.
_UNUSABLE_TIME_EMBEDDINGS = {
    "fourier": "UNet2DModel divides its output by the timestep, which is zero at sigma = 1",
    "learned": "it looks the timestep up as an integer index into a table",
}
# The code embedding was saved as `code_embedding.*` while it was added to the time embedding by a forward hook; it
# now sits in UNet2DModel's class-embedding slot.
_LEGACY_PREFIX = "code_embedding."
_SLOT_PREFIX = "class_embedding."


def _rename_legacy_keys(state_dict: dict, prefix: str = "") -> None:
    """Rename the code embedding's weights of old checkpoints (`code_embedding.*`) in place."""
    for key in [key for key in state_dict if key.startswith(prefix + _LEGACY_PREFIX)]:
        state_dict[prefix + _SLOT_PREFIX + key[len(prefix + _LEGACY_PREFIX) :]] = state_dict.pop(key)


def _check_config(
    time_embedding_type: str,
    class_embed_type: str | None,
    num_class_embeds: int | None,
    code_dim: int,
    code_levels: int,
) -> None:
    if time_embedding_type != "positional":
        reason = _UNUSABLE_TIME_EMBEDDINGS.get(time_embedding_type, "it is not a time embedding of UNet2DModel")
        raise ValueError(
            "QACUNet2DModel takes EDM's continuous noise condition (c_noise = ln(sigma) / 4, non-integer and negative "
            f"below sigma = 1) as its timestep, which time_embedding_type={time_embedding_type!r} cannot take: "
            f"{reason}. Use time_embedding_type='positional'."
        )
    if code_dim < 0 or (code_dim > 0 and code_levels < 2):
        raise ValueError(
            f"Need `code_dim` >= 0 and `code_levels` >= 2, got code_dim={code_dim}, code_levels={code_levels}."
        )
    if code_dim > 0 and (class_embed_type is not None or num_class_embeds is not None):
        raise ValueError(
            f"A QACUNet2DModel with codes (code_dim={code_dim}) adds its code embedding in UNet2DModel's "
            f"class-embedding slot, so it cannot also take class conditioning (class_embed_type={class_embed_type!r}, "
            f"num_class_embeds={num_class_embeds!r}). Set both to None, or code_dim=0 for a class-conditional UNet "
            "without codes."
        )


class QACUNet2DModel(UNet2DModel):
    r"""
    A [`UNet2DModel`] whose time embedding gets an added code embedding ([`CodeEmbedding`]).

    The code embedding takes UNet2DModel's class-embedding slot: `class_embedding` is the [`CodeEmbedding`] and the
    code is passed on as the class labels, so it is added to the time embedding where UNet2DModel adds a class
    embedding. A model with codes therefore takes no class conditioning.

    Every argument of [`UNet2DModel`] is accepted and saved with the config; see its documentation. The timestep is
    EDM's continuous c_noise, so `time_embedding_type` must be `"positional"`. The extra arguments:

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
        _check_config(time_embedding_type, class_embed_type, num_class_embeds, code_dim, code_levels)
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
        if code_dim > 0:
            # UNet2DModel adds `class_embedding(class_labels)` to the time embedding: `forward` passes the code there.
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
            self.class_embedding = CodeEmbedding(code_dim, code_levels, time_embed_dim)

    @property
    def code_embedding(self) -> CodeEmbedding | None:
        """The [`CodeEmbedding`] (held in UNet2DModel's `class_embedding` slot), or `None` when `code_dim == 0`."""
        return self.class_embedding if self.config.code_dim > 0 else None

    def _fix_state_dict_keys_on_load(self, state_dict: dict) -> dict:
        # diffusers' `from_pretrained` renames old weight names here, before it matches them to the model.
        _rename_legacy_keys(state_dict)
        return super()._fix_state_dict_keys_on_load(state_dict)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # The same renaming for `load_state_dict` (torch calls this before it loads the submodules).
        _rename_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_unet(cls, unet: UNet2DModel, code_dim: int = 20, code_levels: int = 2) -> "QACUNet2DModel":
        """
        Build a QAC UNet from a (pretrained) UNet without codes: a [`UNet2DModel`], or a QAC baseline
        (`QACUNet2DModel` with `code_dim=0`). Its config and weights are copied and the code embedding starts at zero,
        so the result computes exactly what `unet` computes, for any code.
        """
        if unet.config.get("code_dim", 0) > 0:
            raise ValueError(
                f"`unet` is already a QACUNet2DModel with a code embedding (code_dim={unet.config.code_dim}, "
                f"code_levels={unet.config.code_levels}): use it as it is (`copy.deepcopy(unet)` for a copy). "
                "`from_unet` adds a zero code embedding to a UNet without codes: a UNet2DModel or a QACUNet2DModel "
                "with code_dim=0."
            )
        own = ("code_dim", "code_levels")  # those of a QAC baseline, replaced by the arguments
        unet_config = {key: value for key, value in unet.config.items() if not key.startswith("_") and key not in own}
        model = cls(**unet_config, code_dim=code_dim, code_levels=code_levels)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any(not key.startswith(_SLOT_PREFIX) for key in missing):
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
            class_labels (`torch.Tensor`, *optional*): As in [`UNet2DModel`], for a baseline (`code_dim == 0`) built
                with class embeddings; a model with codes takes none.
            return_dict (`bool`, defaults to `True`): Return a [`UNet2DOutput`] instead of a tuple.
        """
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        if self.code_embedding is None:
            if code is not None:
                raise ValueError("This QACUNet2DModel has code_dim=0 (the unconditional baseline): pass `code=None`.")
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)

        if class_labels is not None:
            raise ValueError("This QACUNet2DModel takes a code and no class conditioning: pass `class_labels=None`.")
        # The code embedding sits in the class-embedding slot, so the code goes in as the class labels; the sample has
        # the model's dtype (`self.dtype` walks every module: slow next to a small model's call on CPU).
        code = self._check_code(code, sample).to(sample.dtype)
        return super().forward(sample, timestep, class_labels=code, return_dict=return_dict)

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
