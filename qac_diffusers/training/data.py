# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Training images: the built-in data sets, Hub and image-folder loading with clear errors, and the transform.

The loading flags mirror diffusers' `examples/unconditional_image_generation/train_unconditional.py`
(`--dataset_name`, `--dataset_config_name`, `--train_data_dir`, `--image_column`, `--cache_dir`) and so does the
transform (`--resolution`, `--center_crop`, `--random_flip`: resize the shorter side with bilinear filtering, center or
random crop, optional horizontal flip, scale to [-1, 1]), written with PIL, numpy and torch instead of torchvision.

Random augmentation is stateless: the flip and the crop of an example are drawn from a generator seeded with
(seed, epoch, example index), never from a global RNG. The same seed gives the same images whatever the batch
composition, the number of DataLoader workers or processes, and a run resumed mid-epoch (train_qac.py restarts its
stream of micro-batches at the resumed step, see micro_batches.py) sees exactly the images the uninterrupted run would
have seen.
"""

import gzip
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from PIL import Image
from sklearn.datasets import load_digits


BUILTIN_DATASETS = ("digits", "animal-mnist")
# The column that `load_image_dataset` adds: the row number, which keys the random augmentation of each example.
INDEX_COLUMN = "example_index"
# PIL's modes of 16-bit grey images (PNG, TIFF): unsigned, so their range is 0..65535.
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes that hold one grey channel; every other mode is treated as colour.
GREY_MODES = ("1", "L", "LA", *SIXTEEN_BIT_GREY_MODES)
# What to do with images of a mode that has no known value range (32-bit integers, floats).
UNKNOWN_RANGE_FIX = (
    "their value range is unknown, so they cannot be scaled to [-1, 1]. Convert them to 8-bit (mode 'L' or 'RGB') "
    "or 16-bit grey (mode 'I;16') images."
)
# Label order of the animal-mnist package (its metadata lists the classes in this order).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
# The only globals the animal-mnist pickles reference: plain numpy arrays. Anything else is refused.
_NUMPY_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
# How many corrupt files an error message names.
_MAX_NAMED_FILES = 5


def _grey_images_to_dataset(images: np.ndarray, labels: np.ndarray, label_names: list[str]) -> datasets.Dataset:
    """A `datasets.Dataset` with an `image` column (mode "L") and a `label` column from uint8 arrays (N, H, W)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=label_names)})
    data = {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()}
    return datasets.Dataset.from_dict(data, features=features)


def load_digits_dataset() -> datasets.Dataset:
    r"""
    The default training set: the 1,797 8x8 grey images of hand-written digits bundled with scikit-learn.

    The data come from `sklearn.datasets.load_digits`, read from the scikit-learn wheel (no download). Its `DESCR`
    says: "Creator: E. Alpaydin (alpaydin '@' boun.edu.tr)", "Date: July; 1998", "This is a copy of the test set of
    the UCI ML hand-written digits datasets
    https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits". The `DESCR` text states no
    licence; the UCI Machine Learning Repository distributes the data set under the Creative Commons Attribution 4.0
    International licence (CC BY 4.0). Cite E. Alpaydin, C. Kaynak (1998), Cascading Classifiers, Kybernetika.

    Returns:
        `datasets.Dataset`: 1,797 rows with `image` (PIL images of mode "L", 8x8, the counts 0..16 scaled to 0..255)
        and `label` (the digit, a `ClassLabel` with names "0" to "9").
    """
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _grey_images_to_dataset(images, digits.target, [str(digit) for digit in range(10)])


class _NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and refuses every other global, so a pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"Refusing to load {module}.{name}: only numpy arrays are expected.")
        return super().find_class(module, name)


