"""Sample a grid of images from a trained QAC model.

    python pipelines/generate.py --model PATH_OR_REPO --num_images 16 --steps 6 --out grid.png
"""

import argparse

import torch

from qac_diffusers import QACPipeline
from qac_diffusers.schedulers import SOLVERS, solver_from_config
from qac_diffusers.utils import image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by train_qac.py or a Hub repo id.")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="Number of UNet evaluations (NFE) with iPNDM.")
    parser.add_argument("--scheduler", choices=sorted(SOLVERS), default="ipndm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile_size", type=int, default=64, help="Each image is upscaled to this size in the grid.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="grid.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = QACPipeline.from_pretrained(args.model).to(args.device)
    pipe.scheduler = solver_from_config(args.scheduler, pipe.scheduler.config)
    images = pipe(
        batch_size=args.num_images,
        num_inference_steps=args.steps,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    ).images
    image_grid(images, tile_size=args.tile_size).save(args.out)
    print(f"Wrote {args.num_images} images ({args.steps} steps, {args.scheduler}) to {args.out}")


if __name__ == "__main__":
    main()
