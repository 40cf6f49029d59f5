# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Frechet distance (FID, Heusel et al. 2017) and kernel inception distance (KID, Binkowski et al. 2018) of two sets.

Both compare two sets of images through the features of a fixed network: the Frechet distance fits a Gaussian to each
set, the KID is an unbiased estimate of the squared maximum mean discrepancy with a cubic polynomial kernel. The math
runs in float64 on the CPU; the feature network (see `feature_networks.py`) runs wherever it lives.
"""

from typing import Optional, Union

import numpy as np
import torch

from .feature_networks import FeatureNetwork, extract_features


Features = Union[torch.Tensor, np.ndarray]


def _as_float64_features(features: Features, name: str) -> torch.Tensor:
    # Through numpy for lists: torch.tensor would round Python floats to float32.
    features = features if torch.is_tensor(features) else torch.from_numpy(np.asarray(features, dtype=np.float64))
    if features.ndim != 2:
        raise ValueError(f"`{name}` must have shape (num_samples, feature_dim), got shape {tuple(features.shape)}.")
    return features.detach().to(device="cpu", dtype=torch.float64)


def _check_pair(features_a: torch.Tensor, features_b: torch.Tensor) -> None:
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"The two feature sets have different feature dims ({features_a.shape[1]} and {features_b.shape[1]}): "
            "extract both with the same feature network."
        )


def feature_statistics(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Mean and covariance (normalised by N - 1, as `np.cov`) of a feature set, in float64.

    Args:
        features (`torch.Tensor` or `np.ndarray` of shape `(num_samples, feature_dim)`): One feature vector per image.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `mu` of shape `(feature_dim,)` and `sigma` of shape
        `(feature_dim, feature_dim)`.
    """
    features = _as_float64_features(features, "features")
    if features.shape[0] < 2:
        raise ValueError(f"A covariance needs at least 2 samples, got {features.shape[0]}.")
    mu = features.mean(dim=0)
    centered = features - mu
    sigma = centered.T @ centered / (features.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues are clamped to 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def trace_sqrt_product(sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """
    Tr((sigma_a sigma_b)^(1/2)) for symmetric PSD matrices, as the sum of the singular values of
    sqrt(sigma_a) sqrt(sigma_b): their squares are the eigenvalues of sqrt(sigma_a) sigma_b sqrt(sigma_a), which are
    those of sigma_a sigma_b. Singular values avoid the square root of round-off-level eigenvalues, which would add
    ~1e-8 per null direction when the covariances are singular (fewer samples than feature dims).
    """
    return torch.linalg.svdvals(_psd_sqrt(sigma_a) @ _psd_sqrt(sigma_b)).sum()


def frechet_distance_from_statistics(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> float:
    """
    Frechet distance of two Gaussians: ||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)).

    Args:
        mu_a, mu_b (`torch.Tensor` of shape `(feature_dim,)`): Means.
        sigma_a, sigma_b (`torch.Tensor` of shape `(feature_dim, feature_dim)`): Covariances (symmetric PSD).

    Returns:
        `float`: The distance (>= 0 up to round-off).
    """
    statistics = (mu_a, sigma_a, mu_b, sigma_b)
    mu_a, sigma_a, mu_b, sigma_b = (torch.as_tensor(t, dtype=torch.float64, device="cpu") for t in statistics)
    if mu_a.ndim != 1 or mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(
            f"Mismatched statistics: mu_a {tuple(mu_a.shape)}, sigma_a {tuple(sigma_a.shape)}, "
            f"mu_b {tuple(mu_b.shape)}, sigma_b {tuple(sigma_b.shape)}; expected (F,) and (F, F) for one feature "
            "dim F."
        )
    mean_term = (mu_a - mu_b).square().sum()
    covariance_term = sigma_a.trace() + sigma_b.trace() - 2 * trace_sqrt_product(sigma_a, sigma_b)
    return float(mean_term + covariance_term)


def frechet_distance(features_a: Features, features_b: Features) -> float:
    """
    Frechet distance between the Gaussians fitted to two feature sets (FID when the features are Inception-v3's).

    Args:
        features_a (`torch.Tensor` or `np.ndarray` of shape `(num_samples_a, feature_dim)`): The first set, e.g. real.
        features_b (`torch.Tensor` or `np.ndarray` of shape `(num_samples_b, feature_dim)`): The second set, e.g.
            generated. The sizes may differ; each needs at least 2 samples.

    Returns:
        `float`: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed in float64.

    Examples:

    ```py
    >>> import torch
    >>> from qac_diffusers.metrics import frechet_distance

    >>> generator = torch.Generator().manual_seed(0)
    >>> real = torch.randn(1000, 8, generator=generator)
    >>> round(frechet_distance(real, real), 6)
    0.0
    ```
    """
    features_a = _as_float64_features(features_a, "features_a")
    features_b = _as_float64_features(features_b, "features_b")
    _check_pair(features_a, features_b)
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The KID kernel k(x, y) = (x . y / d + 1)^3 (Binkowski et al. 2018), for rows x and y of dimension d."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared MMD of two equal-size subsets: within-set terms without the diagonal, as in torch-fidelity."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(
    features_a: Features,
    features_b: Features,
    num_subsets: int = 100,
    subset_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[float, float]:
    """
    Kernel inception distance: the unbiased MMD^2 with kernel k(x, y) = (x . y / d + 1)^3, averaged over random subsets
    drawn without replacement (Binkowski et al. 2018; as computed by clean-fid and torch-fidelity).

    Args:
        features_a (`torch.Tensor` or `np.ndarray` of shape `(num_samples_a, feature_dim)`): The first set.
        features_b (`torch.Tensor` or `np.ndarray` of shape `(num_samples_b, feature_dim)`): The second set.
        num_subsets (`int`, defaults to 100): How many subset pairs to average over.
        subset_size (`int`, *optional*): Samples per subset; defaults to min(1000, num_samples_a, num_samples_b).
        generator (`torch.Generator`, *optional*): Draws the subsets; defaults to a generator seeded with 0, so that
            repeated calls agree.

    Returns:
        `tuple[float, float]`: The mean and the standard deviation of MMD^2 over the subsets.
    """
    features_a = _as_float64_features(features_a, "features_a")
    features_b = _as_float64_features(features_b, "features_b")
    _check_pair(features_a, features_b)
    num_a, num_b = features_a.shape[0], features_b.shape[0]
    subset_size = min(1000, num_a, num_b) if subset_size is None else subset_size
    if not 2 <= subset_size <= min(num_a, num_b):
        raise ValueError(
            f"`subset_size` must be in [2, min(num_samples_a, num_samples_b)] = [2, {min(num_a, num_b)}], "
            f"got {subset_size}."
        )
    if num_subsets < 1:
        raise ValueError(f"`num_subsets` must be >= 1, got {num_subsets}.")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    mmd2 = torch.stack(
        [
            _unbiased_mmd2(
                features_a[torch.randperm(num_a, generator=generator)[:subset_size]],
                features_b[torch.randperm(num_b, generator=generator)[:subset_size]],
            )
            for _ in range(num_subsets)
        ]
    )
    return float(mmd2.mean()), float(mmd2.std(correction=0))


def frechet_distance_from_images(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    feature_network: FeatureNetwork,
    batch_size: int = 256,
    progress_bar: bool = False,
) -> float:
    """
    [`frechet_distance`] of the features that `feature_network` gives two image sets.

    Args:
        images_a (`torch.Tensor` of shape `(num_samples_a, channels, height, width)`): Images in [-1, 1].
        images_b (`torch.Tensor` of shape `(num_samples_b, channels, height, width)`): Images in [-1, 1].
        feature_network (`FeatureNetwork`): E.g. [`InceptionFeatures`] or [`ClassifierFeatures`].
        batch_size (`int`, defaults to 256): Images per network call.
        progress_bar (`bool`, defaults to `False`): Show a progress bar over the batches.

    Returns:
        `float`: The Frechet distance.
    """
    features_a = extract_features(feature_network, images_a, batch_size, progress_bar)
    features_b = extract_features(feature_network, images_b, batch_size, progress_bar)
    return frechet_distance(features_a, features_b)


def kernel_inception_distance_from_images(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    feature_network: FeatureNetwork,
    num_subsets: int = 100,
    subset_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 256,
    progress_bar: bool = False,
) -> tuple[float, float]:
    """
    [`kernel_inception_distance`] of the features that `feature_network` gives two image sets.

    Args:
        images_a, images_b, feature_network, batch_size, progress_bar: As in [`frechet_distance_from_images`].
        num_subsets, subset_size, generator: As in [`kernel_inception_distance`].

    Returns:
        `tuple[float, float]`: The mean and standard deviation of MMD^2 over the subsets.
    """
    features_a = extract_features(feature_network, images_a, batch_size, progress_bar)
    features_b = extract_features(feature_network, images_b, batch_size, progress_bar)
    return kernel_inception_distance(features_a, features_b, num_subsets, subset_size, generator)