def _load_gzip_pickled_array(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as file:
        return _NumpyArrayUnpickler(file).load()


def _animal_mnist_data_dir() -> Path:
    """The folder of the data files inside the installed `animal-mnist` package, found without importing it."""
    # `import animal_mnist` would import TensorFlow (its __init__ does); find_spec only locates the package.
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The 'animal-mnist' data set needs the `animal-mnist` package: `pip install --no-deps animal-mnist` "
            "(--no-deps: only its data files are read, its own loader needs TensorFlow)."
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "Animal_MNIST"


def load_animal_mnist_dataset() -> datasets.Dataset:
    r"""
    10,000 28x28 grey silhouettes of animals (1,000 each of 10 classes), read from the PyPI package `animal-mnist`.

    The package (version 0.4, author Sina Mohammadi, licence MIT: "Copyright (c) 2025 SinaSR-6") describes itself as
    "a dataset consisting of 10,000 images of 28x28 grayscale images, mimicking the format of MNIST dataset". Its wheel
    ships the images and labels as gzip-compressed pickles of numpy arrays (uint8 (10000, 28, 28) and int64
    (10000,), sorted by class); they are read directly with an unpickler that only accepts numpy arrays. The
    package's own loader is not used: importing the package imports TensorFlow. Install it with
    `pip install --no-deps animal-mnist`.

    Returns:
        `datasets.Dataset`: 10,000 rows with `image` (PIL images of mode "L", 28x28) and `label` (a `ClassLabel`:
        bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra).

    Raises:
        `ImportError`: if `animal-mnist` is not installed.
    """
    data_dir = _animal_mnist_data_dir()
    images = _load_gzip_pickled_array(data_dir / "animal_data_version_3.gz")
    labels = _load_gzip_pickled_array(data_dir / "animal_label_version_3.gz")
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"Unexpected animal-mnist arrays: images {images.dtype} {images.shape}, labels {labels.shape}; expected "
            "uint8 (N, 28, 28) and (N,). Was the package updated? Version 0.4 is known to work."
        )
    return _grey_images_to_dataset(images, labels, list(ANIMAL_MNIST_CLASSES))


def _load_builtin_dataset(name: str, dataset_config_name: Optional[str], split: str) -> datasets.Dataset:
    if dataset_config_name is not None or split != "train":
        raise ValueError(
            f"The built-in data set {name!r} has no configs and only a 'train' split, but got "
            f"dataset_config_name={dataset_config_name!r} and split={split!r}. Leave both at their defaults."
        )
    return load_digits_dataset() if name == "digits" else load_animal_mnist_dataset()


def _check_data_dir(train_data_dir: str) -> None:
    """Fail early, with the fix, on a folder that `imagefolder` would reject with an obscure message."""
    path = Path(train_data_dir)
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise ValueError(f"train_data_dir {train_data_dir!r} {problem}. Pass the folder that holds your images.")
    if not any(file.suffix.lower() in IMAGE_EXTENSIONS for file in path.rglob("*") if file.is_file()):
        raise ValueError(
            f"train_data_dir {train_data_dir!r} holds no image files (searched its subfolders for extensions such as "
            ".png, .jpg, .jpeg, .webp). Put the training images in it, or pass another folder."
        )


def _check_dataset(dataset: datasets.Dataset, image_column: str) -> None:
    """Fail early on a missing or non-image `image_column` and on an empty data set."""
    if image_column not in dataset.column_names:
        raise ValueError(
            f"The data set has no column {image_column!r}; its columns are {dataset.column_names}. "
            "Pass the column that holds the images as `image_column` (`--image_column`)."
        )
    feature = dataset.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(
            f"Column {image_column!r} holds {feature}, not images (a `datasets.Image` feature). "
            f"Pass the column that holds the images as `image_column`; the columns are {dataset.column_names}."
        )
    if len(dataset) == 0:
        raise ValueError("The data set has no rows. Check `split`, `dataset_config_name` and the data files.")


def _has_unknown_range(mode: str) -> bool:
    """Whether images of this PIL mode have no value range to scale to [-1, 1]: 32-bit integers ("I") and floats."""
    return mode.startswith(("I", "F")) and mode not in SIXTEEN_BIT_GREY_MODES


