"""Entry file for diffusers' `custom_pipeline` mechanism (needs `pip install qac-diffusers`).

    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained(
    ...     "path/to/model", custom_pipeline="pipelines/qac_pipeline.py", trust_remote_code=True
    ... )

diffusers picks the one `DiffusionPipeline` subclass this module holds.
"""

from qac_diffusers import QACPipeline  # noqa: F401
