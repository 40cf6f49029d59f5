from .editing_operators import LinearDegradation, colorization, inpainting, super_resolution
from .pipeline_qac import QACPipeline, QACPipelineOutput
from .pipeline_qac_edit import QACImageEditPipeline, QACImageEditPipelineOutput
