# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Train a diffusion model with quantized adaptive conditions (QAC), or its unconditional baseline.

    accelerate launch train_qac.py --output_dir qac-digits                      # embedded digits, tiny preset
    accelerate launch train_qac.py --dataset_name user/data --preset cifar10 --mixed_precision bf16 ...
    accelerate launch train_qac.py --no_condition --output_dir baseline-digits  # the same UNet without codes
    accelerate launch train_qac.py --formulation rectified_flow --noise_encoder shared  # QAC + RNE (paper Table 5)

Modelled on diffusers' examples/unconditional_image_generation/train_unconditional.py (flags, hooks, checkpoints,
trackers) and NVlabs' EDM training loop (the loss, the EMA by half-life, the resolved config written as JSON).
Every random draw of a step is a function of (seed, step), so a resumed run repeats the uninterrupted one exactly and
a multi-process run sees the same global batches as a one-process run. The noise is drawn on the training device and
values are read back from it only at logged steps (`--logging_steps`), so a GPU is not made to wait for the host at
every step.
"""

import argparse
import faulthandler
import json
import logging
import os
import sys
import time
import warnings
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DynamoBackend, GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from qac_diffusers import FSQConditionEncoder, QACPipeline, QACUNet2DModel
from qac_diffusers.formulations import FORMULATIONS, formulation_from_name
from qac_diffusers.formulations.edm import EDM_P_MEAN, EDM_P_STD
from qac_diffusers.models import GaussianConditionEncoder, NoiseEncoder, encode_jointly
from qac_diffusers.models.fingerprint import model_fingerprint
from qac_diffusers.models.gaussian_condition_encoder import check_prior_weight
from qac_diffusers.models.noise_encoder import PAPER_BETA
from qac_diffusers.schedulers.schedule_fitting import (
    BOUNDED_DESCENT_BUDGET,
    DEFAULT_FIT_NFE,
    DEFAULT_SEARCH,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_VALIDATION_SAMPLES,
    SEARCHES,
    WARM_START_DESCENT_BUDGET,
    check_bounded_budget,
    check_fit_nfe,
    check_sample_counts,
    fit_schedules,
    fitted_scheduler_class,
)
from qac_diffusers.training import ImageTransform, infer_num_channels, load_image_dataset
from qac_diffusers.training.checkpoints import (
    CHECKPOINT_PREFIX,
    METRICS_NAME,
    TRACKER_PROJECT,
    check_output_dir,
    check_resumable,
    explained_write_failure,
    load_checkpoint,
    register_checkpoint_hooks,
    remove_previous_run,
    resolve_checkpoint,
    resume_config,
    save_checkpoint,
)
from qac_diffusers.training.code_usage import batch_code_usage, code_usage
from qac_diffusers.training.ema import ema_decay, update_ema
from qac_diffusers.training.hub import check_hub_access, push_to_hub, without_local_paths, write_model_card
from qac_diffusers.training.micro_batches import EpochImages, MicroBatchSampler
from qac_diffusers.training.presets import PRESETS, resolve_model_config
from qac_diffusers.utils import image_grid


logger = get_logger(__name__, log_level="INFO")

# Seconds a run of several processes gives the process group's teardown once everything is saved (see `end_training`).
TEARDOWN_TIMEOUT_SECONDS = 60

# Flags that name local files or folders: training_config.json and the model card show only their last component.
PATH_ARGS = ("output_dir", "train_data_dir", "cache_dir", "model_config", "logging_dir", "resume_from_checkpoint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (default: the embedded scikit-learn digits)")
    data.add_argument("--dataset_name", help="A Hub data set id, a local data set path, 'digits' or 'animal-mnist'.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_data_dir", help="A folder of images (datasets' imagefolder).")
    data.add_argument("--image_column", default="image")
    data.add_argument("--cache_dir")
    data.add_argument("--resolution", type=int, help="Image size; defaults to the preset's.")
    data.add_argument("--center_crop", action="store_true")
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    model.add_argument("--model_config", help="JSON file overriding the preset: resolution, code_dim, unet, encoder.")
    model.add_argument("--code_dim", type=int, help="d, bits of the code (L=2); defaults to the preset's.")
    model.add_argument("--code_levels", type=int, default=2, help="L, levels per code channel.")
    model.add_argument("--straight_through", choices=["sigmoid", "identity"], default="sigmoid")
    model.add_argument(
        "--formulation", choices=sorted(FORMULATIONS), default="edm",
        help="edm: EDM's noise levels, loss and preconditioning (the paper's section 4.3); rectified_flow: straight "
        "paths from N(0, I) to the data, the UNet predicts the velocity, t ~ U(1e-5, 1) (RNE's objective, the paper's "
        "sections 3-4.2), sampled with diffusers' FlowMatchEuler/Heun schedulers.",
    )
    model.add_argument(
        "--condition", choices=["fsq", "gaussian", "none"], default="fsq",
        help="The condition encoder: fsq (quantized codes, QAC), gaussian (a VAE-style condition drawn from N(0, I) "
        "at sampling, the paper's Table 3) or none (the unconditional baseline).",
    )
    model.add_argument(
        "--no_condition", action="store_const", dest="condition", const="none", help="The same as --condition none."
    )
    model.add_argument("--kl_weight", type=float, help="--condition gaussian: the weight of its KL term (default 1).")
    model.add_argument(
        "--noise_encoder", choices=["none", "own", "shared"], default="none",
        help="RNE's noise encoder q(z | x), which couples each image with its noise (the paper's Tables 1 and 5): own "
        "(its own backbone) or shared (a second head on the condition encoder's backbone, the paper's section 4.2).",
    )
    model.add_argument(
        "--beta", type=float, help=f"--noise_encoder: the weight of its KL term (default {PAPER_BETA:g}, the paper's)."
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="qac-model")
    train.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="Remove another run's checkpoints, logs and pipeline from --output_dir, then start anew (without it, a "
        "used folder is refused). Never deletes the checkpoint being resumed.",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=128, help="Per device.")
    train.add_argument("--max_train_steps", type=int, default=3000, help="Optimizer steps.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=2e-3)
    train.add_argument("--lr_scheduler", default="constant_with_warmup", help="Any of diffusers.optimization's.")
    train.add_argument("--lr_warmup_steps", type=int, default=100, help="Learning-rate ramp-up.")
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--P_mean", type=float, help=f"EDM: the mean of ln(sigma) in training (default {EDM_P_MEAN}).")
    train.add_argument("--P_std", type=float, help=f"EDM: the std of ln(sigma) in training (default {EDM_P_STD}).")
    train.add_argument("--ema_halflife_kimg", type=float, default=500.0)
    train.add_argument("--ema_rampup_ratio", type=float, default=0.05, help="Negative: no ramp-up.")
    train.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"],
        help="Defaults to accelerate's config. fp16 needs a GPU (refused on the CPU); bf16 also works on the CPU.",
    )
    train.add_argument("--allow_tf32", action="store_true")

    speed = parser.add_argument_group(
        "speed (GPU)",
        "They change how a step runs, not what it computes (up to rounding). On CUDA the Adam optimizer always uses "
        "its fused kernel (fused=True); elsewhere it stays torch's default, so CPU runs are unchanged.",
    )
    speed.add_argument(
        "--channels_last", action="store_true",
        help="Keep the UNet's and the encoder's convolution weights in channels-last memory format (faster "
        "convolutions on recent GPUs). The saved weights are the same.",
    )
    speed.add_argument(
        "--torch_compile", nargs="?", const="inductor", metavar="BACKEND",
        help="Compile the UNet with torch.compile (the encoder and the EMA copies stay eager). BACKEND defaults to "
        "inductor; aot_eager and eager check that a model compiles without generating code. The first step then "
        "takes minutes. Launch with accelerate's --dynamo_backend no (train_qac.py compiles the UNet itself).",
    )

    logs = parser.add_argument_group("logging, checkpoints, Hub")
    logs.add_argument("--report_to", default="tensorboard", help="An accelerate tracker, or 'none'.")
    logs.add_argument("--logging_dir", default="logs")
    logs.add_argument(
        "--logging_steps", type=int, default=1,
        help="Log loss, learning rate, code statistics and images/s every N steps (and at every checkpoint and the "
        "last step). Only then are values read from the device: on a GPU, N > 1 (e.g. 50) lets the host queue the "
        "next steps instead of waiting for each one. images/s is then the mean over the N steps.",
    )
    logs.add_argument("--validation_steps", type=int, default=500, help="Sample a grid every N steps.")
    logs.add_argument("--num_validation_images", type=int, default=64)
    logs.add_argument("--validation_nfe", type=int, default=6)
    logs.add_argument(
        "--fit_schedule_nfe", type=int, nargs="*", default=list(DEFAULT_FIT_NFE),
        help="After training, fit the sampling schedule to the model at these NFE (pipelines/fit_schedule.py); "
        "pass the flag without values to keep the formula schedule (EDM: Karras; rectified flow: RNE's uniform grid).",
    )
    logs.add_argument(
        "--fit_schedule_search", choices=SEARCHES, default=DEFAULT_SEARCH,
        help="bounded: the descent by the smallest log step from the closest of a few formula schedules and the fit "
        f"for one NFE fewer stretched to one more point, stopped after {BOUNDED_DESCENT_BUDGET} / NFE moves "
        f"({WARM_START_DESCENT_BUDGET} after the warm start); descent: the "
        "descent from the formulas to its end and a second one from the fit for one call fewer, 3-4x the model calls, "
        "closer to the teacher (README, Fitted schedules).",
    )
    logs.add_argument(
        "--fit_schedule_bounded_budget", type=int, default=BOUNDED_DESCENT_BUDGET,
        help="The bounded search's moves times the NFE (after the warm start 40 / 52 of it): more moves let the "
        "descent go further, for more model calls (twice the default: 1.15-1.2x the fit's images; README, Fitted "
        "schedules).",
    )
    logs.add_argument(
        "--fit_schedule_samples", type=int, default=DEFAULT_SEARCH_SAMPLES,
        help="Noise draws the search compares candidate schedules on: more cost more and make the choice less noisy.",
    )
    logs.add_argument(
        "--fit_schedule_validation_samples", type=int, default=DEFAULT_VALIDATION_SAMPLES,
        help="Fresh noise draws on which each fitted schedule must beat the formula schedule again to be kept.",
    )
    logs.add_argument("--checkpointing_steps", type=int, default=1000)
    logs.add_argument("--checkpoints_total_limit", type=int)
    logs.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder.")
    logs.add_argument(
        "--push_to_hub", action="store_true",
        help="Upload the pipeline, card and samples at the end. Checked before the first step: a token with write "
        "access (from `hf auth login` or HF_TOKEN), the Hub reachable, the repo created or writable.",
    )
    logs.add_argument("--hub_model_id", help="Defaults to the output folder's name.")
    logs.add_argument(
        "--hub_token",
        help="Avoid: a token on the command line shows in process lists and in accelerate's error output when the "
        "script fails. Log in with `hf auth login` or set HF_TOKEN instead.",
    )
    logs.add_argument("--hub_private_repo", action="store_true")
    logs.add_argument(
        "--dry_run", action="store_true",
        help="Resolve and check everything, then stop. With --push_to_hub it checks the Hub access too (and creates "
        "the repo if needed, as a real run does before its first step).",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or impossible flags before anything is loaded."""
    if args.dataset_name and args.train_data_dir:
        raise ValueError("Give --dataset_name or --train_data_dir, not both.")
    quantizer_flags = args.code_dim is not None or args.straight_through != "sigmoid" or args.code_levels != 2
    if args.condition == "none" and quantizer_flags:
        raise ValueError(
            "--no_condition trains without codes (--condition none): drop --code_dim, --code_levels and "
            "--straight_through."
        )
    if args.condition == "gaussian" and (args.straight_through != "sigmoid" or args.code_levels != 2):
        raise ValueError("--code_levels and --straight_through are the FSQ quantizer's: drop them with --condition "
                         "gaussian (its conditions are continuous).")
    if args.kl_weight is not None:
        if args.condition != "gaussian":
            raise ValueError("--kl_weight weighs the Gaussian condition encoder's KL term: add --condition gaussian.")
        check_prior_weight("kl_weight", args.kl_weight, "Pass --kl_weight 0 for no prior term.")
    if args.beta is not None:
        if args.noise_encoder == "none":
            raise ValueError("--beta weighs the noise encoder's KL term: add --noise_encoder own (or shared).")
        check_prior_weight("beta", args.beta, f"RNE's paper uses --beta {PAPER_BETA:g}.")
    if args.noise_encoder == "shared" and args.condition == "none":
        raise ValueError(
            "--noise_encoder shared puts the noise head on the condition encoder's backbone, and --condition none "
            "has none: use --noise_encoder own, or --condition fsq (or gaussian)."
        )
    if args.formulation != "edm" and (args.P_mean is not None or args.P_std is not None):
        raise ValueError(
            f"--P_mean and --P_std set EDM's training noise levels; --formulation {args.formulation} draws its own "
            "(t ~ U(1e-5, 1)): drop them, or train with --formulation edm."
        )
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "validation_steps",
                 "checkpointing_steps", "num_validation_images", "validation_nfe", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    check_sample_counts({f"--{name}": getattr(args, name)
                         for name in ("fit_schedule_samples", "fit_schedule_validation_samples")})
    check_bounded_budget(args.fit_schedule_bounded_budget, "--fit_schedule_bounded_budget")
    if args.fit_schedule_nfe:
        check_fit_nfe(args.fit_schedule_nfe)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("--hub_token with --report_to=wandb would expose the token: use `hf auth login` instead.")
    if (args.hub_model_id or args.hub_token or args.hub_private_repo) and not args.push_to_hub:
        raise ValueError("--hub_model_id, --hub_token and --hub_private_repo need --push_to_hub.")
    if args.torch_compile is not None:
        check_compile_backend(args.torch_compile)
    if args.hub_token is not None:
        # Refusing would not help: the token is already in the process list, and under `accelerate launch` a
        # failing script makes accelerate print the whole command line, token included.
        warnings.warn(
            "--hub_token shows in process lists (ps) and, if the script fails under `accelerate launch`, in the "
            "command line that accelerate prints. Log in with `hf auth login` or set HF_TOKEN instead.",
            stacklevel=2,
        )


