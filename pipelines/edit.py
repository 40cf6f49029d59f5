"""Edit an image zero-shot with a trained QAC model (paper Algorithm 2): inpainting, colorization, super-resolution.

    python pipelines/edit.py --model PATH_OR_REPO --task inpaint --image in.png --mask mask.png --out out.png
    python pipelines/edit.py --model PATH_OR_REPO --task colorize --image grey.png --out out.png
    python pipelines/edit.py --model PATH_OR_REPO --task super_resolve --image low.png --factor 2 --out out.png

--image is at the model's size for inpaint (the mask too: white = pixels to fill, black = pixels to keep) and grey
(mode L) for colorize; for super_resolve it is the low-resolution image, of the model's size divided by --factor.
"""

import argparse

import PIL.Image
import torch

from qac_diffusers import QACImageEditPipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by train_qac.py or a Hub repo id.")
    parser.add_argument("--task", required=True, choices=["inpaint", "colorize", "super_resolve"])
    parser.add_argument("--image", required=True, help="The input image (see above).")
    parser.add_argument("--mask", help="inpaint only: white = pixels to fill, black = pixels to keep.")
    parser.add_argument("--factor", type=int, help="super_resolve only: the upscaling factor.")
    parser.add_argument("--steps", type=int, default=40, help="Number of Karras time steps (and UNet calls).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="edited.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = QACImageEditPipeline.from_pretrained(args.model).to(args.device)
    image = PIL.Image.open(args.image)
    mask = PIL.Image.open(args.mask) if args.mask else None
    edited = pipe(
        image,
        task=args.task,
        mask=mask,
        factor=args.factor,
        num_inference_steps=args.steps,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    ).images[0]
    edited.save(args.out)
    print(f"Wrote the {args.task} result ({args.steps} steps) to {args.out}")


if __name__ == "__main__":
    main()
