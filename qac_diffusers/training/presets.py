# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Model-size presets of train_qac.py. A JSON file given with `--model_config` overrides any entry."""

import copy
import json


PRESETS = {
    # 8x8 images (the embedded digits): the prototype of DESIGN.md section 9.
    "tiny": {
        "resolution": 8,
        "code_dim": 10,
        "unet": {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
            "norm_num_groups": 8,
            "attention_head_dim": 8,
        },
    },
    # 28x28 / 32x32 images (animal-mnist, MNIST-like data).
    "small": {
        "resolution": 32,
        "code_dim": 16,
        "unet": {
            "block_out_channels": (64, 128, 128),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "norm_num_groups": 32,
            "attention_head_dim": 32,
        },
    },
    # EDM's DDPM++ CIFAR-10 network (model_channels 128, channel_mult [2, 2, 2], 4 blocks per resolution, attention
    # at 16x16 with one head, embedding width 512, dropout 0.13) as closely as UNet2DModel allows (~56M parameters).
    "cifar10": {
        "resolution": 32,
        "code_dim": 20,
        "unet": {
            "block_out_channels": (256, 256, 256),
            "layers_per_block": 4,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "time_embedding_dim": 512,
            "norm_num_groups": 32,
            "attention_head_dim": 256,
            "dropout": 0.13,
        },
    },
}


def resolve_model_config(preset: str, model_config_path: str | None = None) -> dict:
    """
    The preset's model configuration, with the entries of a JSON file merged over it: top-level keys `resolution`,
    `code_dim`, and `unet` / `encoder` dictionaries of constructor arguments (each merged key by key).
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: choose one of {sorted(PRESETS)}.")
    config = copy.deepcopy(PRESETS[preset])
    config.setdefault("encoder", {})
    if model_config_path is None:
        return config
    with open(model_config_path, encoding="utf-8") as file:
        overrides = json.load(file)
    unknown = set(overrides) - {"resolution", "code_dim", "unet", "encoder"}
    if unknown:
        raise ValueError(
            f"{model_config_path}: unknown keys {sorted(unknown)}; allowed: resolution, code_dim, unet, encoder."
        )
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if key in ("unet", "encoder") else value
    return config