def _unusable_images(dataset: datasets.Dataset, image_column: str) -> tuple[list[str], list[str]]:
    """The files (or row numbers, for images stored as bytes) that PIL cannot decode, each with its error, and those
    of a mode without a known value range, each with its mode."""
    undecoded = dataset.cast_column(image_column, datasets.Image(decode=False))
    decoder = datasets.Image()
    undecodable, unknown_range = [], []
    for row, value in enumerate(undecoded[image_column]):
        name = value["path"] or f"row {row}"
        try:
            mode = decoder.decode_example(value).mode
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the format
            undecodable.append(f"{name} ({type(error).__name__}: {error})")
            continue
        if _has_unknown_range(mode):
            unknown_range.append(f"{name} (mode {mode!r})")
    return undecodable, unknown_range


def _named(files: list[str]) -> str:
    more = f" and {len(files) - _MAX_NAMED_FILES} more" if len(files) > _MAX_NAMED_FILES else ""
    return "; ".join(files[:_MAX_NAMED_FILES]) + more


def _check_images(dataset: datasets.Dataset, image_column: str) -> None:
    """Decode every image once, as `datasets` will during training, so that a corrupt file or one that cannot be
    scaled to [-1, 1] fails before training starts."""
    undecodable, unknown_range = _unusable_images(dataset, image_column)
    if undecodable:
        raise ValueError(
            f"{len(undecodable)} of {len(dataset)} images cannot be decoded: {_named(undecodable)}. "
            "Remove or replace these files."
        )
    if unknown_range:
        raise ValueError(
            f"{len(unknown_range)} of {len(dataset)} images are 32-bit integer or float images: "
            f"{_named(unknown_range)}; {UNKNOWN_RANGE_FIX}"
        )