def check_compile_backend(backend: str) -> None:
    """Refuse a --torch_compile backend that torch.compile does not know (before the first step, not at it)."""
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ValueError(
            f"--torch_compile {backend}: torch.compile has no such backend. Use one of {', '.join(backends)} "
            "(inductor, the default, generates fast kernels; aot_eager and eager only check that the model compiles)."
        )


def check_accelerate_compile(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Refuse --torch_compile when accelerate compiles the models too (`accelerate launch --dynamo_backend`)."""
    backend = accelerator.state.dynamo_plugin.backend
    if args.torch_compile is not None and backend != DynamoBackend.NO:
        raise ValueError(
            f"--torch_compile compiles the UNet, and accelerate's dynamo_backend ({backend.value.lower()}, from "
            "`accelerate launch --dynamo_backend` or accelerate's config) would compile every model again: launch "
            "with --dynamo_backend no, or drop --torch_compile."
        )


def check_mixed_precision(accelerator: Accelerator) -> None:
    """Refuse fp16 on the CPU, where accelerate applies no autocast and would train in fp32 without a word."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "fp16 mixed precision (--mixed_precision or accelerate's config) does not run on the CPU: accelerate "
            "would train in fp32. Use --mixed_precision bf16 (bfloat16 autocast works on the CPU) or no."
        )


def use_all_cpu_cores(accelerator: Accelerator) -> None:
    """Give each process of a CPU run its share of the cores when `accelerate launch` left it a single thread.

    Unless given --cpu or OMP_NUM_THREADS, `accelerate launch` sets OMP_NUM_THREADS to 1 in the processes it starts
    (`--num_cpu_threads_per_process` defaults to $OMP_NUM_THREADS or 1: accelerate/commands/launch.py,
    utils/launch.py), which suits GPU processes and leaves all cores but one idle in CPU training. A single thread
    taken on purpose is kept with `taskset`: the share counts the cores this process may run on.
    """
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by every `accelerate launch`
    if accelerator.device.type != "cpu" or not launched or os.environ.get("OMP_NUM_THREADS") != "1":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if threads > 1:
        torch.set_num_threads(threads)
        logger.info(f"CPU training: {threads} threads per process (accelerate launch had set OMP_NUM_THREADS=1)")


def hub_repo_id(args: argparse.Namespace, accelerator: Accelerator) -> str:
    """The repo id the card names. With --push_to_hub, the full Hub id, checked now (token, reachable, writable):
    a run that could not be pushed fails before its first step, not after its last."""
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    if args.push_to_hub and accelerator.is_main_process:
        return check_hub_access(repo_id, args.hub_token, args.hub_private_repo)
    return repo_id


def build_models(args: argparse.Namespace, model_config: dict, channels: int):
    """
    The QAC UNet (code_dim 0 for the baseline), its condition encoder (None for the baseline) and the noise encoder
    (None without --noise_encoder).
    """
    resolution = model_config["resolution"]
    levels = len(model_config["unet"]["block_out_channels"])
    if resolution % 2 ** (levels - 1):
        raise ValueError(
            f"--resolution {resolution} cannot go through the UNet's {levels} levels: it must be divisible by "
            f"{2 ** (levels - 1)}."
        )
    code_dim = 0 if args.condition == "none" else model_config["code_dim"]
    unet = QACUNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, **model_config["unet"],
        code_dim=code_dim, code_levels=args.code_levels,
    )
    encoder = None
    if args.condition == "fsq":
        encoder = FSQConditionEncoder.for_unet(
            unet, code_dim=code_dim, code_levels=args.code_levels, straight_through=args.straight_through,
            **model_config["encoder"],
        )
    elif args.condition == "gaussian":
        kl_weight = 1.0 if args.kl_weight is None else args.kl_weight
        encoder = GaussianConditionEncoder.for_unet(unet, code_dim=code_dim, kl_weight=kl_weight,
                                                    **model_config["encoder"])
    beta = PAPER_BETA if args.beta is None else args.beta
    noise_encoder = None
    if args.noise_encoder == "own":
        noise_encoder = NoiseEncoder.for_unet(unet, beta=beta, **model_config["encoder"])
    elif args.noise_encoder == "shared":
        noise_encoder = NoiseEncoder.for_encoder(encoder, beta=beta)
    return unet, encoder, noise_encoder


