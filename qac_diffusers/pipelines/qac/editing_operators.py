# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Linear degradations for zero-shot image editing (paper Algorithm 2, DESIGN.md section 7).

A degradation is an orthogonal transform A (so A^-1 = A^T) and a mask Omega of the unknown coefficients of A z. The
known part of an image z is A^-1[(A z)(1 - Omega)]; the data-consistency step of Algorithm 2 (line 7) replaces the
known coefficients of an estimate x by those of z: A^-1[(A z)(1 - Omega) + (A x) Omega].

A new task is a transform, its inverse and a mask: `LinearDegradation(transform, inverse, mask)`.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class LinearDegradation:
    """
    An orthogonal transform A with its inverse and the mask Omega of the unknown coefficients.

    Args:
        transform (`Callable`): A, from images of shape `(batch, channels, height, width)` to coefficients (any shape
            that `mask` broadcasts against).
        inverse (`Callable`): A^-1 = A^T, from coefficients back to images.
        mask (`torch.Tensor`): Omega, broadcast against the coefficients: 1 = unknown (to fill), 0 = known (kept).
    """

    transform: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]
    mask: torch.Tensor

    def known_part(self, z: torch.Tensor) -> torch.Tensor:
        """
        A^-1[(A z)(1 - Omega)]: the image with its unknown coefficients set to 0 (paper Algorithm 2, line 1).

        Args:
            z (`torch.Tensor` of shape `(batch, channels, height, width)`): The reference image.

        Returns:
            `torch.Tensor` of the shape of `z`.
        """
        coefficients = self.transform(z)
        return self.inverse(coefficients * (1 - self.mask.to(coefficients)))

    def project(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """
        A^-1[(A z)(1 - Omega) + (A x) Omega]: x with the known coefficients of z (paper Algorithm 2, line 7).

        Args:
            x (`torch.Tensor` of shape `(batch, channels, height, width)`): The current estimate.
            z (`torch.Tensor` of the shape of `x`): The reference image.

        Returns:
            `torch.Tensor` of the shape of `x`.
        """
        known, estimate = self.transform(z), self.transform(x)
        mask = self.mask.to(estimate)
        return self.inverse(known * (1 - mask) + estimate * mask)


def dct_matrix(size: int) -> torch.Tensor:
    """
    The orthonormal DCT-II matrix (Ahmed, Natarajan & Rao 1974): row k is sqrt(2 / n) cos(pi (2 i + 1) k / (2 n)),
    row 0 scaled to the constant 1 / sqrt(n), so its first coefficient is the scaled mean and the others are the
    frequencies. For n = 3: (1, 1, 1) / sqrt(3), (1, 0, -1) / sqrt(2), (1, -2, 1) / sqrt(6).

    Args:
        size (`int`): n.

    Returns:
        `torch.Tensor` of shape `(n, n)`, float64, with `M @ M.T == I`.
    """
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = math.sqrt(2 / size) * torch.cos(math.pi * (2 * i + 1) * k / (2 * size))
    matrix[0] = 1 / math.sqrt(size)
    return matrix


def inpainting(mask: torch.Tensor) -> LinearDegradation:
    """
    Inpainting: A = I and Omega = the hole.

    Args:
        mask (`torch.Tensor` of shape `(batch or 1, channels or 1, height, width)`): 1 = unknown pixel to fill,
            0 = known pixel to keep; no other values.

    Returns:
        [`LinearDegradation`] on images of shape `(batch, channels, height, width)`.
    """
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError(
            "The inpainting mask must be binary (1 = pixel to fill, 0 = pixel to keep), got values in "
            f"[{mask.min().item():g}, {mask.max().item():g}] other than 0 and 1. Threshold it, e.g. `mask > 0.5`."
        )
    return LinearDegradation(transform=_identity, inverse=_identity, mask=mask.float())


def colorization(num_channels: int = 3) -> LinearDegradation:
    """
    Colorization: A = the orthonormal DCT over the channels ([`dct_matrix`]), whose first coefficient is the
    luminance, sqrt(C) times the channel mean; Omega = the C - 1 chroma coefficients. For RGB the chroma rows are
    (1, 0, -1) / sqrt(2) and (1, -2, 1) / sqrt(6). The known part of an image is its channel mean in every channel.

    Args:
        num_channels (`int`, defaults to 3): C, at least 2.

    Returns:
        [`LinearDegradation`] on images of shape `(batch, C, height, width)`; coefficients of the same shape.
    """
    if num_channels < 2:
        raise ValueError(f"Colorization needs at least 2 channels, got num_channels={num_channels}.")
    matrix = dct_matrix(num_channels)
    mask = torch.ones(1, num_channels, 1, 1)
    mask[:, 0] = 0
    return LinearDegradation(
        transform=partial(_channel_transform, matrix=matrix),
        inverse=partial(_channel_transform, matrix=matrix.T),
        mask=mask,
    )


def super_resolution(factor: int) -> LinearDegradation:
    """
    Super-resolution by `factor`: A = the orthonormal 2-D DCT of every `factor x factor` block (the Kronecker
    product of two [`dct_matrix`]), whose first coefficient is the block mean times `factor`; Omega = the
    `factor**2 - 1` higher frequencies. The known part of an image is its block means, each repeated over its block.

    Args:
        factor (`int`): The block size, at least 1; it must divide the image height and width.

    Returns:
        [`LinearDegradation`] on images of shape `(batch, channels, height, width)`; coefficients of shape
        `(batch, channels, factor**2, height // factor, width // factor)`.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"The super-resolution factor must be an integer >= 1, got {factor!r}.")
    matrix = torch.kron(dct_matrix(factor), dct_matrix(factor))
    mask = torch.ones(1, 1, factor**2, 1, 1)
    mask[:, :, 0] = 0
    return LinearDegradation(
        transform=partial(_block_transform, matrix=matrix, factor=factor),
        inverse=partial(_inverse_block_transform, matrix=matrix, factor=factor),
        mask=mask,
    )


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def _channel_transform(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` (C, C) applied to the channels of `images` (batch, C, height, width)."""
    return torch.einsum("kc,bchw->bkhw", matrix.to(images), images)


def _block_transform(images: torch.Tensor, matrix: torch.Tensor, factor: int) -> torch.Tensor:
    """(batch, C, H, W) -> (batch, C, factor**2, H / factor, W / factor): `matrix` applied to every block."""
    batch, channels, height, width = images.shape
    blocks = F.pixel_unshuffle(images, factor).reshape(batch, channels, factor**2, height // factor, width // factor)
    return torch.einsum("kp,bcphw->bckhw", matrix.to(images), blocks)


def _inverse_block_transform(coefficients: torch.Tensor, matrix: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of [`_block_transform`]: `matrix.T` applied to every block, then the blocks put back."""
    batch, channels, _, height, width = coefficients.shape
    blocks = torch.einsum("kp,bckhw->bcphw", matrix.to(coefficients), coefficients)
    return F.pixel_shuffle(blocks.reshape(batch, channels * factor**2, height, width), factor)
