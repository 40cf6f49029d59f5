from .qac import QACPipeline, QACPipelineOutput
