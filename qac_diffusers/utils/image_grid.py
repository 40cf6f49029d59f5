"""A viewable grid of (possibly tiny) images."""

import math

import PIL.Image
import PIL.ImageOps
from diffusers.utils import make_image_grid


def image_grid(
    images: list[PIL.Image.Image], tile_size: int = 64, columns: int | None = None, padding: int = 2
) -> PIL.Image.Image:
    """
    Arrange images in a near-square grid, each upscaled (nearest neighbour) to `tile_size` pixels so that 8x8 or
    28x28 samples can be looked at, separated by `padding` white pixels. Missing cells of the last row are white.

    Args:
        images (`list[PIL.Image.Image]`): Images of one size and mode.
        tile_size (`int`, defaults to 64): Side of each cell in pixels.
        columns (`int`, *optional*): Cells per row; ceil(sqrt(len(images))) when `None`.
        padding (`int`, defaults to 2): White pixels between cells.
    """
    if not images:
        raise ValueError("`images` is empty: nothing to put in a grid.")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    white = 255 if images[0].mode == "L" else (255,) * len(images[0].getbands())
    tiles = [
        PIL.ImageOps.expand(image.resize((tile_size, tile_size), resample=PIL.Image.NEAREST), padding // 2, white)
        for image in images
    ]
    tiles += [PIL.Image.new(tiles[0].mode, tiles[0].size, white)] * (rows * columns - len(tiles))
    return make_image_grid(tiles, rows=rows, cols=columns)
