from .qac import (
    LinearDegradation,
    QACImageEditPipeline,
    QACImageEditPipelineOutput,
    QACPipeline,
    QACPipelineOutput,
    colorization,
    inpainting,
    super_resolution,
)
