"""Data loading: built-in data sets, Hub/folder loading errors, the transform and the collate function."""

import importlib.util

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from qac_diffusers.training.data import (
    INDEX_COLUMN,
    ImageTransform,
    collate_images,
    infer_num_channels,
    load_animal_mnist_dataset,
    load_digits_dataset,
    load_image_dataset,
)


# A 4x4 grey gradient that is not left-right symmetric, so a flip is visible.
GRADIENT = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture
def image_folder(tmp_path):
    """A folder with two RGB and two grey PNGs of different sizes, in two class subfolders."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    shapes = {"cat/a.png": (12, 10, 3), "cat/b.png": (9, 9, 3), "dog/c.png": (10, 14), "dog/d.png": (8, 8)}
    for name, shape in shapes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return folder


def load_folder(folder, tmp_path, **kwargs):
    return load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"), **kwargs)


def test_digits_dataset(digits):
    assert len(digits) == 1797
    assert digits.column_names == ["image", "label"]
    image = digits[0]["image"]
    assert (image.mode, image.size) == ("L", (8, 8))
    pixels = np.stack([np.asarray(row["image"]) for row in digits.select(range(200))])
    # The counts 0..16 scaled to 0..255: both ends occur and every value is a multiple of 255/16 (rounded).
    assert pixels.min() == 0 and pixels.max() == 255
    assert set(np.unique(pixels)) <= {round(count * 255 / 16) for count in range(17)}
    assert digits.features["label"].names == [str(digit) for digit in range(10)]
    assert digits[:10]["label"] == list(range(10))


def test_animal_mnist_dataset():
    if importlib.util.find_spec("animal_mnist") is None:
        pytest.skip("animal-mnist is not installed (pip install --no-deps animal-mnist)")
    animals = load_animal_mnist_dataset()
    assert len(animals) == 10_000
    image = animals[0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))
    assert np.bincount(animals["label"]).tolist() == [1000] * 10
    assert animals.features["label"].names[0] == "bear"


def test_animal_mnist_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps animal-mnist"):
        load_animal_mnist_dataset()


def test_load_image_dataset_defaults_to_digits():
    dataset = load_image_dataset()
    assert len(dataset) == 1797
    assert dataset[:3][INDEX_COLUMN] == [0, 1, 2]
    assert infer_num_channels(dataset) == 1


def test_image_folder_loads_and_transforms(image_folder, tmp_path):
    dataset = load_folder(image_folder, tmp_path)
    assert len(dataset) == 4
    assert {image.mode for image in dataset["image"]} == {"RGB", "L"}
    assert infer_num_channels(dataset) == 3
    for channels in (1, 3):
        transform = ImageTransform(resolution=6, channels=channels, random_flip=True, seed=0)
        loader = torch.utils.data.DataLoader(
            dataset.with_transform(transform), batch_size=4, collate_fn=collate_images
        )
        batch = next(iter(loader))
        assert batch.shape == (4, channels, 6, 6) and batch.dtype == torch.float32
        assert batch.min() >= -1 and batch.max() <= 1


def test_infer_num_channels_grey_folder(tmp_path):
    folder = tmp_path / "grey"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(GRADIENT).save(folder / f"{index}.png")
    assert infer_num_channels(load_folder(folder, tmp_path)) == 1


def test_transform_known_values():
    # Already at the resolution: only the scaling x / 127.5 - 1 applies.
    image = Image.fromarray(np.array([[0, 255], [51, 204]], dtype=np.uint8))
    pixels = ImageTransform(resolution=2, channels=1).preprocess(image)
    torch.testing.assert_close(pixels, torch.tensor([[[-1.0, 1.0], [-0.6, 0.6]]]))
    # Shrinking a checkerboard antialiases to its mean 127.5 (PIL rounds to 128); nearest would give -1 or 1.
    checker = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    mean = ImageTransform(resolution=1, channels=1).preprocess(checker)
    torch.testing.assert_close(mean, torch.full((1, 1, 1), 0.5 / 127.5))


def test_transform_resizes_shorter_side_then_center_crops():
    # 8x4 (width x height): the shorter side is already 4, the center crop keeps columns 2..5.
    wide = np.tile(np.arange(8, dtype=np.uint8) * 30, (4, 1))
    pixels = ImageTransform(resolution=4, channels=1).preprocess(Image.fromarray(wide))
    torch.testing.assert_close(pixels[0, 0], torch.tensor([60.0, 90.0, 120.0, 150.0]) / 127.5 - 1)
    # 8x16 (width x height) shrinks to 4x8 first, then the crop is 4x4.
    tall = Image.fromarray(np.zeros((16, 8), np.uint8))
    assert ImageTransform(resolution=4, channels=1).preprocess(tall).shape == (1, 4, 4)


def test_grey_and_rgb_conversions():
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    # ITU-R 601-2 luma: 0.299 * 255 = 76.2 -> 76.
    torch.testing.assert_close(ImageTransform(2, channels=1).preprocess(red), torch.full((1, 2, 2), 76 / 127.5 - 1))
    grey = Image.fromarray(GRADIENT)
    rgb = ImageTransform(4, channels=3).preprocess(grey)
    assert rgb.shape == (3, 4, 4)
    torch.testing.assert_close(rgb, ImageTransform(4, channels=1).preprocess(grey).expand(3, 4, 4))
    with pytest.raises(ValueError, match="mode 'I' is a 32-bit integer or float image; their value range is unknown"):
        ImageTransform(4, channels=1).preprocess(Image.fromarray(GRADIENT.astype(np.int32)))


def save_16_bit_png(path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"  # what PIL reads back from a 16-bit grey PNG


def test_16_bit_pngs_load_and_scale_their_full_range(tmp_path):
    folder = tmp_path / "sixteen"
    folder.mkdir()
    save_16_bit_png(folder / "ends.png", np.array([[0, 1000], [32768, 65535]]))
    save_16_bit_png(folder / "gradient.png", GRADIENT.astype(np.uint16) * 257)  # the 8-bit gradient, widened
    dataset = load_folder(folder, tmp_path)
    assert infer_num_channels(dataset) == 1
    ends, gradient = (ImageTransform(4, channels=1).preprocess(row["image"]) for row in dataset)
    # 0..65535 is scaled to [-1, 1]: v / 32767.5 - 1.
    expected = torch.tensor([[0, 1000], [32768, 65535]], dtype=torch.float64) / 32767.5 - 1
    torch.testing.assert_close(ImageTransform(2, channels=1).preprocess(dataset[0]["image"])[0].double(), expected)
    assert ends.shape == (1, 4, 4)
    torch.testing.assert_close(gradient, ImageTransform(4, channels=1).preprocess(Image.fromarray(GRADIENT)))
    rgb = ImageTransform(4, channels=3).preprocess(dataset[1]["image"])
    torch.testing.assert_close(rgb, gradient.expand(3, 4, 4))


def test_16_bit_precision_survives_the_resize(tmp_path):
    save_16_bit_png(tmp_path / "faint.png", np.array([[0, 2], [2, 0]]))
    # The antialiased mean is 1 of 65535, below one 8-bit step: clipped to 8 bits it would be exactly -1.
    pixels = ImageTransform(1, channels=1).preprocess(Image.open(tmp_path / "faint.png"))
    assert pixels.item() == pytest.approx(1 / 32767.5 - 1, abs=1e-7)
    assert pixels.item() > -1


def test_32_bit_images_fail_when_loaded(image_folder, tmp_path):
    Image.fromarray(np.ones((8, 8), np.float32)).save(image_folder / "dog" / "float.tiff")
    message = r"1 of 5 images are 32-bit integer or float images: .*float\.tiff \(mode 'F'\); their value range"
    with pytest.raises(ValueError, match=message):
        load_folder(image_folder, tmp_path)
    dataset = datasets.Dataset.from_dict({"image": [Image.fromarray(np.ones((8, 8), np.int32))]})
    with pytest.raises(ValueError, match=r"images of mode \['I'\] \(32-bit integer or float\); their value range"):
        infer_num_channels(dataset)


def test_random_flips_are_deterministic_and_keyed_by_seed_epoch_index():
    image = Image.fromarray(GRADIENT)
    plain = ImageTransform(4, channels=1).preprocess(image)
    transform = ImageTransform(4, channels=1, random_flip=True, seed=3)

    def flips(epoch, indices):
        transform.set_epoch(epoch)
        outputs = transform({"image": [image] * len(indices), INDEX_COLUMN: indices})["pixel_values"]
        for output in outputs:
            assert torch.equal(output, plain) or torch.equal(output, plain.flip(-1))
        return [bool(torch.equal(output, plain.flip(-1))) for output in outputs]

    epoch_0 = flips(0, list(range(200)))
    assert 70 < sum(epoch_0) < 130
    # The same example gets the same flip whatever the batch it is in and whatever came before (a resume).
    assert flips(0, list(range(199, 99, -1))) == epoch_0[100:][::-1]
    assert flips(1, list(range(200))) != epoch_0
    transform.seed = 4
    assert flips(0, list(range(200))) != epoch_0
    with pytest.raises(ValueError, match="needs the example index"):
        transform.preprocess(image)


def test_random_crop_is_deterministic():
    wide = Image.fromarray(np.tile(np.arange(12, dtype=np.uint8) * 20, (4, 1)))
    transform = ImageTransform(4, channels=1, center_crop=False, seed=0)
    first_columns = {transform.preprocess(wide, index)[0, 0, 0].item() for index in range(50)}
    assert len(first_columns) > 3  # several of the 9 crop positions occur
    torch.testing.assert_close(transform.preprocess(wide, 7), transform.preprocess(wide, 7))


def test_both_sources_given():
    with pytest.raises(ValueError, match="pass only one of them"):
        load_image_dataset(dataset_name="digits", train_data_dir="images")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_folder(tmp_path / "missing", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image files"):
        load_folder(empty, tmp_path)


def test_missing_image_column(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'img'; its columns are \['image', 'label'\]"):
        load_folder(image_folder, tmp_path, image_column="img")
    with pytest.raises(ValueError, match="holds ClassLabel"):
        load_image_dataset("digits", image_column="label")


def test_corrupt_images_are_named(image_folder, tmp_path):
    (image_folder / "cat" / "broken.png").write_bytes(b"this is not a png")
    truncated = (image_folder / "dog" / "c.png").read_bytes()
    (image_folder / "dog" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(ValueError, match=r"2 of 6 images cannot be decoded: .*broken\.png.*truncated\.png"):
        load_folder(image_folder, tmp_path)


def test_builtin_rejects_config_and_split():
    with pytest.raises(ValueError, match="only a 'train' split"):
        load_image_dataset("digits", split="test")


def test_invalid_transform_arguments():
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageTransform(8, channels=2)
    with pytest.raises(ValueError, match="resolution must be a positive"):
        ImageTransform(0)


def test_collate_images():
    examples = [{"pixel_values": torch.full((1, 2, 2), float(value))} for value in range(3)]
    batch = collate_images(examples)
    assert batch.shape == (3, 1, 2, 2)
    assert batch[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
