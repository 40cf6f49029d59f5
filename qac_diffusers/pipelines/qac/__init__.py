from .pipeline_qac import QACPipeline, QACPipelineOutput
