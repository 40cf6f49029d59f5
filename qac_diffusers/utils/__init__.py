from .image_grid import image_grid