def load_image_dataset(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: str = "image",
    cache_dir: Optional[str] = None,
    split: str = "train",
) -> datasets.Dataset:
    r"""
    Load the training images, checking them before any training starts.

    The arguments mirror the flags of diffusers' `train_unconditional.py`. Local data (`train_data_dir`, or a
    `dataset_name` that is a local folder) is decoded once here, so that a corrupt file, or one of a mode without a
    known value range, raises a `ValueError` naming it instead of failing mid-training inside a DataLoader worker;
    this costs one extra decode of every image (about 0.06 ms for a 64x64 PNG). Hub data sets are not decoded upfront
    (that would read the whole data set; [`infer_num_channels`] checks a sample of them).

    Args:
        dataset_name (`str`, *optional*):
            A Hub data set id, a local path that `datasets.load_dataset` understands, or a built-in data set:
            "digits" ([`load_digits_dataset`]) or "animal-mnist" ([`load_animal_mnist_dataset`]). Built-in names take
            precedence over local paths. Defaults to "digits" when neither this nor `train_data_dir` is given.
        dataset_config_name (`str`, *optional*):
            The config of the Hub data set; leave as `None` if it has only one.
        train_data_dir (`str`, *optional*):
            A folder of images, loaded with the `imagefolder` builder of `datasets` (subfolders become labels).
        image_column (`str`, defaults to `"image"`):
            The column that holds the images.
        cache_dir (`str`, *optional*):
            Where `datasets` stores downloads and its Arrow cache.
        split (`str`, defaults to `"train"`):
            The split to load.

    Returns:
        `datasets.Dataset`: the data set with an added `example_index` column (the row number), which
        [`ImageTransform`] uses to key the random flip and crop of each example.

    Raises:
        `ValueError`: if both `dataset_name` and `train_data_dir` are given, the folder does not exist or holds no
        images, `image_column` is not an image column of the data set, the data set is empty, or a local image
        cannot be decoded or is a 32-bit integer or float image (16-bit grey images are scaled from 0..65535).
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError(
            f"Got both dataset_name={dataset_name!r} and train_data_dir={train_data_dir!r}; pass only one of them."
        )
    if dataset_name is None and train_data_dir is None:
        dataset_name = "digits"
    if dataset_name in BUILTIN_DATASETS:
        dataset = _load_builtin_dataset(dataset_name, dataset_config_name, split)
    elif train_data_dir is not None:
        _check_data_dir(train_data_dir)
        dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    _check_dataset(dataset, image_column)
    if train_data_dir is not None or os.path.isdir(dataset_name):
        _check_images(dataset, image_column)
    if INDEX_COLUMN in dataset.column_names:
        raise ValueError(f"The data set already has a column {INDEX_COLUMN!r}; rename it, this loader adds its own.")
    return dataset.add_column(INDEX_COLUMN, np.arange(len(dataset)))


def infer_num_channels(dataset: datasets.Dataset, image_column: str = "image") -> int:
    r"""
    The number of channels to train with: 1 if the images are grey, 3 otherwise.

    Up to 16 images spread evenly over the data set are decoded; one colour image among them makes the answer 3, so
    a folder of mostly grey images with some colour ones is trained in colour. Call it before `with_transform`.

    Args:
        dataset (`datasets.Dataset`): the data set, as [`load_image_dataset`] returns it.
        image_column (`str`, defaults to `"image"`): the column that holds the images.

    Returns:
        `int`: 1 if every inspected image has a grey mode ("1", "L", "LA" or 16-bit grey "I;16"), else 3.

    Raises:
        `ValueError`: if an inspected image is a 32-bit integer or float image (a Hub data set's images are only
        checked here, before training; a local folder's are all checked by [`load_image_dataset`]).
    """
    rows = np.unique(np.linspace(0, len(dataset) - 1, num=min(16, len(dataset))).round().astype(int))
    modes = {image.mode for image in dataset.select(rows)[image_column]}
    unknown_range = sorted(mode for mode in modes if _has_unknown_range(mode))
    if unknown_range:
        raise ValueError(
            f"The data set holds images of mode {unknown_range} (32-bit integer or float); {UNKNOWN_RANGE_FIX}"
        )
    return 1 if modes <= set(GREY_MODES) else 3


def _convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Grey ("L") for 1 channel, "RGB" for 3; PIL's ITU-R 601-2 luma for colour to grey, alpha is dropped. A 16-bit
    grey image becomes a float ("F") image of the same values scaled to [0, 255]: `_to_tensor` then scales it as an
    8-bit image, and the resize keeps its 16-bit precision (PIL's conversion to "L" would clip it at 255)."""
    if image.mode in SIXTEEN_BIT_GREY_MODES:
        return Image.fromarray(np.asarray(image, dtype=np.float32) * np.float32(255 / 65535))
    if _has_unknown_range(image.mode):
        raise ValueError(f"An image of mode {image.mode!r} is a 32-bit integer or float image; {UNKNOWN_RANGE_FIX}")
    target_mode = "L" if channels == 1 else "RGB"
    return image if image.mode == target_mode else image.convert(target_mode)


def _resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so that the shorter side is `resolution`, keeping the aspect ratio (as torchvision's `Resize(int)`)."""
    width, height = image.size
    if min(width, height) == resolution:
        return image
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    # PIL's bilinear filter widens its support when shrinking, i.e. it antialiases.
    return image.resize(size, Image.BILINEAR)


def _to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """An "L", "RGB" or "F" image (values in [0, 255]) as a float32 tensor (channels, H, W) in [-1, 1]:
    x / 127.5 - 1. A grey "F" image fills every channel."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(pixels.reshape(image.height, image.width, -1)).permute(2, 0, 1)
    return pixels.expand(channels, -1, -1).contiguous()


class ImageTransform:
    r"""
    Turns images into training tensors: grey/RGB conversion, resize, crop, optional flip, scaling to [-1, 1].

    Use it with `dataset.with_transform(transform)` on a data set from [`load_image_dataset`]; every example becomes
    `{"pixel_values": tensor (channels, resolution, resolution)}`, which [`collate_images`] stacks. As in diffusers'
    `train_unconditional.py`, the shorter side is resized to `resolution` (bilinear, antialiased), then the image is
    center-cropped (`center_crop=True`) or randomly cropped, and flipped horizontally with probability 1/2 if
    `random_flip`.

    The random crop and flip of an example are drawn from `numpy.random.default_rng([seed, epoch, example_index])`:
    no global RNG state, so the same seed reproduces the same images in any order, on any number of processes and
    DataLoader workers, and after resuming mid-epoch. Call [`~ImageTransform.set_epoch`] at the start of every epoch,
    before iterating the DataLoader: workers copy the transform when an epoch's iterator starts, so do not combine it
    with `persistent_workers=True` (the workers would keep the first epoch).

    Args:
        resolution (`int`):
            Side of the square output images.
        channels (`int`, defaults to 3):
            1 (grey, mode "L") or 3 (RGB). Images of the other kind are converted.
        center_crop (`bool`, defaults to `True`):
            Center-crop to `resolution`; if `False`, crop at a random position.
        random_flip (`bool`, defaults to `False`):
            Flip horizontally with probability 1/2.
        seed (`int`, defaults to 0):
            Seed of the random crop and flip; pass the training seed.
        image_column (`str`, defaults to `"image"`):
            The column that holds the images.
    """

    def __init__(
        self,
        resolution: int,
        channels: int = 3,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        image_column: str = "image",
    ):
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}.")
        self.resolution = resolution
        self.channels = channels
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.image_column = image_column
        self.epoch = 0

    @property
    def is_random(self) -> bool:
        """Whether the transform draws random numbers (a random crop or flip)."""
        return self.random_flip or not self.center_crop

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the example index, keys the random crop and flip."""
        self.epoch = epoch

    def example_generator(self, index: int) -> np.random.Generator:
        """The generator of the crop and flip of example `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def _crop(self, image: Image.Image, generator: Optional[np.random.Generator]) -> Image.Image:
        width, height = image.size
        if self.center_crop:
            left, top = round((width - self.resolution) / 2), round((height - self.resolution) / 2)
        else:
            left = int(generator.integers(0, width - self.resolution + 1))
            top = int(generator.integers(0, height - self.resolution + 1))
        return image.crop((left, top, left + self.resolution, top + self.resolution))

    def preprocess(self, image: Image.Image, index: Optional[int] = None) -> torch.Tensor:
        r"""
        Transform one image.

        Args:
            image (`PIL.Image.Image`): an 8-bit image of any mode PIL converts to "L" or "RGB", or a 16-bit grey
                image (mode "I;16"), whose range 0..65535 is scaled to [-1, 1].
            index (`int`, *optional*): the example index; required when the transform is random.

        Returns:
            `torch.Tensor` of shape `(channels, resolution, resolution)`: float32 values in [-1, 1].
        """
        generator = None
        if self.is_random:
            if index is None:
                raise ValueError(
                    f"A random crop or flip needs the example index (the {INDEX_COLUMN!r} column that "
                    f"`load_image_dataset` adds; for another data set: "
                    f"`dataset.add_column({INDEX_COLUMN!r}, range(len(dataset)))`)."
                )
            generator = self.example_generator(index)
        # Drawn first, so that the flips do not depend on whether the crop is random.
        flip = self.random_flip and generator.random() < 0.5
        image = _resize_shorter_side(_convert_mode(image, self.channels), self.resolution)
        pixels = _to_tensor(self._crop(image, generator), self.channels)
        return pixels.flip(-1) if flip else pixels

    def __call__(self, examples: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        """Transform a batch of examples as `datasets.Dataset.with_transform` passes it (a dict of lists)."""
        images = examples[self.image_column]
        indices = examples.get(INDEX_COLUMN, [None] * len(images))
        pixel_values = [self.preprocess(image, index) for image, index in zip(images, indices, strict=True)]
        return {"pixel_values": pixel_values}


def collate_images(examples: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    r"""
    Stack transformed examples into a batch, as the `collate_fn` of a `torch.utils.data.DataLoader`.

    Args:
        examples (`list[dict]`): examples from [`ImageTransform`], each with a `pixel_values` tensor (C, H, W).

    Returns:
        `torch.Tensor` of shape `(batch_size, channels, resolution, resolution)`.
    """
    return torch.stack([example["pixel_values"] for example in examples])
