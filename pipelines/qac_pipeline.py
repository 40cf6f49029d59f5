"""Entry file for diffusers' `custom_pipeline` mechanism, for folders saved before they shipped their own code.

A folder written by `QACPipeline.save_pretrained` now holds the code plain diffusers needs
(`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, see qac_diffusers/pipelines/qac/remote_code.py).
An older folder loads with this file, which needs qac_diffusers installed (from its source repository; it is not on
PyPI):

    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained(
    ...     "path/to/model", custom_pipeline="pipelines/qac_pipeline.py", trust_remote_code=True
    ... )

diffusers picks the one `DiffusionPipeline` subclass this module holds.
"""

from qac_diffusers import QACPipeline  # noqa: F401
