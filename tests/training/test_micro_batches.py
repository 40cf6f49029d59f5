"""The stream of micro-batches: every image once per epoch, steps across epoch ends, processes, resuming."""

from itertools import islice

import numpy as np
import torch

from qac_diffusers.training import ImageTransform, load_digits_dataset
from qac_diffusers.training.micro_batches import EpochImages, MicroBatchSampler, epoch_permutation


def batches(count: int, num_images=10, batch_size=3, num_processes=1, process_index=0, seed=0, start=0):
    sampler = MicroBatchSampler(num_images, batch_size, num_processes, process_index, seed, start=start)
    return list(islice(iter(sampler), count))


def test_every_image_is_seen_once_per_epoch():
    keys = [key for batch in batches(10) for key in batch]  # 30 positions: 3 epochs of 10 images
    for epoch in range(3):
        assert sorted(index for e, index in keys if e == epoch) == list(range(10))


def test_a_micro_batch_continues_into_the_next_epoch():
    # Micro-batch 3 holds positions 9, 10, 11: the last image of epoch 0 and the first two of epoch 1.
    assert [epoch for epoch, _ in batches(4)[3]] == [0, 1, 1]
    assert batches(4)[3][0][1] == epoch_permutation(0, 0, 10)[9]


def test_every_micro_batch_is_full():
    assert {len(batch) for batch in batches(25)} == {3}


def test_processes_split_each_global_micro_batch():
    one = batches(6, batch_size=4)
    first, second = (batches(6, batch_size=2, num_processes=2, process_index=p) for p in (0, 1))
    assert [a + b for a, b in zip(first, second)] == one


def test_a_stream_started_later_continues_the_same_stream():
    assert batches(4, seed=1, start=5) == batches(9, seed=1)[5:]


def test_orders_differ_between_epochs_and_seeds():
    assert not np.array_equal(epoch_permutation(0, 0, 50), epoch_permutation(0, 1, 50))
    assert not np.array_equal(epoch_permutation(0, 0, 50), epoch_permutation(1, 0, 50))


def test_images_are_flipped_by_epoch_and_index():
    dataset = load_digits_dataset().select(range(4))
    transform = ImageTransform(8, 1, center_crop=True, random_flip=True, seed=3)
    images = EpochImages(dataset, transform)
    keys = [(epoch, index) for epoch in range(3) for index in range(4)]
    expected = []
    for epoch, index in keys:
        transform.set_epoch(epoch)
        expected.append(transform.preprocess(dataset[index]["image"], index))
    assert torch.equal(torch.stack(images.__getitems__(keys)), torch.stack(expected))
    assert torch.equal(images[keys[5]], expected[5])
    assert not torch.equal(images[(0, 2)], images[(1, 2)])  # flipped in one epoch and not in the other
