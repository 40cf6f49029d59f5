# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Zero-shot image editing with quantized adaptive conditions (paper Algorithm 2, DESIGN.md section 7)."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from .editing_operators import LinearDegradation, colorization, inpainting, super_resolution
from .pipeline_qac import OUTPUT_TYPES, QACPipeline, check_pixel_range, pil_to_tensor, to_pixel_tensor


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> import torch
        >>> from qac_diffusers import QACImageEditPipeline

        >>> pipe = QACImageEditPipeline.from_pretrained("path/or/user-repo")  # the same folders as QACPipeline
        >>> generator = torch.Generator().manual_seed(0)
        >>> image, mask = PIL.Image.open("image.png"), PIL.Image.open("mask.png")  # mask: white = pixels to fill
        >>> pipe(image, task="inpaint", mask=mask, generator=generator).images[0].save("inpainted.png")
        >>> pipe(image.convert("L"), task="colorize", generator=generator).images[0].save("colorized.png")
        >>> low = image.resize((image.width // 4, image.height // 4), PIL.Image.BOX)
        >>> pipe(low, task="super_resolve", factor=4, generator=generator).images[0].save("upscaled.png")
        ```
"""

TASKS = ("inpaint", "colorize", "super_resolve")

ImageInput = torch.Tensor | PIL.Image.Image | list[PIL.Image.Image]


@dataclass
class QACImageEditPipelineOutput(BaseOutput):
    """
    Output of [`QACImageEditPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(batch, height, width, channels)` or `torch.Tensor` of
            shape `(batch, channels, height, width)`): The edited images, in [0, 1] for `"np"` and `"pt"`.
        degraded (same type and shape as `images`): The known part of the input, A^-1[(A z)(1 - Omega)], at the
            model's size: the image with its hole set to mid-grey, the grey image in every channel, or the low-res
            image upsampled by repeating each pixel over its block.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    degraded: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class QACImageEditPipeline(QACPipeline):
    r"""
    Pipeline for zero-shot image editing (inpainting, colorization, super-resolution) with a QAC model: paper
    Algorithm 2, which alternates noising, denoising conditioned on the code of the current estimate, and replacing
    the known coefficients of the estimate by those of the input.

    The components, loading and saving are those of [`QACPipeline`], for both formulations: the noising and the
    denoiser are in EDM coordinates ([`QACPipeline.denoise`]), on the Karras grid of the formulation's
    [`Formulation.edit_sigmas`] (EDM: the scheduler's `sigma_min`, `sigma_max`, `rho`; rectified flow: t from 1/1000
    to 1 - 1/1000, rho = 7).

    Parameters:
        unet ([`QACUNet2DModel`]): The code-conditioned network.
        scheduler ([`SchedulerMixin`]): A scheduler of the formulation, as in [`QACPipeline`].
        encoder ([`FSQConditionEncoder`], *optional*): E, which codes the current estimate; `None` for the
            unconditional baseline, which then denoises without a code.
    """

    @torch.no_grad()
    def zero_shot_edit(
        self,
        z: torch.Tensor,
        degradation: LinearDegradation,
        num_inference_steps: int = 40,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """
        Paper Algorithm 2 on tensors, before any clamping or conversion.

        Every step ends with the data-consistency projection, so the result keeps the known part of `z` exactly:
        `degradation.known_part(x) == degradation.known_part(z)` to float precision.

        Args:
            z (`torch.Tensor` of shape `(batch, channels, height, width)`): The reference image in [-1, 1] at the
                model's size (only its known part is used).
            degradation ([`LinearDegradation`]): A and Omega.
            num_inference_steps (`int`, defaults to 40): N, the number of steps and of UNet calls.
            generator (`torch.Generator` or a list of `batch` of them, *optional*): The noise of every step is drawn
                with it, so a seed fixes the result.

        Returns:
            `torch.Tensor` of the shape of `z`, float32, in the data space ([-1, 1] up to what the model produces).
        """
        check_pixel_range(z)
        timesteps = self.formulation.edit_sigmas(num_inference_steps).tolist()

        # Algorithm 2, lines 1-2: keep only the known part of the reference, and start from it
        z = degradation.known_part(z.float())
        x = z
        for t in self.progress_bar(timesteps):
            # line 4: the condition is the code of the current estimate
            y = None if self.encoder is None else self.encoder(x.to(self.encoder.dtype)).codes
            # line 5: x ~ N(x, t^2 I)
            x = x + t * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            # line 6: denoise
            x = self.denoise(x, t, y)
            # line 7: the known coefficients come from z
            x = degradation.project(x, z)
        return x

    def check_edit_inputs(self, task, mask, factor, num_inference_steps, generator, output_type) -> None:
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
        if mask is None and task == "inpaint":
            raise ValueError("task='inpaint' needs a `mask` (1 or white = pixel to fill, 0 or black = pixel to keep).")
        if mask is not None and task != "inpaint":
            raise ValueError(f"`mask` is only used by task='inpaint', got a mask with task={task!r}.")
        if factor is None and task == "super_resolve":
            raise ValueError("task='super_resolve' needs the upscaling `factor`.")
        if factor is not None and task != "super_resolve":
            raise ValueError(
                f"`factor` is only used by task='super_resolve', got factor={factor!r} with task={task!r}."
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                "`num_inference_steps` (the number of time steps and UNet calls) must be an integer >= 1, got "
                f"{num_inference_steps!r}."
            )
        if isinstance(generator, list) and not generator:
            raise ValueError("Got an empty list of generators: pass one generator, or one per image.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

    def prepare_inpaint(self, image: ImageInput, mask: ImageInput) -> tuple[torch.Tensor, LinearDegradation]:
        """
        The reference z and the degradation for inpainting.

        Args:
            image (`torch.Tensor` of shape `(batch, channels, height, width)` in [-1, 1], or PIL image(s)): At the
                model's size.
            mask (`torch.Tensor` of shape `(height, width)` or `(batch or 1, channels or 1, height, width)`, or PIL
                image(s)): 1 (white) = pixel to fill, 0 (black) = pixel to keep; nothing else.

        Returns:
            `tuple` `(z, degradation)`.
        """
        z = self.images_to_tensor(image)
        omega = pil_to_tensor(mask, mode="L") / 255 if _is_pil(mask) else mask
        if not isinstance(omega, torch.Tensor) or omega.ndim not in (2, 4):
            got = tuple(omega.shape) if isinstance(omega, torch.Tensor) else type(omega).__name__
            raise ValueError(f"`mask` must be PIL image(s) or a tensor of shape (height, width) or 4-D, got {got}.")
        omega = omega.reshape(1, 1, *omega.shape) if omega.ndim == 2 else omega
        if tuple(omega.shape[2:]) != tuple(z.shape[2:]):
            raise ValueError(
                f"The mask is {_size(omega)} (width x height) but the image is {_size(z)}: they must have the same "
                "size."
            )
        if omega.shape[0] not in (1, z.shape[0]) or omega.shape[1] not in (1, z.shape[1]):
            raise ValueError(
                f"A mask of shape {tuple(omega.shape)} does not fit {z.shape[0]} image(s) of {z.shape[1]} channel(s): "
                "its batch and channel sizes must be 1 or those of the images."
            )
        return z, inpainting(omega)

    def prepare_colorize(self, image: ImageInput) -> tuple[torch.Tensor, LinearDegradation]:
        """
        The reference z and the degradation for colorization.

        Args:
            image (`torch.Tensor` of shape `(batch, 1, height, width)` in [-1, 1], or PIL image(s) of mode `"L"`): The
                grey image(s) at the model's size; they are taken as the channel mean of the colour result.

        Returns:
            `tuple` `(z, degradation)`, z the grey image repeated in the 3 channels.
        """
        channels, height, width = self.image_shape
        if channels != 3:
            raise ValueError(f"task='colorize' needs a 3-channel (RGB) model; this one has {channels} channel(s).")
        if _is_pil(image):
            images = [image] if isinstance(image, PIL.Image.Image) else image
            colour_modes = sorted({im.mode for im in images} - {"L"})
            if colour_modes:
                raise ValueError(
                    f"task='colorize' takes grey images (PIL mode 'L'), got mode(s) {colour_modes}: pass "
                    "image.convert('L')."
                )
        grey = to_pixel_tensor(image, mode="L")
        if not isinstance(grey, torch.Tensor) or grey.ndim != 4 or grey.shape[1] != 1:
            got = tuple(grey.shape) if isinstance(grey, torch.Tensor) else type(grey).__name__
            raise ValueError(f"task='colorize' takes grey images of shape (batch, 1, height, width), got {got}.")
        if tuple(grey.shape[2:]) != (height, width):
            raise ValueError(f"The grey image is {_size(grey)} (width x height) but the model makes {width}x{height}.")
        return grey.expand(-1, channels, -1, -1), colorization(channels)

    def prepare_super_resolve(self, image: ImageInput, factor: int) -> tuple[torch.Tensor, LinearDegradation]:
        """
        The reference z and the degradation for super-resolution.

        Args:
            image (`torch.Tensor` of shape `(batch, channels, height / factor, width / factor)` in [-1, 1], or PIL
                image(s) of that size): The low-resolution image(s); every pixel is the mean of a `factor x factor`
                block of the result.
            factor (`int`): The upscaling factor; it must divide the model's height and width.

        Returns:
            `tuple` `(z, degradation)`, z the low-res image upsampled by repeating each pixel over its block (nearest
            neighbour), so that its block means are the low-res pixels.
        """
        channels, height, width = self.image_shape
        if not isinstance(factor, int) or factor < 1 or height % factor or width % factor:
            raise ValueError(
                f"`factor` must be an integer >= 1 that divides the model size {width}x{height}, got {factor!r}."
            )
        low = to_pixel_tensor(image, mode="L" if channels == 1 else "RGB")
        expected = (channels, height // factor, width // factor)
        if not isinstance(low, torch.Tensor) or low.ndim != 4 or tuple(low.shape[1:]) != expected:
            got = tuple(low.shape) if isinstance(low, torch.Tensor) else type(low).__name__
            raise ValueError(
                f"With factor={factor} the low-resolution image must be {expected[2]}x{expected[1]} (shape (batch, "
                f"{', '.join(map(str, expected))})), got {got}."
            )
        z = low.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        return z, super_resolution(factor)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        task: str,
        mask: ImageInput | None = None,
        factor: int | None = None,
        num_inference_steps: int = 40,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> QACImageEditPipelineOutput | tuple:
        r"""
        Edit images zero-shot.

        Args:
            image (`torch.Tensor` of shape `(batch, channels, height, width)` in [-1, 1], or PIL image(s)): The input,
                as the task needs it (see [`prepare_inpaint`], [`prepare_colorize`], [`prepare_super_resolve`]):
                `"inpaint"`: the image at the model's size; `"colorize"`: the grey image at the model's size (PIL
                mode `"L"` or 1 channel, the model must have 3); `"super_resolve"`: the low-resolution image, of the
                model's size divided by `factor`.
            task (`str`): `"inpaint"`, `"colorize"` or `"super_resolve"`.
            mask (`torch.Tensor` or PIL image(s), *optional*): For `"inpaint"` only: 1 (white) = pixel to fill, 0
                (black) = pixel to keep, of the image's size.
            factor (`int`, *optional*): For `"super_resolve"` only: the upscaling factor, a divisor of the model size.
            num_inference_steps (`int`, defaults to 40): N, the number of Karras time steps and of UNet calls.
            generator (`torch.Generator` or a list of one per image, *optional*): Makes the result deterministic.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"`.
            return_dict (`bool`, defaults to `True`): Return a [`QACImageEditPipelineOutput`] instead of a tuple.

        Examples:

        Returns:
            [`QACImageEditPipelineOutput`] or `tuple` `(images, degraded)`. The result of [`zero_shot_edit`] keeps the
            known part of the input exactly; the outputs clamp it to the image range like every pipeline, so where the
            model's result leaves [-1, 1] a colorized pixel's luminance or a super-resolved block's mean can differ
            from the input's.
        """
        self.check_edit_inputs(task, mask, factor, num_inference_steps, generator, output_type)

        # 1. The reference z and the degradation (A, Omega) of the task
        if task == "inpaint":
            z, degradation = self.prepare_inpaint(image, mask)
        elif task == "colorize":
            z, degradation = self.prepare_colorize(image)
        else:
            z, degradation = self.prepare_super_resolve(image, factor)
        if isinstance(generator, list) and len(generator) != z.shape[0]:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {z.shape[0]} image(s): pass one per image."
            )
        z = z.to(device=self._execution_device, dtype=torch.float32)

        # 2. Paper Algorithm 2
        x = self.zero_shot_edit(z, degradation, num_inference_steps, generator)

        # 3. Post-process
        images = self.image_processor.postprocess(x, output_type=output_type)
        degraded = self.image_processor.postprocess(degradation.known_part(z), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, degraded
        return QACImageEditPipelineOutput(images=images, degraded=degraded)


def _is_pil(images) -> bool:
    """Whether `images` is a PIL image or a non-empty list of them."""
    if isinstance(images, list):
        return bool(images) and all(isinstance(image, PIL.Image.Image) for image in images)
    return isinstance(images, PIL.Image.Image)


def _size(images: torch.Tensor) -> str:
    """`width x height` of a `(..., height, width)` tensor, as users give PIL sizes."""
    return f"{images.shape[-1]}x{images.shape[-2]}"
