"""Replace a trained QAC model's online code weights by offline ones (paper section 3.3, Table 2), and save the result.

    python pipelines/offline_code_weights.py --model PATH_OR_REPO --output_dir OUT_DIR [--dataset_name digits]

The codes of the training images are counted under the model's encoder (the final EMA encoder, which train_qac.py
saves), and their shares are stored as the encoder's `code_weights`, where the online weights were: the pipeline saved
to --output_dir samples from the offline weights and loads like any other. The images are center-cropped and not
flipped. The data flags are those of train_qac.py; pass the data set the model was trained on.
"""

import argparse
import os

import torch
from torch.utils.data import DataLoader

from qac_diffusers import QACPipeline
from qac_diffusers.training import ImageTransform, collate_images, load_image_dataset
from qac_diffusers.training.code_usage import code_usage, offline_code_weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by train_qac.py or a Hub repo id.")
    parser.add_argument("--output_dir", required=True, help="Where the pipeline with offline weights is saved.")
    parser.add_argument("--dataset_name", help="As train_qac.py: a Hub id, a local path, 'digits', 'animal-mnist'.")
    parser.add_argument("--dataset_config_name")
    parser.add_argument("--train_data_dir", help="A folder of images (datasets' imagefolder).")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--cache_dir")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def training_images(args: argparse.Namespace, pipe: QACPipeline) -> DataLoader:
    """The data set as batches of the model's size and channel count, in [-1, 1], in order."""
    dataset = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column, args.cache_dir
    )
    channels, resolution, _ = pipe.image_shape
    transform = ImageTransform(resolution, channels, center_crop=True, image_column=args.image_column)
    return DataLoader(dataset.with_transform(transform), batch_size=args.batch_size, collate_fn=collate_images)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if os.path.isdir(args.model) and os.path.abspath(args.output_dir) == os.path.abspath(args.model):
        raise ValueError(
            "--output_dir is the model's own folder: its online code weights would be lost. Pass another folder."
        )
    pipe = QACPipeline.from_pretrained(args.model).to(args.device)
    if pipe.encoder is None:
        raise ValueError(f"{args.model} is an unconditional baseline (no encoder): it has no codes to count.")
    online = code_usage(pipe.encoder.code_weights)
    weights = offline_code_weights(pipe.encoder.eval(), training_images(args, pipe))
    pipe.encoder.code_weights.copy_(weights)
    pipe.save_pretrained(args.output_dir)
    offline = code_usage(pipe.encoder.code_weights)
    for name, usage in (("online", online), ("offline", offline)):
        print(f"{name:>8} weights: " + ", ".join(f"{key} {value:.4g}" for key, value in usage.items()))
    print(f"Saved the pipeline with offline code weights to {args.output_dir}")


if __name__ == "__main__":
    main()
