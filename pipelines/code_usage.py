"""Report how a trained QAC model uses its codes, and what its most used codes (its pseudo-labels) look like.

    python pipelines/code_usage.py --model PATH_OR_REPO --top_codes 8 --samples_per_code 8 --steps 6 --out_dir report/

Writes to --out_dir:
    code_usage.md         codes used, entropy, perplexity, how many codes carry 50/90/99% of the weight, the largest
                          share, and a table of the most used codes
    cumulative_share.png  the share of the weight carried by the n most used codes, against n (log scale)
    top_codes.png         one row per most used code (in the table's order), `--samples_per_code` samples each

Needs matplotlib (`pip install "qac-diffusers[dev]"`).
"""

import argparse
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from qac_diffusers import QACPipeline
from qac_diffusers.training.code_usage import code_usage, codes_for_share, cumulative_shares, top_codes
from qac_diffusers.utils import image_grid


SHARES = (0.5, 0.9, 0.99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder written by train_qac.py or a Hub repo id.")
    parser.add_argument("--top_codes", type=int, default=8, help="How many of the most used codes to show.")
    parser.add_argument("--samples_per_code", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="Number of UNet evaluations (NFE) with iPNDM.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile_size", type=int, default=64, help="Each image is upscaled to this size in the grid.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out_dir", default="code-usage-report")
    return parser.parse_args(argv)


def summary_lines(code_weights: torch.Tensor, code_levels: int, code_dim: int) -> list[str]:
    """The statistics table of the report."""
    usage = code_usage(code_weights)
    lines = [
        "| statistic | value |",
        "|---|---|",
        f"| codes used | {usage['codes_used']} of {code_levels**code_dim} (L={code_levels}, d={code_dim}) |",
        f"| entropy | {usage['entropy_bits']:.3f} bits (at most {code_dim * math.log2(code_levels):.3f}) |",
        f"| perplexity (effective number of codes) | {usage['perplexity']:.1f} |",
        f"| largest share | {usage['largest_share']:.2%} |",
    ]
    lines += [f"| codes for {share:.0%} of the weight | {codes_for_share(code_weights, share)} |" for share in SHARES]
    return lines


def top_code_lines(pipe: QACPipeline, indices: torch.LongTensor, shares: torch.Tensor) -> list[str]:
    """The table of the most used codes: rank, index, levels (channel 0 first), share and cumulative share."""
    levels = pipe.encoder.indices_to_codes(indices.to(pipe.encoder.device)).long().tolist()
    lines = ["| rank | code index | levels (channel 0 first) | share | cumulative share |", "|---|---|---|---|---|"]
    for rank, (index, code, share, cumulative) in enumerate(
        zip(indices.tolist(), levels, shares.tolist(), shares.cumsum(0).tolist()), start=1
    ):
        lines.append(f"| {rank} | {index} | `{''.join(map(str, code))}` | {share:.2%} | {cumulative:.2%} |")
    return lines


def plot_cumulative_share(code_weights: torch.Tensor, path: Path) -> None:
    """Cumulative share of the weight against the number of codes, most used first, on a log x axis."""
    cumulative = cumulative_shares(code_weights)
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(range(1, len(cumulative) + 1), cumulative.numpy(), drawstyle="steps-post")
    for share in SHARES:
        axes.axhline(share, color="grey", linestyle=":", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("number of codes, most used first (log scale)")
    axes.set_ylabel("cumulative share of the code weight")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def sample_codes(
    pipe: QACPipeline, indices: torch.LongTensor, samples_per_code: int, steps: int, generator: torch.Generator
) -> list:
    """`samples_per_code` PIL samples of every code in `indices`, code after code (one pipeline call per code)."""
    samples = []
    for index in indices.tolist():
        code_indices = torch.full((samples_per_code,), index)
        samples += pipe(
            batch_size=samples_per_code, num_inference_steps=steps, generator=generator, code_indices=code_indices
        ).images
    return samples


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = QACPipeline.from_pretrained(args.model).to(args.device)
    if pipe.encoder is None:
        raise ValueError(f"{args.model} is an unconditional baseline (no encoder): it has no codes to report on.")
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = pipe.encoder.code_weights.cpu()
    indices, shares = top_codes(weights, args.top_codes)

    generator = torch.Generator(args.device).manual_seed(args.seed)
    samples = sample_codes(pipe, indices, args.samples_per_code, args.steps, generator)
    image_grid(samples, tile_size=args.tile_size, columns=args.samples_per_code).save(out_dir / "top_codes.png")
    plot_cumulative_share(weights, out_dir / "cumulative_share.png")

    config = pipe.encoder.config
    report = [
        f"# Code usage of {args.model}",
        "",
        *summary_lines(weights, config.code_levels, config.code_dim),
        "",
        "![Cumulative share of the code weight](cumulative_share.png)",
        "",
        f"## The {len(indices)} most used codes",
        "",
        *top_code_lines(pipe, indices, shares),
        "",
        f"One row per code, in this order, {args.samples_per_code} samples each ({args.steps} NFE, seed {args.seed}):",
        "",
        "![Samples of the most used codes](top_codes.png)",
        "",
    ]
    (out_dir / "code_usage.md").write_text("\n".join(report), encoding="utf-8")
    print(f"Wrote code_usage.md, cumulative_share.png and top_codes.png to {out_dir}")


if __name__ == "__main__":
    main()
