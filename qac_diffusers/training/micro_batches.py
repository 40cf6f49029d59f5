# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The order in which train_qac.py sees its images: one endless stream of micro-batches across epochs.

Every epoch is a permutation of the data set drawn from (seed, epoch). The epochs are laid end to end and cut into
global micro-batches of `batch_size * num_processes` images; `gradient_accumulation_steps` consecutive micro-batches
make one optimizer step. Batches do not restart at an epoch's end: the images left at the end of an epoch start the
next micro-batch and the next epoch's first images complete it. So every optimizer step sees exactly one full global
batch, every image is seen exactly once per epoch (none is dropped), the images of optimizer step s are a pure
function of (seed, s) (a resumed run starts the stream at its step, nothing is skipped), and process p takes rows
[p * batch_size, (p + 1) * batch_size) of each global micro-batch, so N processes see the global batches of one
process with N times the batch.
"""

import functools
import itertools

import numpy as np
import torch

from .data import ImageTransform


# Keeps the permutations' random streams apart from the others keyed by (seed, epoch, ...), such as the flips.
_PERMUTATION_STREAM = 1


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The order of the data set's rows in one epoch (read-only)."""
    sequence = np.random.SeedSequence([seed, epoch], spawn_key=(_PERMUTATION_STREAM,))
    permutation = np.random.default_rng(sequence).permutation(num_images)
    permutation.setflags(write=False)
    return permutation


class MicroBatchSampler(torch.utils.data.Sampler):
    r"""
    A `torch.utils.data.DataLoader` `batch_sampler`: this process's rows of every global micro-batch of the stream,
    from micro-batch `start` on, without end. Each row is an `(epoch, index)` key for [`EpochImages`].

    Args:
        num_images (`int`): the size of the data set.
        batch_size (`int`): the rows per process and micro-batch.
        num_processes (`int`): the processes sharing each global micro-batch.
        process_index (`int`): this process.
        seed (`int`): the seed of the permutations.
        start (`int`): the first micro-batch (optimizer step * gradient accumulation steps when resuming).
    """

    def __init__(
        self, num_images: int, batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0
    ):
        self.num_images = num_images
        self.batch_size = batch_size
        self.global_batch = batch_size * num_processes
        self.process_index = process_index
        self.seed = seed
        self.start = start

    def key(self, position: int) -> tuple[int, int]:
        """The (epoch, row) at a position of the stream."""
        epoch, offset = divmod(position, self.num_images)
        return epoch, int(epoch_permutation(self.seed, epoch, self.num_images)[offset])

    def __iter__(self):
        first = self.start * self.global_batch + self.process_index * self.batch_size
        for position in itertools.count(first, self.global_batch):
            yield [self.key(row) for row in range(position, position + self.batch_size)]


class EpochImages(torch.utils.data.Dataset):
    r"""
    The training tensors of a data set, looked up by `(epoch, index)`: the row `index` through `transform`, whose
    random crop and flip are keyed by (seed, epoch, index).

    Args:
        dataset (`datasets.Dataset`): the images, as `load_image_dataset` returns them.
        transform ([`ImageTransform`]): the transform; its `image_column` names the images.
    """

    def __init__(self, dataset, transform: ImageTransform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[torch.Tensor]:
        """A whole batch in one read of the data set (the DataLoader's fast path; row by row is far slower)."""
        images = self.dataset[[index for _, index in keys]][self.transform.image_column]
        tensors = []
        for (epoch, index), image in zip(keys, images, strict=True):
            self.transform.set_epoch(epoch)
            tensors.append(self.transform.preprocess(image, index))
        return tensors

