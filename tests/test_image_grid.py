import numpy as np
import PIL.Image
import pytest

from qac_diffusers.utils import image_grid


def test_grid_layout_padding_and_empty_cells():
    images = [PIL.Image.new("L", (8, 8), color=value) for value in (0, 100, 200)]
    grid = np.asarray(image_grid(images, tile_size=16, columns=2, padding=2).convert("L"))
    assert grid.shape == (36, 36)
    assert grid[0, 0] == 255 and grid[17, 17] == 255 and grid[1, 1] == 0  # 1-pixel borders around each tile
    assert grid[5, 18 + 5] == 100 and grid[18 + 5, 5] == 200
    assert grid[18 + 5, 18 + 5] == 255  # the missing fourth cell is white
    assert image_grid(images).size == (132, 132)  # 2 x 2 cells of 64 + 2 pixels by default


def test_empty_grid_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        image_grid([])
