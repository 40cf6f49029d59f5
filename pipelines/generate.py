"""Sample a grid of images from a trained QAC model.

    python pipelines/generate.py --model PATH_OR_REPO --num_images 16 --steps 6 --out grid.png
    python pipelines/generate.py --model RECTIFIED_FLOW_MODEL --scheduler heun --steps 5   # or --scheduler rk45
"""

import argparse

import torch

from qac_diffusers import QACPipeline
from qac_diffusers.formulations import rectified_flow
from qac_diffusers.schedulers import SOLVERS
from qac_diffusers.utils import image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by train_qac.py or a Hub repo id.")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="Number of UNet evaluations (NFE).")
    parser.add_argument(
        "--scheduler", choices=sorted({*SOLVERS, *rectified_flow.SOLVERS, "rk45"}),
        help="The model's own scheduler when not given. EDM models: the EDM solvers; rectified-flow models: euler, "
        "heun (an odd --steps) or rk45 (adaptive, its NFE printed; --steps is ignored).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile_size", type=int, default=64, help="Each image is upscaled to this size in the grid.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="grid.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = QACPipeline.from_pretrained(args.model).to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if args.scheduler == "rk45":
        output, nfe = pipe.sample_reference(batch_size=args.num_images, generator=generator)
    else:
        if args.scheduler is not None:
            pipe.scheduler = pipe.formulation.solver(args.scheduler)
        output, nfe = pipe(batch_size=args.num_images, num_inference_steps=args.steps, generator=generator), args.steps
    image_grid(output.images, tile_size=args.tile_size).save(args.out)
    scheduler = args.scheduler or type(pipe.scheduler).__name__
    print(f"Wrote {args.num_images} images ({nfe} NFE, {scheduler}) to {args.out}")


if __name__ == "__main__":
    main()
