# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Few-step unconditional sampling with quantized adaptive conditions (DESIGN.md section 6)."""

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME, BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from ...formulations import Formulation, formulation_from_name
from ...models import FSQConditionEncoder, GaussianConditionEncoder, QACUNet2DModel
from ...models.fingerprint import model_fingerprint


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from qac_diffusers import QACPipeline

        >>> pipe = QACPipeline.from_pretrained("path/or/user-repo")  # a folder written by train_qac.py, or a Hub id
        >>> output = pipe(batch_size=16, num_inference_steps=6, generator=torch.Generator().manual_seed(0))
        >>> output.images[0].save("sample.png")
        >>> output.code_indices  # the code each image was conditioned on
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class QACPipelineOutput(BaseOutput):
    """
    Output of [`QACPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(batch, height, width, channels)` or `torch.Tensor` of
            shape `(batch, channels, height, width)`): The generated images, in [0, 1] for `"np"` and `"pt"`.
        code_indices (`torch.LongTensor` of shape `(batch,)` or `None`): The code each image was conditioned on;
            `None` for an unconditional baseline, for a [`GaussianConditionEncoder`] (continuous conditions, no
            indices), and for [`~QACPipeline.interpolate`]'s `"linear"` path (whose inner points are not codes).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    code_indices: torch.LongTensor | None


class QACPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional image generation with quantized adaptive conditions: draw a condition (a code from the
    encoder's code weights, or a Gaussian condition from its prior), then solve the probability-flow ODE of the
    conditioned model, EDM or rectified flow (`formulation`, saved in model_index.json).

    Parameters:
        unet ([`QACUNet2DModel`]): The conditioned network: EDM's F (preconditioned by the scheduler) or rectified
            flow's velocity.
        scheduler ([`SchedulerMixin`]): A scheduler of the formulation. EDM: [`IPNDMScheduler`] (default), or
            diffusers' [`EDMEulerScheduler`] / [`EDMDPMSolverMultistepScheduler`]; an [`IPNDMScheduler`] with
            schedules fitted to another model (`fitted_model_fingerprint`) is refused. Rectified flow: diffusers'
            [`FlowMatchEulerDiscreteScheduler`] or [`FlowMatchHeunDiscreteScheduler`], or their subclasses
            [`FittedFlowMatchEulerDiscreteScheduler`] and [`FittedFlowMatchHeunDiscreteScheduler`] (on grids fitted to
            the model; refused with another model's grids, as above).
        encoder ([`FSQConditionEncoder`] or [`GaussianConditionEncoder`], *optional*): Encodes images to conditions
            and gives the conditions of sampling. `None` for the unconditional baseline (a `unet` with
            `code_dim=0`).
        formulation (`str`, defaults to `"edm"`): `"edm"` or `"rectified_flow"`, how the `unet` was trained; folders
            saved before it existed are EDM.
    """

    model_cpu_offload_seq = "encoder->unet"
    _optional_components = ["encoder"]

    def __init__(
        self,
        unet: QACUNet2DModel,
        scheduler: SchedulerMixin,
        encoder: FSQConditionEncoder | GaussianConditionEncoder | None = None,
        formulation: str = "edm",
    ):
        super().__init__()
        formulation_from_name(formulation, scheduler)  # refuses an unknown name and a scheduler of another kind
        _check_components(unet, encoder)
        _check_fitted_schedules(unet, encoder, scheduler)
        self.register_modules(unet=unet, scheduler=scheduler, encoder=encoder)
        self.register_to_config(formulation=formulation)
        self.image_processor = VaeImageProcessor(do_resize=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "QACPipeline":
        """
        Load a pipeline from a local folder or a Hub repo id.

        diffusers' own download step only knows diffusers' and transformers' classes, so a repo id is resolved here
        with `huggingface_hub.snapshot_download` (which also serves the offline cache), then loaded from that folder.
        The download keyword arguments (`revision`, `cache_dir`, `token`, `local_files_only`, `force_download`) go to
        the download; all others to [`DiffusionPipeline.from_pretrained`].

        Raises:
            `FileNotFoundError`: The path is neither a folder nor a loadable Hub repo id, or the folder lacks a
                component's folder, config or weights file (components passed as keyword arguments are not needed).
            `OSError`: The folder holds no `model_index.json`.
        """
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            download_kwargs = {
                key: kwargs.pop(key)
                for key in ("revision", "cache_dir", "token", "local_files_only", "force_download")
                if key in kwargs
            }
            folder = _download(folder, download_kwargs)
        _check_saved_pipeline(folder, passed_components=kwargs.keys())
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs) -> dict | tuple:
        """
        diffusers' `load_config`, with the entries of model_index.json that name the code shipped in a saved folder
        mapped to this package's classes: loading with the package runs the package, and needs no
        `trust_remote_code`. Folders saved before the code was shipped read as they are.
        """
        # imported here: the code shipped with a model (which remote_code writes) leaves this method out
        from .remote_code import package_model_index

        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):
            return package_model_index(loaded[0]), *loaded[1:]
        return package_model_index(loaded)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """
        diffusers' `save_pretrained`, plus the code that lets plain diffusers load the folder:
        `DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)` (see `remote_code`).
        """
        from .remote_code import write_remote_code  # here: the shipped code leaves this method out

        super().save_pretrained(save_directory, **kwargs)
        write_remote_code(self, save_directory)

    @property
    def formulation(self) -> Formulation:
        """
        The formulation of the saved config around the current scheduler, so that a scheduler swapped in after
        loading is used, and refused if it is of the other formulation's kind.
        """
        return formulation_from_name(self.config.formulation, self.scheduler)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this pipeline makes."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return self.unet.config.in_channels, height, width

    @torch.no_grad()
    def denoise(
        self, sample: torch.Tensor, sigma: float | torch.Tensor, code: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        The denoiser D(x; sigma, y) in EDM coordinates, x = x0 + sigma * n, whatever the formulation (see
        [`Formulation.denoise_edm`]): the editing pipeline and the metrics use it.

        Args:
            sample (`torch.Tensor` of shape `(batch, channels, height, width)`): The noisy images x.
            sigma (`float` or `torch.Tensor` of shape `(batch, 1, 1, 1)`): The noise level(s), finite.
            code (`torch.Tensor` of shape `(batch, code_dim)`, *optional*): The conditions (e.g.
                `encoder.indices_to_codes(indices)`); `None` for the unconditional baseline.
        """
        return self.formulation.denoise_edm(self.unet, sample, sigma, code)

    @torch.no_grad()
    def encode(self, images: torch.Tensor | PIL.Image.Image | list[PIL.Image.Image]) -> torch.LongTensor:
        """
        The code indices of images, so that `pipe(code_indices=pipe.encode(images))` makes more images like them.

        Args:
            images (`torch.Tensor` of shape `(batch, channels, height, width)` in [-1, 1], or PIL image(s)): Images of
                the pipeline's size; PIL images are converted to its channel count.

        Returns:
            `torch.LongTensor` of shape `(batch,)`.
        """
        code_indices = self.encode_conditions(images)[1]
        if code_indices is None:
            raise ValueError(
                "This pipeline's GaussianConditionEncoder makes continuous conditions, not code indices: use "
                "`pipe.variations(images)`, or `pipe.encode_conditions(images)[0]` for the conditions themselves."
            )
        return code_indices

    @torch.no_grad()
    def encode_conditions(
        self, images: torch.Tensor | PIL.Image.Image | list[PIL.Image.Image]
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """
        The conditions of images, for either encoder: `(codes, code_indices)`, the float conditions of shape `(batch,
        code_dim)` the UNet takes and their indices of shape `(batch,)` (`None` for a [`GaussianConditionEncoder`],
        whose conditions are the posterior means). Images as in [`encode`].
        """
        if self.encoder is None:
            raise ValueError("This pipeline is unconditional (no encoder): it has no codes to encode images to.")
        pixels = self.images_to_tensor(images).to(device=self._execution_device, dtype=self.encoder.dtype)
        output = self.encoder(pixels)
        return output.codes, output.get("indices")

    # Code-controlled generation: variations of a reference image, interpolation between two codes.

    def _sample(
        self, latents: torch.Tensor, code: torch.Tensor | None, num_inference_steps: int, output_type: str
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """
        Steps 2-4 of [`__call__`]: solve the probability-flow ODE from standard normal `latents` conditioned on `code`
        (float levels of shape `(batch, code_dim)` on the execution device, not necessarily integers; `None` for the
        baseline) and post-process the result.
        """
        latents = latents.to(device=self._execution_device)

        # 2-3. The formulation sets the scheduler's schedule and solves the ODE with it
        sample = self.formulation.solve(self.unet, latents, code, num_inference_steps, self.progress_bar)

        # 4. Post-process
        return self._postprocess(sample, output_type)

    def _postprocess(
        self, sample: torch.Tensor, output_type: str
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        images = self.image_processor.postprocess(sample, output_type=output_type)
        self.maybe_free_model_hooks()
        return images

    @torch.no_grad()
    def variations(
        self,
        image: torch.Tensor | PIL.Image.Image | list[PIL.Image.Image],
        num_variations: int = 8,
        num_inference_steps: int = 6,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ) -> QACPipelineOutput:
        r"""
        New images that share the code of reference image(s): each reference is encoded to its code, and
        `num_variations` images are sampled with that code and fresh noise.

        Args:
            image (`torch.Tensor` of shape `(batch, channels, height, width)` in [-1, 1], or PIL image(s)): The
                reference(s), at the pipeline's size (see [`encode`]).
            num_variations (`int`, defaults to 8): Images per reference.
            num_inference_steps (`int`, defaults to 6): The number of UNet evaluations (NFE), as in [`__call__`].
            generator (`torch.Generator` or a list of `batch * num_variations` of them, *optional*): Makes the noise
                deterministic.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.

        Examples:
            ```py
            >>> generator = torch.Generator().manual_seed(0)
            >>> variations = pipe.variations(reference_image, num_variations=8, generator=generator)
            >>> variations.code_indices  # the reference's code, 8 times
            ```

        Returns:
            [`QACPipelineOutput`] with `batch * num_variations` images, reference-major (the variations of reference
            0 first), and their code indices (each reference's code, repeated; `None` for a
            [`GaussianConditionEncoder`], whose condition is the reference's posterior mean).
        """
        if not isinstance(num_variations, int) or num_variations < 1:
            raise ValueError(f"`num_variations` must be a positive integer, got {num_variations!r}.")
        codes, code_indices = self.encode_conditions(image)
        batch_size = len(codes) * num_variations
        self.check_inputs(batch_size, num_inference_steps, generator, None, None, output_type)
        latents = randn_tensor((batch_size, *self.image_shape), generator=generator, device=self._execution_device)
        code = codes.float().repeat_interleave(num_variations, dim=0)
        images = self._sample(latents, code, num_inference_steps, output_type)
        if code_indices is not None:
            code_indices = code_indices.repeat_interleave(num_variations)
        return QACPipelineOutput(images=images, code_indices=code_indices)

    @torch.no_grad()
    def interpolate(
        self,
        code_a: int | torch.Tensor,
        code_b: int | torch.Tensor,
        num_points: int | None = None,
        num_inference_steps: int = 6,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        path: Literal["bits", "linear"] = "bits",
    ) -> QACPipelineOutput:
        r"""
        Samples along a path from `code_a` to `code_b`, all from the same noise image, so that only the code changes
        from one image to the next. See [`interpolation_codes`] for the two paths.

        Args:
            code_a (`int` or `torch.Tensor`), code_b (`int` or `torch.Tensor`): The endpoints: code indices (an `int`
                or a 0-d integer tensor, e.g. from [`encode`]) or level vectors of shape `(code_dim,)`.
            num_points (`int`, *optional*): The number of images, endpoints included: at least 2, and for `"bits"` at
                most the Hamming distance of the codes + 1. `None`: that many, i.e. every code of the `"bits"` path
                (for either path, so that the two rows line up).
            num_inference_steps (`int`, defaults to 6): The number of UNet evaluations (NFE) with [`IPNDMScheduler`].
            generator (`torch.Generator`, *optional*): Draws the one noise image when `latents` is `None`.
            latents (`torch.Tensor` of shape `(1, channels, height, width)`, *optional*): The one standard normal
                noise image every point starts from.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.
            path (`"bits"` or `"linear"`, defaults to `"bits"`): `"bits"` changes one channel at a time and so stays
                on real codes, the conditions the model was trained on; `"linear"` blends the level vectors and
                conditions the UNet on codes between the levels, which it never saw in training.

        Examples:
            ```py
            >>> codes = pipe.encode(two_images)
            >>> row = pipe.interpolate(codes[0], codes[1], generator=torch.Generator().manual_seed(0)).images
            ```

        Returns:
            [`QACPipelineOutput`] with `num_points` images; `code_indices` are the codes of the `"bits"` path, and
            `None` for the `"linear"` path (its inner points are not codes).
        """
        codes = self.interpolation_codes(code_a, code_b, num_points, path)
        self.check_inputs(1, num_inference_steps, generator, None, latents, output_type)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor((1, *self.image_shape), generator=generator, device=device)
        # The same noise image for every point: only the code changes along the row.
        same_noise = latents.expand(len(codes), -1, -1, -1)
        images = self._sample(same_noise, codes.to(device), num_inference_steps, output_type)
        code_indices = self.encoder.codes_to_indices(codes) if path == "bits" else None
        return QACPipelineOutput(images=images, code_indices=code_indices)

    def interpolation_codes(
        self,
        code_a: int | torch.Tensor,
        code_b: int | torch.Tensor,
        num_points: int | None = None,
        path: Literal["bits", "linear"] = "bits",
    ) -> torch.Tensor:
        r"""
        The codes of [`interpolate`]: a path of level vectors from `code_a` to `code_b`, endpoints included.

        Codes are discrete, so "between two codes" needs a definition. With H the Hamming distance of the codes (the
        number of channels where they differ):

        - `"bits"`: the H + 1 real codes met when the differing channels are set to their level in `code_b` one at a
          time, channel 0 first (for `code_levels` > 2 a channel jumps straight to its target level). Neighbours
          differ in exactly one channel. `num_points` picks that many codes of this walk, evenly spaced (rounded)
          and always with both endpoints, so it can be at most H + 1.
        - `"linear"`: (1 - s) * a + s * b in level space for `num_points` evenly spaced s in [0, 1]; every differing
          channel moves at once, through levels the UNet's code embedding accepts (it is linear in the levels) but
          was never trained on.

        Args:
            code_a (`int` or `torch.Tensor`), code_b (`int` or `torch.Tensor`): Code indices (an `int` or a 0-d
                integer tensor) or level vectors of shape `(code_dim,)` with integer levels in `[0, code_levels)`.
            num_points (`int`, *optional*): The number of points (at least 2); `None` for H + 1.
            path (`"bits"` or `"linear"`, defaults to `"bits"`): See above.

        Returns:
            `torch.Tensor` of shape `(num_points, code_dim)`: float levels.
        """
        if self.encoder is None:
            raise ValueError("This pipeline is unconditional (no encoder): it has no codes to interpolate between.")
        if "code_levels" not in self.encoder.config:
            raise ValueError(
                f"Interpolation walks between codes of a codebook, and this pipeline's {type(self.encoder).__name__} "
                "has none: its conditions are continuous. Sample along your own path of conditions with "
                "`pipe._sample(latents, conditions, num_inference_steps, output_type)`."
            )
        if path not in ("bits", "linear"):
            raise ValueError(f"`path` must be 'bits' or 'linear', got {path!r}.")
        start, end = self._code_levels(code_a, "code_a"), self._code_levels(code_b, "code_b")
        differing = (start != end).nonzero().flatten()
        hamming = len(differing)
        if num_points is None:
            num_points = hamming + 1
        elif not isinstance(num_points, int) or num_points < 2:
            raise ValueError(f"`num_points` must be None or an integer >= 2 (both endpoints), got {num_points!r}.")
        elif path == "bits" and num_points > hamming + 1:
            raise ValueError(
                f"The codes differ in {hamming} channel(s), so the 'bits' path has {hamming + 1} codes: pass "
                f"`num_points` <= {hamming + 1}, `num_points=None` for all of them, or `path='linear'`."
            )
        if path == "linear":
            fractions = torch.linspace(0, 1, num_points, device=start.device).unsqueeze(1)
            return start + fractions * (end - start)
        # Step k of the walk has the first k differing channels at their level in code_b.
        steps = torch.arange(hamming + 1, device=start.device).unsqueeze(1)
        switched = torch.zeros(hamming + 1, len(start), dtype=torch.bool, device=start.device)
        switched[:, differing] = steps > torch.arange(hamming, device=start.device)
        walk = torch.where(switched, end, start)
        # num_points evenly spaced steps, k * H / spacing rounded half up, in exact integer arithmetic
        spacing = max(num_points - 1, 1)
        chosen = [(2 * k * hamming + spacing) // (2 * spacing) for k in range(num_points)]
        return walk[chosen]

    def _code_levels(self, code: int | torch.Tensor, name: str) -> torch.Tensor:
        """A code index or level vector as float levels of shape `(code_dim,)`, checked."""
        code_dim, code_levels = self.encoder.config.code_dim, self.encoder.config.code_levels
        if isinstance(code, int) or (isinstance(code, torch.Tensor) and code.ndim == 0):
            index = torch.as_tensor(code, device=self.encoder.device)
            return self.encoder.indices_to_codes(index)
        if not isinstance(code, torch.Tensor) or tuple(code.shape) != (code_dim,):
            got = tuple(code.shape) if isinstance(code, torch.Tensor) else type(code).__name__
            raise ValueError(
                f"`{name}` must be a code index (an int or a 0-d tensor) or a level vector of shape ({code_dim},), "
                f"got {got}."
            )
        levels = code.to(device=self.encoder.device, dtype=torch.float32)
        if not torch.equal(levels, levels.round()) or levels.min() < 0 or levels.max() > code_levels - 1:
            raise ValueError(f"`{name}` must hold integer levels in [0, {code_levels - 1}], got {code.tolist()}.")
        return levels

    def images_to_tensor(self, images: torch.Tensor | PIL.Image.Image | list[PIL.Image.Image]) -> torch.Tensor:
        """PIL image(s) to a `(batch, channels, height, width)` tensor in [-1, 1]; tensors are checked and returned."""
        images = to_pixel_tensor(images, mode="L" if self.image_shape[0] == 1 else "RGB")
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(
                f"Expected images of shape (batch, {shape}) in [-1, 1] or PIL images of size "
                f"{self.image_shape[2]}x{self.image_shape[1]}, got {got}."
            )
        return images

    def check_inputs(self, batch_size, num_inference_steps, generator, code_indices, latents, output_type) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                "`num_inference_steps` (the number of UNet calls) must be an integer >= 1, got "
                f"{num_inference_steps!r}."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for batch_size={batch_size}: pass one per image."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if latents is not None and tuple(latents.shape) != (batch_size, *self.image_shape):
            raise ValueError(
                f"`latents` must have shape {(batch_size, *self.image_shape)}, got {tuple(latents.shape)}."
            )
        if code_indices is not None:
            if self.encoder is None:
                raise ValueError("This pipeline is unconditional (no encoder): `code_indices` must be None.")
            if not isinstance(code_indices, torch.Tensor) or tuple(code_indices.shape) != (batch_size,):
                is_tensor = isinstance(code_indices, torch.Tensor)
                got = tuple(code_indices.shape) if is_tensor else type(code_indices).__name__
                raise ValueError(
                    f"`code_indices` must be a tensor of shape ({batch_size},) (one per image), got {got}."
                )
            self.encoder.check_indices(code_indices)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 6,
        generator: torch.Generator | list[torch.Generator] | None = None,
        code_indices: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> QACPipelineOutput | tuple:
        r"""
        Generate images.

        Args:
            batch_size (`int`, defaults to 1): The number of images.
            num_inference_steps (`int`, defaults to 6): The number of UNet evaluations (NFE) with [`IPNDMScheduler`]
                and rectified flow's schedulers (Heun: an odd number, see [`RectifiedFlowFormulation.set_timesteps`]);
                with diffusers' EDM schedulers, their own `num_inference_steps`.
            generator (`torch.Generator` or a list of `batch_size` of them, *optional*): Makes generation
                deterministic. The noise is drawn before the codes, so the same seed with other `code_indices` keeps
                the noise.
            code_indices (`torch.LongTensor` of shape `(batch_size,)`, *optional*): The codes to condition on (e.g.
                from [`encode`]); drawn from the encoder's code weights when `None` (a [`GaussianConditionEncoder`]
                takes none: its conditions are drawn from its prior N(0, I)).
            latents (`torch.Tensor` of shape `(batch_size, channels, height, width)`, *optional*): Standard normal
                noise to start from (EDM scales it by the scheduler's `init_noise_sigma`); drawn with `generator` when
                `None`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.
            return_dict (`bool`, defaults to `True`): Return a [`QACPipelineOutput`] instead of a tuple.

        Examples:

        Returns:
            [`QACPipelineOutput`] or `tuple` `(images, code_indices)`.
        """
        self.check_inputs(batch_size, num_inference_steps, generator, code_indices, latents, output_type)

        # 1. Noise, then the conditions (so a fixed seed keeps the noise whatever the conditions are)
        latents, code, code_indices = self._noise_and_conditions(batch_size, generator, code_indices, latents)

        # 2-4. Solve the probability-flow ODE from the latents and post-process
        images = self._sample(latents, code, num_inference_steps, output_type)
        if not return_dict:
            return images, code_indices
        return QACPipelineOutput(images=images, code_indices=code_indices)

    @torch.no_grad()
    def sample_reference(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        code_indices: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> tuple[QACPipelineOutput, int]:
        r"""
        Generate images with the formulation's adaptive reference solver instead of the scheduler: for rectified
        flow, scipy's RK45 with RNE's settings (the paper's "RK45" column). EDM has none and is refused. The noise
        and the conditions are drawn as in [`__call__`], so a seed gives the same ones.

        Args:
            batch_size, generator, code_indices, latents, output_type: As in [`__call__`].

        Examples:
            ```py
            >>> output, nfe = pipe.sample_reference(batch_size=16, generator=torch.Generator().manual_seed(0))
            ```

        Returns:
            `tuple` `(output, nfe)`: a [`QACPipelineOutput`] and the number of UNet calls the solver made.
        """
        self.check_inputs(batch_size, 1, generator, code_indices, latents, output_type)
        formulation = self.formulation
        latents, code, code_indices = self._noise_and_conditions(batch_size, generator, code_indices, latents)
        samples, nfe = formulation.reference_solve(self.unet, latents, code)
        images = self._postprocess(samples, output_type)
        return QACPipelineOutput(images=images, code_indices=code_indices), nfe

    def _noise_and_conditions(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        code_indices: torch.LongTensor | None,
        latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor | None]:
        """
        Step 1 of [`__call__`]: `(latents, code, code_indices)`, the noise (drawn first), then the conditions on the
        execution device: of `code_indices`, else drawn by the encoder (indices `None` for a Gaussian encoder).
        """
        device = self._execution_device
        if latents is None:
            latents = randn_tensor((batch_size, *self.image_shape), generator=generator, device=device)
        if self.encoder is None:
            return latents, None, None
        if code_indices is None:
            code, code_indices = self.encoder.draw_conditions(batch_size, generator)
        else:
            code = self.encoder.indices_to_codes(code_indices.to(device))
        return latents, code.to(device), code_indices


def pil_to_tensor(images: PIL.Image.Image | list[PIL.Image.Image], mode: str) -> torch.Tensor:
    """PIL image(s) converted to `mode`, as a float tensor of shape `(batch, channels, height, width)` in [0, 255]."""
    images = [images] if isinstance(images, PIL.Image.Image) else images
    if len({image.size for image in images}) > 1:
        sizes = sorted({image.size for image in images})
        raise ValueError(f"The PIL images have different sizes {sizes}: resize them to one size.")
    arrays = [np.asarray(image.convert(mode), dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).reshape(len(arrays), *arrays[0].shape[:2], -1).permute(0, 3, 1, 2)


def to_pixel_tensor(images: torch.Tensor | PIL.Image.Image | list[PIL.Image.Image], mode: str) -> torch.Tensor:
    """
    Images as the pipelines take them: PIL image(s) converted to `mode` and scaled to [-1, 1]; a tensor is checked to
    hold at least one image, in [-1, 1], and returned as it is. Anything else is returned for the caller's shape check.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, list):
        if not images:
            raise ValueError("Got an empty list of images: pass at least one image.")
        if not all(isinstance(image, PIL.Image.Image) for image in images):
            kinds = sorted({type(image).__name__ for image in images})
            raise ValueError(
                f"A list of images must hold PIL images, got {kinds}: pass tensors as one tensor of shape (batch, "
                "channels, height, width)."
            )
        return pil_to_tensor(images, mode) / 127.5 - 1
    if isinstance(images, torch.Tensor):
        check_pixel_range(images)
    return images


def check_pixel_range(images: torch.Tensor) -> None:
    """Refuse an image tensor that is empty or has values outside [-1, 1] (NaN included)."""
    if images.numel() == 0:
        raise ValueError(f"Got no images (a tensor of shape {tuple(images.shape)}): pass at least one image.")
    if not ((images >= -1) & (images <= 1)).all():
        low, high = images.min().item(), images.max().item()
        raise ValueError(
            f"Image tensors must hold values in [-1, 1], got values in [{low:g}, {high:g}]: convert [0, 255] "
            "pixels with `images / 127.5 - 1`, [0, 1] with `images * 2 - 1`."
        )


def _check_components(unet: QACUNet2DModel, encoder: FSQConditionEncoder | GaussianConditionEncoder | None) -> None:
    code_dim = unet.config.code_dim
    if encoder is None and code_dim > 0:
        raise ValueError(
            f"The unet is conditioned on codes (code_dim={code_dim}): pass the FSQConditionEncoder (or "
            "GaussianConditionEncoder) it was trained with."
        )
    if encoder is not None and code_dim == 0:
        raise ValueError("The unet is unconditional (code_dim=0): pass `encoder=None`.")
    # A Gaussian encoder's conditions are continuous: only the FSQ encoder has code levels to compare.
    keys = [key for key in ("code_dim", "code_levels") if encoder is not None and key in encoder.config]
    if [encoder.config[key] for key in keys] != [unet.config[key] for key in keys]:
        made = ", ".join(f"{key}={encoder.config[key]}" for key in keys)
        taken = ", ".join(f"{key}={unet.config[key]}" for key in keys)
        raise ValueError(f"The encoder makes codes with {made} but the unet takes {taken}.")


def _check_fitted_schedules(
    unet: QACUNet2DModel, encoder: FSQConditionEncoder | None, scheduler: SchedulerMixin
) -> None:
    """
    Refuse schedules fitted to another model. The fingerprint is of the float32 weights the schedules were fitted
    with, so it is only compared for a float32 UNet: one loaded in another dtype keeps its schedules unchecked.
    """
    fingerprint = scheduler.config.get("fitted_model_fingerprint")
    if fingerprint is None or unet.dtype != torch.float32:
        return
    if fingerprint != model_fingerprint(unet, encoder):
        raise ValueError(
            "The scheduler's fitted schedules (`fitted_sigmas`) were fitted to another model: refit them for this one "
            "with `fit_schedules` (pipelines/fit_schedule.py), or drop them with `scheduler=IPNDMScheduler."
            "from_config(scheduler.config, fitted_sigmas=None, fitted_model_fingerprint=None)`."
        )


def _download(repo_id: str, download_kwargs: dict) -> str:
    """The snapshot folder of a Hub repo id; a name that is no folder and no loadable repo is refused as a path."""
    missing = f"{repo_id!r} is not a folder (no such directory: {os.path.abspath(repo_id)})"
    if os.path.exists(repo_id):
        raise FileNotFoundError(f"{repo_id!r} is a file: pass the folder that holds model_index.json.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"{missing} and not a Hub repo id (those read 'model' or 'user/model'): check the path."
        ) from None
    try:
        return snapshot_download(repo_id, **download_kwargs)
    except (RepositoryNotFoundError, LocalEntryNotFoundError) as error:
        raise FileNotFoundError(f"{missing}, and as a Hub repo id it could not be loaded: {error}") from error


# The files `save_pretrained` writes per component: its config, and for models the weights.
_COMPONENT_FILES = {
    "unet": (QACUNet2DModel.config_name, SAFETENSORS_WEIGHTS_NAME),
    "scheduler": (SchedulerMixin.config_name, None),
    "encoder": (FSQConditionEncoder.config_name, SAFETENSORS_WEIGHTS_NAME),
}


def _check_saved_pipeline(folder: str, passed_components: Iterable[str]) -> None:
    """
    Refuse a saved pipeline with a missing part, naming it: without this check diffusers looks for a missing
    component's config in the pipeline's root folder and for missing weights as `.bin`, and reports those.
    """
    model_index_file = os.path.join(folder, "model_index.json")
    if not os.path.isfile(model_index_file):
        raise OSError(
            f"{folder} has no model_index.json: it is not a saved pipeline. Point to the folder written by "
            "`QACPipeline.save_pretrained` or train_qac.py."
        )
    with open(model_index_file, encoding="utf-8") as file:
        model_index = json.load(file)
    for name, (config_name, weights_name) in _COMPONENT_FILES.items():
        class_name = (model_index.get(name) or [None, None])[1]
        # A component saved as None (the unconditional baseline's encoder) or passed by the caller is not read.
        if class_name is None or name in passed_components:
            continue
        subfolder = os.path.join(folder, name)
        incomplete = f"The saved pipeline {folder} is incomplete:"
        fix = "Copy (or upload) the whole folder that `save_pretrained` or train_qac.py wrote."
        if not os.path.isdir(subfolder):
            raise FileNotFoundError(
                f"{incomplete} its model_index.json lists the {name} ({class_name}), but there is no {name}/ folder. "
                f"{fix}"
            )
        if not os.path.isfile(os.path.join(subfolder, config_name)):
            raise FileNotFoundError(f"{incomplete} {name}/ has no {config_name}. {fix}")
        if weights_name is None:
            continue
        # diffusers also reads .bin weights, variants (`*.fp16.safetensors`) and shards: any of them will do.
        stem = weights_name.removesuffix(".safetensors")
        files = os.listdir(subfolder)
        if not any(file.startswith(stem) and file.endswith((".safetensors", ".bin")) for file in files):
            raise FileNotFoundError(f"{incomplete} {name}/ has no weights file {weights_name}. {fix}")
