"""The README's pictures from a trained model: zero-shot editing, variations, interpolation between codes.

    python benchmarks/figures.py --model demo-output/qac-digits                 # after `make demo`

The embedded digits are grey, so the colorization row needs a 3-channel model; this makes one from tinted digits:

    python benchmarks/figures.py --write_colour_digits benchmarks/work/colour-digits
    python train_qac.py --train_data_dir benchmarks/work/colour-digits --output_dir benchmarks/work/qac-colour-digits \
        --max_train_steps 2000
    python benchmarks/figures.py --color_model benchmarks/work/qac-colour-digits

Writes benchmarks/results/{editing,variations,interpolation,colorization}.png. The inputs are digits of the embedded
data set (which the demo model was trained on).
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
    parser.add_argument("--color_model", help="A 3-channel model: writes colorization.png.")
    parser.add_argument(
        "--write_colour_digits", help="Write the digits, tinted by class, as an image folder; then stop."
    )
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


def tint(digit: PIL.Image.Image, label: int) -> PIL.Image.Image:
    """A grey digit coloured by its class: hue label / 10 at full saturation, brightness = the grey level."""
    hue = PIL.Image.new("L", digit.size, int(255 * label / 10))
    return PIL.Image.merge("HSV", (hue, PIL.Image.new("L", digit.size, 255), digit)).convert("RGB")


def write_colour_digits(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits_dataset()
    for index, (digit, label) in enumerate(zip(digits["image"], digits["label"])):
        tint(digit, label).save(folder / f"{index:04d}.png")
    print(f"Wrote {len(digits)} tinted digits to {folder}")


def colorization_rows(pipe: QACImageEditPipeline, args) -> list[PIL.Image.Image]:
    """Rows: a tinted digit, its grey version (the input), the colorized result."""
    digits = load_digits_dataset()[: args.num_images]
    coloured = [tint(digit, label) for digit, label in zip(digits["image"], digits["label"])]
    grey = [image.convert("L") for image in coloured]
    output = pipe(grey, task="colorize", num_inference_steps=args.steps, generator=seeded(args.seed))
    return [image_grid(images, columns=len(images)) for images in (coloured, output.degraded, output.images)]


def main() -> None:
    args = parse_args()
    if args.write_colour_digits:
        write_colour_digits(Path(args.write_colour_digits))
        return
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.color_model:
        stack_rows(colorization_rows(load(args.color_model), args)).save(results_dir / "colorization.png")
        print(f"Wrote colorization.png to {results_dir}")
        return
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
