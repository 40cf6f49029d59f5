"""The README's pictures from a trained model: zero-shot editing, variations, interpolation between codes.

    python benchmarks/figures.py --model demo-output/qac-digits                 # after `make demo`

Writes benchmarks/results/{editing,variations,interpolation}.png. The inputs are digits of the embedded data set
(which the demo model was trained on).
"""

import argparse
from pathlib import Path

import PIL.Image
import torch

from qac_diffusers import QACImageEditPipeline
from qac_diffusers.training import load_digits_dataset
from qac_diffusers.utils import image_grid

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "demo-output" / "qac-digits"))
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="Steps of the editing algorithm (paper: 40).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    return parser.parse_args()


def load(path: str) -> QACImageEditPipeline:
    pipe = QACImageEditPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stack_rows(rows: list[PIL.Image.Image], gap: int = 6) -> PIL.Image.Image:
    canvas = PIL.Image.new("RGB", (max(r.width for r in rows), sum(r.height + gap for r in rows) - gap), "white")
    top = 0
    for row in rows:
        canvas.paste(row.convert("RGB"), (0, top))
        top += row.height + gap
    return canvas


def editing_rows(pipe: QACImageEditPipeline, digits: list[PIL.Image.Image], args) -> list[PIL.Image.Image]:
    """Per task three rows: input, degraded, result."""
    size = pipe.image_shape[1]
    mask = PIL.Image.new("L", (size, size), 0)
    mask.paste(255, (0, size // 2, size, size))  # fill the lower half
    low_resolution = [digit.resize((size // 2, size // 2), PIL.Image.BOX) for digit in digits]
    rows = []
    for task, inputs, kwargs in (
        ("inpaint", digits, {"mask": mask}),
        ("super_resolve", low_resolution, {"factor": 2}),
    ):
        output = pipe(inputs, task=task, num_inference_steps=args.steps, generator=seeded(args.seed), **kwargs)
        rows += [image_grid(digits, columns=len(digits)), image_grid(output.degraded, columns=len(digits)),
                 image_grid(output.images, columns=len(digits))]
    return rows


def main() -> None:
    args = parse_args()
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    pipe = load(args.model)
    digits = load_digits_dataset()["image"][: args.num_images]

    stack_rows(editing_rows(pipe, digits, args)).save(results_dir / "editing.png")

    # Each row: a reference digit, then 8 samples sharing its code
    variations = pipe.variations(digits[:4], num_variations=8, generator=seeded(args.seed)).images
    rows = [image_grid([digits[i], *variations[8 * i : 8 * i + 8]], columns=9) for i in range(4)]
    stack_rows(rows).save(results_dir / "variations.png")
    codes = pipe.encode(digits[:4])
    # Each row: from the code of one digit to the code of the next, one bit at a time, the same noise throughout
    paths = [pipe.interpolate(codes[i], codes[i + 1], generator=seeded(args.seed)).images for i in (0, 1, 2)]
    rows = [image_grid(images, columns=len(images)) for images in paths]
    stack_rows(rows).save(results_dir / "interpolation.png")
    print(f"Wrote editing.png, variations.png and interpolation.png to {results_dir}")


if __name__ == "__main__":
    main()
