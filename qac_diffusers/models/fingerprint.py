# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""A fingerprint of trained weights, to tell which model a fitted sampling schedule belongs to."""

import hashlib

import torch


def model_fingerprint(*models: torch.nn.Module | None) -> str:
    """
    The SHA-256 of the float32 parameters and buffers of `models` (in order, `None` skipped), in hex: equal for the
    same weights wherever they are loaded, different for any other training run or step.

    Args:
        *models (`torch.nn.Module` or `None`): E.g. a pipeline's `unet` and `encoder`.

    Returns:
        `str`: 64 hex digits.
    """
    digest = hashlib.sha256()
    for model in models:
        if model is None:
            continue
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
