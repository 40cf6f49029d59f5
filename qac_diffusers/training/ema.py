# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Parameter EMA by half-life, as in NVlabs' EDM training loop (training/training_loop.py)."""

import torch


def ema_decay(cur_nimg: int, batch_size: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """
    The EMA decay mu of one step: 0.5 ** (batch_size / halflife_nimg), where the half-life in images is capped at
    `rampup_ratio * cur_nimg` early in training (EDM's ramp-up).

    Args:
        cur_nimg (`int`): Images seen so far, this step's batch included.
        batch_size (`int`): The global batch of this step.
        halflife_kimg (`float`): The half-life in thousands of images.
        rampup_ratio (`float`, *optional*): The ramp-up ratio; `None` disables the ramp-up.
    """
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, for every parameter (buffers are left alone)."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.copy_(param.detach().to(ema_param.dtype).lerp(ema_param, decay))
