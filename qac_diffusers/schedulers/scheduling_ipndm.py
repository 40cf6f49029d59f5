# Copyright 2025 The qac-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

# The sampler is iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
# https://huggingface.co/papers/2204.13902, appendix: the improved pseudo numerical method) in the EDM formulation
# (Karras et al. 2022, https://huggingface.co/papers/2206.00364) with the analytical first step of Dockhorn et al. 2022
# (GENIE, https://huggingface.co/papers/2210.05475), as written in the `ipndm` sampler of
# https://github.com/zju-pi/diff-sampler (Zhou et al. 2024, https://huggingface.co/papers/2312.00094).

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging

from .fitted_schedules import FittedSchedulesMixin


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

# Adams-Bashforth weights for a uniform step, newest derivative first (Hairer, Norsett & Wanner, "Solving Ordinary
# Differential Equations I", section III.1). iPNDM uses them unchanged on the non-uniform EDM schedule.
_ADAMS_BASHFORTH_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def karras_sigmas(num_points: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """
    The polynomial noise schedule of Karras et al. 2022 (eq. 5; k-diffusion's `get_sigmas_karras`) without a final 0:
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1.

    Args:
        num_points (`int`): N; for N = 1 the only point is `sigma_max`.

    Returns:
        `torch.Tensor` of shape `(N,)`, float64, from `sigma_max` down to `sigma_min`.
    """
    ramp = torch.linspace(0, 1, num_points, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def adams_bashforth_weights(order: int) -> tuple[float, ...]:
    """
    Fixed-step Adams-Bashforth weights, as in iPNDM (Zhang & Chen 2023, appendix).

    Args:
        order (`int`):
            The number of derivatives the update combines, 1 to 4.

    Returns:
        `tuple[float, ...]`:
            `order` weights `w_j` for the update `x + h * sum_j w_j * d_{i-j}`, newest derivative (`j = 0`) first.
    """
    return _ADAMS_BASHFORTH_WEIGHTS[order]


def variable_step_adams_bashforth_weights(sigmas: Sequence[float], sigma_next: float) -> tuple[float, ...]:
    """
    Variable-step Adams-Bashforth weights (Hairer, Norsett & Wanner, section III.5): the integrals over
    `[sigma_i, sigma_next]` of the Lagrange basis polynomials through the sigmas of the derivative history, divided by
    the step `h = sigma_next - sigma_i`. On a uniform grid they equal [`adams_bashforth_weights`].

    Args:
        sigmas (`Sequence[float]`):
            The sigmas of the derivatives in the history, newest (`sigma_i`, where the step starts) first.
        sigma_next (`float`):
            The sigma the step ends at.

    Returns:
        `tuple[float, ...]`:
            One weight per entry of `sigmas`, in the same order, for the update `x + h * sum_j w_j * d_{i-j}`.
    """
    sigma_i = sigmas[0]
    h = sigma_next - sigma_i
    # In the variable t = (sigma - sigma_i) / h the step is [0, 1] and the integral divided by h is the integral in t.
    nodes = [(sigma - sigma_i) / h for sigma in sigmas]
    weights = []
    for j, node_j in enumerate(nodes):
        basis = np.array([1.0])
        for m, node_m in enumerate(nodes):
            if m != j:
                basis = np.polynomial.polynomial.polymul(basis, [-node_m, 1.0]) / (node_j - node_m)
        weights.append(float(np.polynomial.polynomial.polyval(1.0, np.polynomial.polynomial.polyint(basis))))
    return tuple(weights)


class ScheduleNotSetError(ValueError, AttributeError):
    """
    The scheduler was used before `set_timesteps`. A `ValueError`, and an `AttributeError` so that `hasattr`,
    `getattr(scheduler, name, default)` and `inspect.getmembers` see the schedule-dependent `init_noise_sigma` of a
    fresh scheduler as missing instead of raising.
    """


@dataclass
class IPNDMSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function output.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            Computed sample at the next (lower) noise level. `prev_sample` should be used as next model input in the
            denoising loop.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)` for images):
            The denoised sample `D(x; sigma)` predicted from the model output at the current noise level.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class IPNDMScheduler(FittedSchedulesMixin, SchedulerMixin, ConfigMixin):
    """
    The iPNDM sampler (Zhang & Chen 2023 [1], a fourth-order Adams-Bashforth multistep method with a lower-order warm
    start) for the probability-flow ODE `dx/dsigma = (x - D(x; sigma)) / sigma` in the EDM formulation of Karras et
    al. 2022 [2], on the polynomial (Karras) sigma schedule, with the optional analytical first step (AFS) of
    Dockhorn et al. 2022 [3].

    `num_inference_steps` is the number of function evaluations (NFE): the generic diffusers loop over `timesteps`
    calls the model exactly that many times. With AFS the first step from `sigma_max` needs no model call: it is
    folded into [`~IPNDMScheduler.init_noise_sigma`], so the latents `randn * init_noise_sigma` already start at the
    second point of the schedule.

    [1] Zhang, Qinsheng, and Yongxin Chen. "Fast Sampling of Diffusion Models with Exponential Integrator."
    https://huggingface.co/papers/2204.13902

    [2] Karras, Tero, et al. "Elucidating the Design Space of Diffusion-Based Generative Models."
    https://huggingface.co/papers/2206.00364

    [3] Dockhorn, Tim, et al. "GENIE: Higher-Order Denoising Diffusion Solvers."
    https://huggingface.co/papers/2210.05475

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`]. Check the superclass documentation for the generic
    methods the library implements for all schedulers such as loading and saving.

    Args:
        sigma_min (`float`, *optional*, defaults to `0.002`):
            Minimum noise magnitude in the sigma schedule (EDM paper [2]). Must be positive and below `sigma_max`.
        sigma_max (`float`, *optional*, defaults to `80.0`):
            Maximum noise magnitude in the sigma schedule (EDM paper [2]).
        sigma_data (`float`, *optional*, defaults to `0.5`):
            The standard deviation of the data distribution, used by the EDM preconditioning.
        rho (`float`, *optional*, defaults to `7.0`):
            The exponent of the polynomial (Karras) sigma schedule, 7.0 in the EDM paper [2].
        max_order (`int`, *optional*, defaults to `4`):
            The highest Adams-Bashforth order, 1 to 4. Early steps use as many derivatives as are available.
        analytical_first_step (`bool`, *optional*, defaults to `True`):
            Whether to replace the model call at `sigma_max` by the analytical derivative
            `d_0 = x_0 / sqrt(1 + sigma_max**2)`. The schedule then has one more point for the same NFE.
        final_sigmas_type (`Literal["sigma_min", "zero"]`, *optional*, defaults to `"sigma_min"`):
            The last point of the schedule. `"sigma_min"`: the polynomial schedule ends at `sigma_min`, as in the
            paper's sampler. `"zero"`: the polynomial schedule gets one point fewer and a final point 0 is appended,
            so the last model call denoises from `sigma_min` to 0.
        variable_step (`bool`, *optional*, defaults to `False`):
            Whether to use variable-step Adams-Bashforth weights, exact for the non-uniform schedule, instead of the
            fixed uniform-step weights of iPNDM.
        fitted_sigmas (`list[list[float]]`, *optional*):
            Schedules fitted to one trained model for this solver (see [`fit_schedules`]), at most one per NFE. Each
            is the full list of sigmas that `set_timesteps` would otherwise compute from the polynomial formula for
            its NFE: `num_inference_steps + 2` points with the analytical first step (`+ 1` without), strictly
            decreasing from `sigma_max` to the final point (`sigma_min`, or 0 with `final_sigmas_type="zero"`).
            `set_timesteps(n)` uses the schedule fitted for `n` model calls and the formula at any other `n`.
        fitted_model_fingerprint (`str`, *optional*):
            [`model_fingerprint`] of the model the schedules were fitted to; `QACPipeline` refuses a scheduler whose
            fitted schedules belong to another model.
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        max_order: int = 4,
        analytical_first_step: bool = True,
        final_sigmas_type: Literal["sigma_min", "zero"] = "sigma_min",
        variable_step: bool = False,
        fitted_sigmas: list[list[float]] | None = None,
        fitted_model_fingerprint: str | None = None,
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"`sigma_min` and `sigma_max` must satisfy 0 < sigma_min < sigma_max, got {sigma_min=} and "
                f"{sigma_max=}."
            )
        if sigma_data <= 0:
            raise ValueError(f"`sigma_data` must be positive, got {sigma_data=}.")
        if rho <= 0:
            raise ValueError(f"`rho` must be positive, got {rho=}.")
        if max_order not in _ADAMS_BASHFORTH_WEIGHTS:
            raise ValueError(f"`max_order` must be one of 1, 2, 3 or 4, got {max_order=}.")
        if final_sigmas_type not in ("sigma_min", "zero"):
            raise ValueError(f"`final_sigmas_type` must be 'sigma_min' or 'zero', got {final_sigmas_type=}.")
        self._check_fitted_sigmas(fitted_sigmas or [])

        # setable values: there is no default schedule, `set_timesteps` must be called before sampling
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        # derivative history, oldest first; the last `lower_order_nums` entries are valid
        self.derivatives = [None] * max_order
        self.lower_order_nums = 0
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    @classmethod
    def _get_compatibles(cls) -> list[type[SchedulerMixin]]:
        # `SchedulerMixin` resolves the names in the `diffusers` namespace, where `IPNDMScheduler` is diffusers' own
        # (DDPM-based) scheduler: list this class instead.
        return [cls] + [c for c in super()._get_compatibles() if c.__name__ != cls.__name__]

    def __getattr__(self, name: str) -> Any:
        # Python answers an AttributeError raised inside a property by calling `__getattr__`, whose generic "has no
        # attribute" error would hide why `init_noise_sigma` is missing: raise the schedule's own error again.
        if name == "init_noise_sigma":
            self._check_timesteps_set()
        return super().__getattr__(name)

    @property
    def init_noise_sigma(self) -> float:
        """
        Return the standard deviation of the initial latents.

        Without the analytical first step this is `sigma_0 = sigma_max`. With it, the latents are `x_1 = k * x_0`,
        the result of the first Euler step `x_1 = x_0 + (sigma_1 - sigma_0) * d_0` with `d_0 = x_0 / sqrt(1 +
        sigma_0**2)`, so this is `sigma_0 * k` with `k = (sqrt(1 + sigma_0**2) + sigma_1 - sigma_0) / sqrt(1 +
        sigma_0**2)`. As it depends on the schedule, `set_timesteps` must be called first: before, reading it raises
        [`ScheduleNotSetError`] (a `ValueError` and an `AttributeError`, so `hasattr` returns `False`).

        Returns:
            `float`:
                The standard deviation of the initial latents.
        """
        self._check_timesteps_set()
        sigma_0 = self.sigmas[0].item()
        if not self.config.analytical_first_step:
            return sigma_0
        sigma_1 = self.sigmas[1].item()
        return sigma_0 * (math.sqrt(1 + sigma_0**2) + sigma_1 - sigma_0) / math.sqrt(1 + sigma_0**2)

    @property
    def step_index(self) -> int:
        """
        Return the index counter for the current timestep. The index will increase by 1 after each scheduler step.

        Returns:
            `int` or `None`:
                The current step index, or `None` if not yet initialized.
        """
        return self._step_index

    @property
    def begin_index(self) -> int:
        """
        Return the index for the first timestep. This should be set from the pipeline with the `set_begin_index`
        method.

        Returns:
            `int` or `None`:
                The begin index, or `None` if not yet set.
        """
        return self._begin_index

    # Copied from diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler.set_begin_index
    def set_begin_index(self, begin_index: int = 0) -> None:
        """
        Sets the begin index for the scheduler. This function should be run from pipeline before the inference.

        Args:
            begin_index (`int`, defaults to `0`):
                The begin index for the scheduler.
        """
        self._begin_index = begin_index

    # Copied from diffusers.schedulers.scheduling_edm_euler.EDMEulerScheduler.precondition_inputs
    def precondition_inputs(self, sample: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        Precondition the input sample by scaling it according to the EDM formulation.

        Args:
            sample (`torch.Tensor`):
                The input sample tensor to precondition.
            sigma (`float` or `torch.Tensor`):
                The current sigma (noise level) value: a float, or a tensor that broadcasts against `sample`, e.g.
                of shape `(batch_size, 1, 1, 1)`.

        Returns:
            `torch.Tensor`:
                The scaled input sample `c_in * sample`, `c_in = 1 / sqrt(sigma**2 + sigma_data**2)`.
        """
        c_in = self._get_conditioning_c_in(sigma)
        scaled_sample = sample * c_in
        return scaled_sample

    def precondition_noise(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """
        Precondition the noise level by applying a logarithmic transformation.

        Args:
            sigma (`float` or `torch.Tensor`):
                The sigma (noise level) value to precondition: a float, or a tensor of any shape.

        Returns:
            `torch.Tensor`:
                The preconditioned noise value `c_noise = 0.25 * log(sigma)`, of the same shape as `sigma` (shape
                `(1,)` for a float, as in `EDMEulerScheduler`).
        """
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])

        c_noise = 0.25 * torch.log(sigma)

        return c_noise

    def precondition_outputs(
        self,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        sigma: float | torch.Tensor,
    ) -> torch.Tensor:
        """
        Precondition the model outputs according to the EDM formulation.

        Args:
            sample (`torch.Tensor`):
                The input sample tensor.
            model_output (`torch.Tensor`):
                The direct output `F` from the learned diffusion model.
            sigma (`float` or `torch.Tensor`):
                The current sigma (noise level) value: a float, or a tensor that broadcasts against `sample`, e.g.
                of shape `(batch_size, 1, 1, 1)`.

        Returns:
            `torch.Tensor`:
                The denoised sample `D = c_skip * sample + c_out * model_output`, with `c_skip = sigma_data**2 /
                (sigma**2 + sigma_data**2)` and `c_out = sigma * sigma_data / sqrt(sigma**2 + sigma_data**2)`.
        """
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5

        denoised = c_skip * sample + c_out * model_output

        return denoised

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """
        Scale the denoising model input by `c_in` of the current noise level. Ensures interchangeability with
        schedulers that need to scale the denoising model input depending on the current timestep.

        Args:
            sample (`torch.Tensor`):
                The input sample tensor.
            timestep (`float` or `torch.Tensor`):
                The current timestep, one of `scheduler.timesteps`.

        Returns:
            `torch.Tensor`:
                A scaled input sample.
        """
        self._check_timesteps_set()
        if self.step_index is None:
            self._init_step_index(timestep)

        sigma = self.sigmas[self._sigma_index()]
        sample = self.precondition_inputs(sample, sigma)

        self.is_scale_input_called = True
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """
        Sets the polynomial sigma schedule and the timesteps used for the diffusion chain (to be run before
        inference).

        The schedule has `N = num_inference_steps + 2` points with the analytical first step and `N =
        num_inference_steps + 1` without it, `sigma_i = (sigma_max**(1/rho) + i / (N - 1) * (sigma_min**(1/rho) -
        sigma_max**(1/rho)))**rho` (with `final_sigmas_type="zero"`: `N - 1` such points and a final 0). It is
        computed in float64 and stored in float32 on the CPU in `sigmas`. If the config holds a schedule fitted for
        `num_inference_steps` (`fitted_sigmas`), that schedule is used instead.

        Args:
            num_inference_steps (`int`):
                The number of function evaluations (model calls), at least 1.
            device (`str` or `torch.device`, *optional*):
                The device to which the timesteps should be moved to. If `None`, the timesteps are not moved.
        """
        if not isinstance(num_inference_steps, numbers.Integral) or num_inference_steps < 1:
            raise ValueError(
                "`num_inference_steps` is the number of model calls and must be an integer >= 1, got "
                f"{num_inference_steps!r}."
            )
        self.num_inference_steps = int(num_inference_steps)

        # kept on the CPU to avoid too much CPU/GPU communication
        self.sigmas = self._schedule(self.num_inference_steps).to(torch.float32)

        first_call = self._sigma_offset()
        self.timesteps = self.precondition_noise(self.sigmas[first_call:-1]).to(device)

        self.derivatives = [None] * self.config.max_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(
        self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        """
        Find the index of a given timestep in the timestep schedule.

        Args:
            timestep (`float` or `torch.Tensor`):
                The timestep value to find in the schedule.
            schedule_timesteps (`torch.Tensor`, *optional*):
                The timestep schedule to search in. If `None`, uses `self.timesteps`.

        Returns:
            `int`:
                The index of the timestep in the schedule. For the very first step, returns the second index if
                multiple matches exist to avoid skipping a sigma when starting mid-schedule (e.g., for image-to-image).
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps

        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"Timestep {timestep} is not in the schedule: pass one of `scheduler.timesteps` (the values, not "
                "their positions from `enumerate`)."
            )

        # The sigma index that is taken for the **very** first `step`
        # is always the second index (or the last index if there is only 1)
        # This way we can ensure we don't accidentally skip a sigma in
        # case we start in the middle of the denoising schedule (e.g. for image-to-image)
        pos = 1 if len(indices) > 1 else 0

        return indices[pos].item()

    # Copied from diffusers.schedulers.scheduling_euler_discrete.EulerDiscreteScheduler._init_step_index
    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        """
        Initialize the step index for the scheduler based on the given timestep.

        Args:
            timestep (`float` or `torch.Tensor`):
                The current timestep to initialize the step index from.
        """
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> IPNDMSchedulerOutput | tuple:
        """
        Advance the sample from the current noise level `sigma_i` to the next one `sigma_{i+1}` with one
        Adams-Bashforth step of the probability-flow ODE, using the derivative `d_i = (x_i - D) / sigma_i` from the
        model output and up to `max_order - 1` previous derivatives.

        The arithmetic runs in float32 (or float64 for a float64 sample); the outputs have the dtype of `sample`.

        Args:
            model_output (`torch.Tensor`):
                The direct output `F` from the learned diffusion model.
            timestep (`float` or `torch.Tensor`):
                The current timestep, one of `scheduler.timesteps`.
            sample (`torch.Tensor`):
                The current sample `x_i` at noise level `sigma_i`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether or not to return an [`~schedulers.scheduling_ipndm.IPNDMSchedulerOutput`] or tuple.

        Returns:
            [`~schedulers.scheduling_ipndm.IPNDMSchedulerOutput`] or `tuple`:
                If `return_dict` is `True`, an [`~schedulers.scheduling_ipndm.IPNDMSchedulerOutput`] is returned,
                otherwise a tuple is returned where the first element is the next sample and the second element is
                the denoised sample `D`.
        """
        self._check_timesteps_set()
        if not self.is_scale_input_called:
            logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example."
            )

        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError(
                f"`step` was called more often than the {len(self.timesteps)} timesteps set by `set_timesteps`; call "
                "`set_timesteps` again before a new sampling run."
            )

        # Upcast to avoid precision issues when computing prev_sample
        compute_dtype = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(compute_dtype)
        model_output = model_output.to(compute_dtype)

        sigma_index = self._sigma_index()
        sigma = self.sigmas[sigma_index].item()
        sigma_next = self.sigmas[sigma_index + 1].item()

        if self.config.analytical_first_step and self.step_index == 0:
            # the latents are x_1 = x_0 + (sigma_1 - sigma_0) * d_0 with d_0 = x_0 / sqrt(1 + sigma_0^2) (see
            # `init_noise_sigma`): recover d_0 from x_1 and put it into the history before d_1
            sigma_0 = self.sigmas[0].item()
            self._push_derivative(x / (math.sqrt(1 + sigma_0**2) + sigma - sigma_0))

        # 1. the denoised sample and the ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3)
        denoised = self.precondition_outputs(x, model_output, sigma)
        self._push_derivative((x - denoised) / sigma)

        # 2. one Adams-Bashforth step over the last `order` derivatives
        order = self.lower_order_nums
        if self.config.variable_step:
            history_sigmas = self.sigmas[sigma_index - order + 1 : sigma_index + 1].flip(0).tolist()
            weights = variable_step_adams_bashforth_weights(history_sigmas, sigma_next)
        else:
            weights = adams_bashforth_weights(order)
        newest_first = self.derivatives[::-1]
        prev_sample = x + (sigma_next - sigma) * sum(w * d for w, d in zip(weights, newest_first))

        # Cast back to the dtype of the input sample
        prev_sample = prev_sample.to(sample.dtype)
        denoised = denoised.to(sample.dtype)

        # upon completion increase step index by one
        self._step_index += 1

        if not return_dict:
            return (prev_sample, denoised)

        return IPNDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: float | torch.Tensor | None = None,
        *,
        sigmas: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Add noise to the original samples: `original_samples + sigma * noise`, at the noise levels of `timesteps` (as
        in `EDMEulerScheduler.add_noise`) or at the noise levels `sigmas` themselves (for training with continuous
        per-sample noise levels). Pass exactly one of them.

        Args:
            original_samples (`torch.Tensor`):
                The original samples, of shape `(batch_size, ...)`.
            noise (`torch.Tensor`):
                The noise to add, of the same shape as `original_samples`.
            timesteps (`float` or `torch.Tensor`, *optional*):
                Timesteps `c_noise = ln(sigma) / 4`, e.g. from `scheduler.timesteps`: a float, or a tensor of shape
                `(batch_size,)` (or `(batch_size, 1, ..., 1)`). Each gives the noise level `sigma = exp(4 *
                timestep)`; for the timesteps of the schedule, the sigmas of the schedule.
            sigmas (`float` or `torch.Tensor`, *optional*):
                The noise levels, keyword only: a float, or a tensor of shape `(batch_size,)` (or `(batch_size, 1,
                ..., 1)`).

        Returns:
            `torch.Tensor`:
                The noisy samples.
        """
        if (timesteps is None) == (sigmas is None):
            raise ValueError(
                "Pass either `timesteps` (c_noise, as in diffusers' EDM schedulers) or `sigmas=` (the noise levels) "
                "to `add_noise`, not both and not neither."
            )
        if sigmas is None:
            timesteps = torch.as_tensor(timesteps, device=original_samples.device)
            sigmas = torch.exp(4 * timesteps.to(torch.promote_types(timesteps.dtype, torch.float32)))
        sigmas = torch.as_tensor(sigmas, dtype=original_samples.dtype, device=original_samples.device)
        sigmas = sigmas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        noisy_samples = original_samples + sigmas * noise
        return noisy_samples

    # Copied from diffusers.schedulers.scheduling_edm_euler.EDMEulerScheduler._get_conditioning_c_in
    def _get_conditioning_c_in(self, sigma: float | torch.Tensor) -> float | torch.Tensor:
        """
        Compute the input conditioning factor for the EDM formulation.

        Args:
            sigma (`float` or `torch.Tensor`):
                The current sigma (noise level) value.

        Returns:
            `float` or `torch.Tensor`:
                The input conditioning factor `c_in`.
        """
        c_in = 1 / ((sigma**2 + self.config.sigma_data**2) ** 0.5)
        return c_in

    def _formula_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The polynomial schedule for `num_inference_steps` model calls (see `set_timesteps`), float64."""
        num_points = num_inference_steps + 1 + self._sigma_offset()
        num_polynomial_points = num_points - 1 if self.config.final_sigmas_type == "zero" else num_points
        sigmas = karras_sigmas(num_polynomial_points, self.config.sigma_min, self.config.sigma_max, self.config.rho)
        if self.config.final_sigmas_type == "zero":
            sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
        return sigmas

    def _schedule_ends(self) -> tuple[float, float]:
        """The first and last sigma of every schedule of this config: sigma_max and the final point."""
        return self.config.sigma_max, 0.0 if self.config.final_sigmas_type == "zero" else self.config.sigma_min

    def _sigma_offset(self) -> int:
        """The index in `sigmas` of the first model call: 1 with the analytical first step, else 0."""
        return 1 if self.config.analytical_first_step else 0

    def _sigma_index(self) -> int:
        """The index in `sigmas` of the current noise level."""
        return self.step_index + self._sigma_offset()

    def _push_derivative(self, derivative: torch.Tensor) -> None:
        """Append a derivative to the history, dropping the oldest beyond `max_order`."""
        self.derivatives = self.derivatives[1:] + [derivative]
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.max_order)

    def _check_timesteps_set(self) -> None:
        """Raise a clear error when the schedule has not been set."""
        if self.num_inference_steps is None:
            raise ScheduleNotSetError(
                "The schedule is not set: call `set_timesteps(num_inference_steps)` after creating the scheduler."
            )
