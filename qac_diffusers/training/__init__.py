from .data import (
    ImageTransform,
    collate_images,
    infer_num_channels,
    load_animal_mnist_dataset,
    load_digits_dataset,
    load_image_dataset,
)
from .hub import default_template_path, push_to_hub, write_model_card
