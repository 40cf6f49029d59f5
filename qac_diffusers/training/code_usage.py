# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Code usage statistics: collapse of the quantized codes must be visible, never silent."""

import torch


def code_usage(code_weights: torch.Tensor) -> dict[str, float]:
    """
    Summarise code weights (or any histogram over the codebook).

    Returns:
        `dict` with `codes_used` (codes with non-zero weight), `entropy_bits` (of the normalised weights),
        `perplexity` (2 ** entropy: the effective number of codes), `largest_share` (weight of the most used code) and
        `codes_for_half_weight` (how few codes carry half of the weight).
    """
    weights = code_weights.detach().double().flatten()
    total = weights.sum()
    if not total > 0:
        return {"codes_used": 0, "entropy_bits": 0.0, "perplexity": 0.0, "largest_share": 0.0, "codes_for_half_weight": 0}
    probabilities = weights[weights > 0] / total
    entropy = -(probabilities * probabilities.log2()).sum().item()
    ordered = probabilities.sort(descending=True).values
    return {
        "codes_used": int(probabilities.numel()),
        "entropy_bits": entropy,
        "perplexity": 2.0**entropy,
        "largest_share": ordered[0].item(),
        "codes_for_half_weight": int((ordered.cumsum(0) < 0.5).sum().item()) + 1,
    }


def batch_code_usage(indices: torch.Tensor, pre_quantized: torch.Tensor) -> dict[str, float]:
    """Per-batch statistics: distinct codes in the batch, their largest share and the mean |y| before quantization."""
    counts = torch.unique(indices, return_counts=True)[1]
    return {
        "batch_distinct_codes": int(counts.numel()),
        "batch_largest_share": counts.max().item() / indices.numel(),
        "mean_abs_y": pre_quantized.detach().abs().mean().item(),
    }