def resolve_edm_levels(args: argparse.Namespace) -> None:
    """EDM's --P_mean / --P_std defaults filled in, so that training_config.json shows the levels trained with."""
    if args.formulation == "edm":
        args.P_mean = EDM_P_MEAN if args.P_mean is None else args.P_mean
        args.P_std = EDM_P_STD if args.P_std is None else args.P_std


def build_formulation(args: argparse.Namespace):
    """The formulation of --formulation around its default scheduler; EDM with --P_mean / --P_std."""
    edm_levels = {"P_mean": args.P_mean, "P_std": args.P_std}
    kwargs = {key: value for key, value in edm_levels.items() if value is not None}  # None unless EDM (check_args)
    return formulation_from_name(args.formulation, **kwargs)


def has_codebook(encoder) -> bool:
    """Whether a condition encoder has code indices and code weights (FSQ), unlike a Gaussian one (or none)."""
    return encoder is not None and "code_levels" in encoder.config


def step_generator(seed: int, step: int, micro_step: int, device: torch.device) -> torch.Generator:
    """
    The random source of one micro-batch, on `device`: a pure function of (seed, step, micro-step). It draws on the
    device itself (no copy from the host at every step); a CUDA generator draws other numbers than the CPU one from the
    same seed, so a GPU run repeats GPU runs (resumed or with more processes), not CPU runs.
    """
    state = np.random.SeedSequence([seed, step, micro_step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def process_slice(tensor: torch.Tensor, accelerator: Accelerator, batch: int) -> torch.Tensor:
    """This process's rows of a tensor drawn for the whole global micro-batch."""
    start = accelerator.process_index * batch
    return tensor[start : start + batch]


class Trainer:
    """The training state and loop: models, EMA copies, optimizer, data, checkpoints."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator, model_config: dict, dataset, channels: int):
        self.args = args
        self.accelerator = accelerator
        self.output_dir = Path(args.output_dir)
        self.global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        if len(dataset) < self.global_batch:
            raise ValueError(
                f"The data set ({len(dataset)} images) is smaller than one global batch: --train_batch_size "
                f"{args.train_batch_size} x {accelerator.num_processes} processes x --gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps} = {self.global_batch} images. Lower --train_batch_size or "
                "--gradient_accumulation_steps."
            )
        transform = ImageTransform(
            model_config["resolution"], channels, args.center_crop, args.random_flip, seed=args.seed,
            image_column=args.image_column,
        )
        self.images = EpochImages(dataset, transform)
        unet, encoder, noise_encoder = build_models(args, model_config, channels)
        if args.noise_encoder == "shared" and accelerator.num_processes > 1:
            raise ValueError(
                "--noise_encoder shared runs the condition encoder's backbone outside its DistributedDataParallel "
                "wrapper, which one process does not need: train it in one process, or use --noise_encoder own."
            )
        # The EMA copies only sample (validation grids, samples.png) and are saved: eval mode, so without dropout.
        # The noise encoder has none: sampling draws z ~ N(0, I), and the checkpoints hold its training weights.
        self.ema_unet = deepcopy(unet).requires_grad_(False).eval()
        self.ema_encoder = None if encoder is None else deepcopy(encoder).requires_grad_(False).eval()
        self.formulation = build_formulation(args)
        named = {"unet": unet, "encoder": encoder, "noise_encoder": noise_encoder}
        self.model_names = [name for name, model in named.items() if model is not None]
        self.models = [named[name] for name in self.model_names]
        if args.channels_last:  # the EMA copies, copied before, keep the default format: they are saved and sample
            for model in self.models:
                model.to(memory_format=torch.channels_last)
        if args.torch_compile is not None:
            # In place (nn.Module.compile): the module, its state dict and so the checkpoints stay as they are.
            unet.compile(backend=args.torch_compile)
        parameters = [p for model in self.models for p in model.parameters()]
        # torch's fused Adam kernel: one launch per step instead of several per parameter group, on CUDA, where it is
        # the same algorithm; elsewhere (the CPU) the default implementation, so CPU runs are unchanged.
        optimizer = torch.optim.Adam(
            parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.adam_weight_decay, fused=True if accelerator.device.type == "cuda" else None,
        )
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=args.max_train_steps * accelerator.num_processes,
        )
        *self.models, self.optimizer, self.lr_scheduler = accelerator.prepare(*self.models, optimizer, lr_scheduler)
        self.ema_unet.to(accelerator.device)
        if self.ema_encoder is not None:
            self.ema_encoder.to(accelerator.device)
        register_checkpoint_hooks(accelerator, self.ema_unet, self.ema_encoder)
        self.resume_config = resume_config(
            vars(args), model_config, {"images": len(dataset), "channels": channels},
            {"num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision},
        )
        self.global_step = 0
        self.trained_steps = 0  # the steps this run trained (none when it resumed at the last step)
        self.saved_step = None  # the step of the newest checkpoint in output_dir, written or resumed from
        self.last_facts = None  # what `log` recorded at the last step
        self.metrics_file = self.output_dir / args.logging_dir / METRICS_NAME

    def _model(self, name: str):
        return self.models[self.model_names.index(name)] if name in self.model_names else None

    @property
    def unet(self):
        return self._model("unet")

    @property
    def encoder(self):
        return self._model("encoder")

    @property
    def noise_encoder(self):
        return self._model("noise_encoder")

    # ----- checkpoints (qac_diffusers/training/checkpoints.py) ---------------------------------------------------
    def save_checkpoint(self) -> None:
        training_state = {"resume_config": self.resume_config, "last_step": self.last_facts}
        final = save_checkpoint(
            self.accelerator, self.output_dir, self.global_step, training_state, self.args.checkpoints_total_limit
        )
        self.saved_step = self.global_step
        logger.info(f"Saved {final}")

    def resume(self, checkpoint: Path) -> None:
        self.last_facts = load_checkpoint(self.accelerator, checkpoint, self.metrics_file)["last_step"]
        self.global_step = self.last_facts["step"]
        if checkpoint.resolve().parent == self.output_dir.resolve():
            self.saved_step = self.global_step
        logger.info(f"Resumed from {checkpoint} at step {self.global_step}")

    # ----- training ----------------------------------------------------------------------------------------------
    def micro_batch_loss(self, images: torch.Tensor, micro_step: int):
        """
        The loss of one micro-batch (the formulation's, plus the encoders' KL terms), and its code indices and
        pre-quantized codes gathered over all processes (None without an FSQ encoder).
        """
        accelerator = self.accelerator
        global_shape = (images.shape[0] * accelerator.num_processes, *images.shape[1:])
        generator = step_generator(self.args.seed, self.global_step, micro_step, accelerator.device)
        levels, noise = self.formulation.sample_noise(global_shape, generator)
        levels, noise = (process_slice(t, accelerator, images.shape[0]) for t in (levels, noise))
        encoded, coupled = self.encode(images, noise, generator)
        code, indices, pre_quantized = None, None, None
        if encoded is not None:
            code = encoded.codes
        if has_codebook(self.ema_encoder):
            indices = accelerator.gather(encoded.indices)
            pre_quantized = accelerator.gather(encoded.pre_quantized.detach())
        if coupled is not None:  # RNE: the noise coupled with each image, z = mean + std * n
            noise = coupled.noise
        loss = self.formulation.loss(self.unet, images, levels, noise, code=code)
        for output in (encoded, coupled):
            if output is not None and "prior_loss" in output:
                loss = loss + output.prior_loss
        return loss, indices, pre_quantized

    def encode(self, images: torch.Tensor, noise: torch.Tensor, generator: torch.Generator):
        """
        The condition encoder's and the noise encoder's outputs on a micro-batch (`None` for a missing one). The unit
        noise of a Gaussian condition is drawn after the formulation's draws, for the global batch (as they are), so
        the other runs draw what they drew before; the noise encoder reparameterizes the formulation's `noise`.
        """
        code_kwargs = {}
        if isinstance(self.ema_encoder, GaussianConditionEncoder):
            global_shape = (images.shape[0] * self.accelerator.num_processes, self.ema_encoder.config.code_dim)
            unit = torch.randn(global_shape, generator=generator, device=generator.device)
            code_kwargs = {"sample_posterior": True, "noise": process_slice(unit, self.accelerator, images.shape[0])}
        if self.args.noise_encoder == "shared":
            unwrap = self.accelerator.unwrap_model
            return encode_jointly(unwrap(self.encoder), unwrap(self.noise_encoder), images, noise=noise,
                                  code_head_kwargs=code_kwargs)
        encoded = None if self.encoder is None else self.encoder(images, **code_kwargs)
        coupled = None if self.noise_encoder is None else self.noise_encoder(images, noise=noise)
        return encoded, coupled

    def optimizer_step_done(self, indices: list[torch.Tensor]) -> float:
        """After an optimizer step: the parameter EMA and the code weights, with one decay mu."""
        cur_nimg = self.global_step * self.global_batch
        rampup = self.args.ema_rampup_ratio if self.args.ema_rampup_ratio >= 0 else None
        decay = ema_decay(cur_nimg, self.global_batch, self.args.ema_halflife_kimg, rampup)
        update_ema(self.ema_unet, self.accelerator.unwrap_model(self.unet), decay)
        if self.ema_encoder is not None:
            update_ema(self.ema_encoder, self.accelerator.unwrap_model(self.encoder), decay)
        if indices:
            self.ema_encoder.update_code_weights(torch.cat(indices), decay, check_indices=False)
        return decay

    def is_logged_step(self) -> bool:
        """Whether the step just trained is logged: every `--logging_steps`, at checkpoints and at the last step."""
        args, step = self.args, self.global_step
        return step % args.logging_steps == 0 or step % args.checkpointing_steps == 0 or step == args.max_train_steps

    def train(self, checkpoint: Path | None) -> None:
        args, accelerator = self.args, self.accelerator
        if checkpoint is not None:
            self.resume(checkpoint)
        # The stream of micro-batches starts at this step's first one (qac_diffusers/training/micro_batches.py).
        sampler = MicroBatchSampler(
            len(self.images), args.train_batch_size, accelerator.num_processes, accelerator.process_index, args.seed,
            start=self.global_step * args.gradient_accumulation_steps,
        )
        # Pinned host memory lets the images travel to a GPU while it still computes the previous step.
        loader = torch.utils.data.DataLoader(
            self.images, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        micro_batches = iter(loader)
        progress = tqdm(range(args.max_train_steps), initial=self.global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        window_steps, window_seconds = 0, 0.0  # the steps trained since the last logged one, and their time
        while self.global_step < args.max_train_steps:
            started = time.perf_counter()
            step = self.train_step(micro_batches)
            window_steps += 1
            if self.is_logged_step():
                facts = self.last_facts = self.step_facts(step, window_steps, window_seconds, started)
                self.log(facts)
                progress.set_postfix(loss=f"{facts['loss']:.4f}", img_s=f"{facts['images_per_second']:.0f}")
                window_steps, window_seconds = 0, 0.0
            else:
                window_seconds += time.perf_counter() - started
            progress.update(1)
            self.trained_steps += 1
            if self.global_step % args.checkpointing_steps == 0:
                self.save_checkpoint()
            if self.global_step % args.validation_steps == 0:
                self.validate()
        progress.close()
        if self.global_step != self.saved_step:  # the end of training is always resumable
            self.save_checkpoint()

    def train_step(self, micro_batches) -> dict:
        """
        One optimizer step on the next `--gradient_accumulation_steps` micro-batches: one full global batch. Returns
        what [`step_facts`] reads if the step is logged, as tensors on the device: nothing here waits for the device.
        """
        args, accelerator = self.args, self.accelerator
        indices, losses, pre_quantized = [], [], None
        for micro_step in range(args.gradient_accumulation_steps):
            images = next(micro_batches).to(accelerator.device, non_blocking=True)
            # Synchronises (and steps the optimizer) at every k-th micro-batch, counting them: never at a data end.
            with accelerator.accumulate(*self.models):
                loss, batch_indices, pre_quantized = self.micro_batch_loss(images, micro_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for m in self.models for p in m.parameters()], args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.gather(loss.detach()).mean())
            if batch_indices is not None:
                indices.append(batch_indices)
        self.global_step += 1
        decay = self.optimizer_step_done(indices)
        return {"losses": losses, "indices": indices, "pre_quantized": pre_quantized, "ema_decay": decay}

    def step_facts(self, step: dict, window_steps: int, window_seconds: float, started: float) -> dict:
        """
        The logged facts of the step just trained: the only place the training loop reads values from the device.
        The code statistics are those of its last micro-batch; images/s is over the `window_steps` steps trained since
        the last logged one (`window_seconds` before this step, which began at `started`).
        """
        losses = torch.stack(step["losses"]).tolist()  # waits for the device to finish the step
        stats = {} if step["pre_quantized"] is None else batch_code_usage(step["indices"][-1], step["pre_quantized"])
        seconds = window_seconds + time.perf_counter() - started
        return {
            "step": self.global_step,
            "loss": float(np.mean(losses)),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "kimg": self.global_step * self.global_batch / 1000,
            "ema_decay": step["ema_decay"],
            "images_per_second": window_steps * self.global_batch / seconds,
            **stats,
        }

    # ----- logging and outputs -----------------------------------------------------------------------------------
    def log(self, facts: dict) -> None:
        self.accelerator.log(facts, step=self.global_step)
        if self.accelerator.is_main_process:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_file, "a", encoding="utf-8") as file:
                file.write(json.dumps(facts) + "\n")

    def pipeline(self) -> QACPipeline:
        pipeline = QACPipeline(
            unet=self.ema_unet, scheduler=self.formulation.scheduler, encoder=self.ema_encoder,
            formulation=self.args.formulation,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def sample_grid(self, pipeline: QACPipeline | None = None):
        """
        A grid of validation samples from `pipeline`, by default that of the EMA models (fixed seed,
        `--validation_nfe` UNet calls).
        """
        generator = torch.Generator(self.accelerator.device).manual_seed(self.args.seed)
        images = (pipeline or self.pipeline())(
            batch_size=self.args.num_validation_images, num_inference_steps=self.args.validation_nfe,
            generator=generator, output_type="pil",
        ).images
        return image_grid(images, tile_size=max(32, images[0].width))

    def validate(self) -> None:
        if not self.accelerator.is_main_process:
            return
        grid = self.sample_grid()
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{self.global_step:07d}.png")
        usage = code_usage(self.ema_encoder.code_weights) if has_codebook(self.ema_encoder) else {}
        self.accelerator.log({f"code_weights/{key}": value for key, value in usage.items()}, step=self.global_step)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                array = np.asarray(grid.convert("RGB"))
                tracker.writer.add_images("validation", array[None], self.global_step, dataformats="NHWC")

    def processes_in_sync(self) -> bool:
        """Whether every process holds the same parameters (a checksum of each process's models, compared)."""
        models = [self.ema_unet, *map(self.accelerator.unwrap_model, self.models)]
        vector = torch.cat([p.detach().double().flatten() for model in models for p in model.parameters()])
        positions = torch.linspace(1.0, 2.0, vector.numel(), dtype=torch.float64, device=vector.device)
        checksum = torch.stack([vector.sum(), (vector * positions).sum()]).reshape(1, 2)
        checksums = self.accelerator.gather(checksum)
        return bool((checksums == checksums[0]).all())

    def fit_sampling_schedules(self, pipeline: QACPipeline, training_seconds: float) -> dict | None:
        """
        Fit the pipeline's sampling schedules at `--fit_schedule_nfe` (its scheduler is replaced); returns what the
        fit cost, beside the training time of this run, for training_summary.json. A run that resumed a finished one
        (same weights, same fit settings) keeps the schedules that run fitted instead of fitting them again.
        """
        if not self.args.fit_schedule_nfe:
            return None
        settings = {"nfe": sorted(self.args.fit_schedule_nfe), "search": self.args.fit_schedule_search,
                    "bounded_budget": self.args.fit_schedule_bounded_budget, "samples": self.args.fit_schedule_samples,
                    "validation_samples": self.args.fit_schedule_validation_samples, "seed": self.args.seed}
        fingerprint = model_fingerprint(pipeline.unet, pipeline.encoder)
        previous = self.previous_schedule_fit()
        if previous.get("settings") == settings and previous.get("model_fingerprint") == fingerprint:
            scheduler_class = fitted_scheduler_class(pipeline.scheduler)
            pipeline.scheduler = scheduler_class.from_pretrained(self.output_dir / "scheduler")
            print(f"Kept the sampling schedules fitted to these weights by the previous run (NFE {previous['nfe']}).")
            return previous
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.args.seed)
        fit = fit_schedules(
            pipeline, self.args.fit_schedule_nfe, num_samples=self.args.fit_schedule_samples, generator=generator,
            search=self.args.fit_schedule_search, num_validation_samples=self.args.fit_schedule_validation_samples,
            bounded_budget=self.args.fit_schedule_bounded_budget,
        )
        pipeline.scheduler = fit.scheduler
        seconds = time.perf_counter() - started
        kept = pipeline.scheduler.fitted_num_inference_steps
        share = (f"{seconds / training_seconds:.1%} of this run's {training_seconds:.1f} s of training"
                 if self.trained_steps else "this run resumed at the last step and trained nothing")
        print(f"Fitted the sampling schedules at NFE {sorted(fit.fitted_distances)} in {seconds:.1f} s ({share}); "
              f"kept at NFE {kept}, where they are closer to the teacher than the formula on fresh noise as well.")
        return {"nfe": kept, "seconds": seconds, "training_seconds": training_seconds, "settings": settings,
                "model_fingerprint": fingerprint,
                "formula_distances": fit.formula_distances, "fitted_distances": fit.fitted_distances,
                "validation_formula_distances": fit.validation_formula_distances,
                "validation_fitted_distances": fit.validation_fitted_distances}

    def previous_schedule_fit(self) -> dict:
        """The schedule fit recorded in output_dir's training_summary.json by an earlier run ({} if none)."""
        path = self.output_dir / "training_summary.json"
        return (json.loads(path.read_text()).get("schedule_fit") or {}) if path.is_file() else {}

    def save_final(self, dataset_name: str, training_config: dict, repo_id: str, training_seconds: float) -> None:
        """
        The EMA pipeline (its sampling schedules fitted), a sample grid and the model card in output_dir; pushed to the
        Hub when asked.
        """
        in_sync = self.processes_in_sync()
        if not in_sync:
            logger.warning("The processes hold different parameters: the distributed setup is broken.")
        if not self.accelerator.is_main_process:
            return
        args = self.args
        # The facts of the step these weights come from (kept in the checkpoint when a resumed run trained nothing)
        facts = {**self.last_facts, "processes_in_sync": in_sync}
        usage = code_usage(self.ema_encoder.code_weights) if has_codebook(self.ema_encoder) else None
        last_checkpoint = self.output_dir / f"{CHECKPOINT_PREFIX}{self.saved_step}"
        pipeline = self.pipeline()
        schedule_fit = self.fit_sampling_schedules(pipeline, training_seconds)
        with explained_write_failure("the final pipeline", self.output_dir, last_checkpoint, remove=False):
            pipeline.save_pretrained(self.output_dir)
            self.sample_grid(pipeline).save(self.output_dir / "samples.png")
            summary = {"training_facts": facts, "code_usage": usage, "schedule_fit": schedule_fit}
            (self.output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        card_facts = {"steps": facts["step"], "images_seen": facts["step"] * self.global_batch,
                      "final_loss": facts["loss"], "processes_in_sync": facts["processes_in_sync"]}
        write_model_card(
            self.output_dir, repo_id=repo_id, dataset_name=dataset_name, training_config=training_config,
            code_usage=usage, training_facts=card_facts, is_baseline=self.ema_encoder is None,
            has_codebook=self.ema_encoder is None or has_codebook(self.ema_encoder),
        )
        print(f"Saved the pipeline, samples.png and README.md in {self.output_dir}")
        if usage is not None:
            print("Code usage: " + ", ".join(f"{key} {value:.4g}" for key, value in usage.items()))
        if args.push_to_hub:
            try:
                push_to_hub(self.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
            except Exception as error:  # the Hub or the network failed after training: say that nothing is lost
                raise RuntimeError(
                    f"Uploading to {repo_id} failed ({type(error).__name__}: {error}). {self.output_dir} holds the "
                    "trained pipeline and its card; push them again with `from qac_diffusers.training.hub import "
                    f"push_to_hub; push_to_hub({str(self.output_dir)!r}, {repo_id!r})`."
                ) from error
            print(f"Pushed to the Hub repo {repo_id}")


def end_training(accelerator: Accelerator) -> None:
    """
    Stop the trackers and destroy the process group once every process has arrived here (the main one after saving).

    A run of several processes then leaves at once through `os._exit(0)`, its output flushed: the teardown of a gloo
    process group can hang a process whose work is done, in `destroy_process_group` (pytorch/pytorch#75097) or at
    interpreter exit, and the launcher then waits for it forever (seen once in `.ci/run` after a two-process run had
    written all its files). A teardown still running after `TEARDOWN_TIMEOUT_SECONDS` is ended by `faulthandler`,
    which prints where each thread stood and exits with status 1.
    """
    # end_training destroys the process group: the other processes wait here until the main one has saved
    accelerator.wait_for_everyone()
    if accelerator.num_processes == 1:
        accelerator.end_training()
        return
    faulthandler.dump_traceback_later(TEARDOWN_TIMEOUT_SECONDS, exit=True)
    accelerator.end_training()
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    resolve_edm_levels(args)
    model_config = resolve_model_config(args.preset, args.model_config)
    if args.resolution is not None:
        model_config["resolution"] = args.resolution
    if args.code_dim is not None:
        model_config["code_dim"] = args.code_dim
    output_dir = Path(args.output_dir)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    previous_run = check_output_dir(output_dir, output_dir / args.logging_dir, checkpoint, args.overwrite_output_dir)
    dataset = load_image_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column, args.cache_dir
    )
    channels = infer_num_channels(dataset, args.image_column)

    accelerator = Accelerator(
        # Accumulation counts micro-batches only: the training loop never ends a step at an end of data.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    check_mixed_precision(accelerator)
    check_accelerate_compile(args, accelerator)
    use_all_cpu_cores(accelerator)
    repo_id = hub_repo_id(args, accelerator)

    trainer = Trainer(args, accelerator, model_config, dataset, channels)
    if checkpoint is not None:
        check_resumable(checkpoint, trainer.resume_config, args.max_train_steps)
    public_args = {key: value for key, value in vars(args).items() if key != "hub_token"}  # never write the token
    local_dataset = args.dataset_name is not None and os.path.isdir(args.dataset_name)
    noise_encoder = trainer.noise_encoder  # counted by hand: it may be wrapped by DistributedDataParallel
    noise_encoder_parameters = 0 if noise_encoder is None else sum(p.numel() for p in noise_encoder.parameters())
    # One public form, written to training_config.json and shown in the card: no token, no path of this machine.
    training_config = without_local_paths({
        "args": public_args,
        "model": model_config,
        "data": {"images": len(dataset), "channels": channels},
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "global_batch": trainer.global_batch,
        "parameters": {"unet": trainer.ema_unet.num_parameters(),
                       "encoder": 0 if trainer.ema_encoder is None else trainer.ema_encoder.num_parameters(),
                       "noise_encoder": noise_encoder_parameters},
    }, path_keys=PATH_ARGS + (("dataset_name",) if local_dataset else ()))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_config.json").write_text(json.dumps(training_config, indent=2, default=str))
        print(json.dumps(training_config, indent=2, default=str))
    if args.dry_run:
        print(f"Dry run: configuration checked and written to {output_dir / 'training_config.json'}.")
        if previous_run:
            print("--overwrite_output_dir would remove: " + ", ".join(str(path) for path in previous_run))
        return
    if accelerator.is_main_process:  # --overwrite_output_dir, now that every check has passed
        remove_previous_run(previous_run)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and args.report_to != "none":
        # Trackers take scalars and strings only (TensorBoard's hparams refuses lists such as --fit_schedule_nfe)
        tracker_config = {
            key: " ".join(map(str, value)) if isinstance(value, list) else value
            for key, value in training_config["args"].items()
            if value is not None
        }
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_config)

    started = time.perf_counter()
    trainer.train(checkpoint)
    training_seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    dataset_name = args.dataset_name or args.train_data_dir or "digits"
    trainer.save_final(dataset_name, training_config, repo_id, training_seconds)
    end_training(accelerator)


if __name__ == "__main__":
    main()
