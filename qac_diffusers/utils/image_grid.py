"""A viewable grid of (possibly tiny) images."""

import math

import PIL.Image
from diffusers.utils import make_image_grid


def image_grid(images: list[PIL.Image.Image], tile_size: int = 64, columns: int | None = None) -> PIL.Image.Image:
    """
    Arrange images in a near-square grid, each upscaled (nearest neighbour) to `tile_size` pixels so that 8x8 or
    28x28 samples can be looked at. Missing cells of the last row are black.

    Args:
        images (`list[PIL.Image.Image]`): Images of one size and mode.
        tile_size (`int`, defaults to 64): Side of each cell in pixels.
        columns (`int`, *optional*): Cells per row; ceil(sqrt(len(images))) when `None`.
    """
    if not images:
        raise ValueError("`images` is empty: nothing to put in a grid.")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tiles = [image.resize((tile_size, tile_size), resample=PIL.Image.NEAREST) for image in images]
    tiles += [PIL.Image.new(tiles[0].mode, tiles[0].size)] * (rows * columns - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=columns)
