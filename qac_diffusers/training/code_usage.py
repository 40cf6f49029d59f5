# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Code usage statistics: collapse of the quantized codes must be visible, never silent."""

from collections.abc import Iterable

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
        return {
            "codes_used": 0, "entropy_bits": 0.0, "perplexity": 0.0, "largest_share": 0.0, "codes_for_half_weight": 0
        }
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


def cumulative_shares(code_weights: torch.Tensor) -> torch.Tensor:
    """
    The share of the total weight carried by the 1, 2, 3, ... most used codes.

    Args:
        code_weights (`torch.Tensor` of shape `(codebook_size,)`): Code weights or any histogram over the codebook.

    Returns:
        `torch.Tensor` of shape `(codes_used,)`, float64, increasing to 1; entry n - 1 is the share of the top n codes.
    """
    weights = _collected_weights(code_weights)
    ordered = weights[weights > 0].sort(descending=True).values
    # Sum the raw weights before normalising, so that e.g. 9 / 10 is the nearest float to 0.9.
    return ordered.cumsum(0) / ordered.sum()


def codes_for_share(code_weights: torch.Tensor, share: float) -> int:
    """
    How few codes carry at least `share` of the weight (the most used ones); `share=0.5` gives `code_usage`'s
    `codes_for_half_weight`.

    Args:
        code_weights (`torch.Tensor` of shape `(codebook_size,)`): Code weights or any histogram over the codebook.
        share (`float`): The share of the total weight, in (0, 1].
    """
    if not 0 < share <= 1:
        raise ValueError(f"`share` must lie in (0, 1], got {share}.")
    cumulative = cumulative_shares(code_weights)
    # The last entry may round to just below 1: never count more codes than are used.
    return min(int((cumulative < share).sum().item()) + 1, cumulative.numel())


def top_codes(code_weights: torch.Tensor, k: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """
    The `k` most used codes, by decreasing weight (ties: lower index first); fewer when fewer codes are used.

    Args:
        code_weights (`torch.Tensor` of shape `(codebook_size,)`): Code weights or any histogram over the codebook.
        k (`int`): How many codes.

    Returns:
        `tuple` `(indices, shares)`: `torch.LongTensor` of code indices and their float64 shares of the total weight.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    weights = _collected_weights(code_weights)
    ordered, indices = weights.sort(descending=True, stable=True)
    used = min(k, int((weights > 0).sum().item()))
    return indices[:used], ordered[:used] / weights.sum()


def _collected_weights(code_weights: torch.Tensor) -> torch.Tensor:
    """The weights as a flat float64 tensor; a `ValueError` if they are all zero."""
    weights = code_weights.detach().double().flatten()
    if not weights.sum() > 0:
        raise ValueError("The code weights are all zero: no code usage was collected, so there is nothing to rank.")
    return weights


@torch.no_grad()
def offline_code_weights(encoder, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """
    Offline code weights (paper section 3.3 and Table 2): the share of every code among the images of `batches` under
    `encoder` (the paper counts the training set under the final EMA encoder), as an alternative to the online
    weights collected during training.

    They come in the layout of the online ones, `FSQConditionEncoder.code_weights` (float32, one entry per code,
    summing to 1 as the online weights do once training has run long enough), so storing them is
    `encoder.code_weights.copy_(weights)` and sampling draws codes from them unchanged.

    Args:
        encoder ([`FSQConditionEncoder`]): The encoder, in eval mode.
        batches (`Iterable[torch.Tensor]`): Batches of images of shape `(batch, channels, height, width)` in [-1, 1].

    Returns:
        `torch.Tensor` of shape `(codebook_size,)`, float32.
    """
    counts = torch.zeros(encoder.codebook_size, dtype=torch.float64)
    for images in batches:
        indices = encoder(images.to(device=encoder.device, dtype=encoder.dtype)).indices
        counts += torch.bincount(indices.cpu(), minlength=encoder.codebook_size)
    if not counts.sum() > 0:
        raise ValueError("Got no images to count the codes of: pass a non-empty data set.")
    return (counts / counts.sum()).float()
