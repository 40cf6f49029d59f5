"""qac-diffusers: quantized adaptive conditions for few-step diffusion sampling, as a diffusers extension."""

__version__ = "0.1.0"

from .models import CodeEmbedding, FSQConditionEncoder, FSQConditionEncoderOutput, QACUNet2DModel
from .pipelines import QACImageEditPipeline, QACImageEditPipelineOutput, QACPipeline, QACPipelineOutput
from .schedulers import IPNDMScheduler, IPNDMSchedulerOutput
