# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""An `evaluate` metric for the Frechet distance (and, on request, the KID) of two feature sets.

Load it by the path of this folder, installed with the package: `evaluate.load(FRECHET_DISTANCE_METRIC_PATH)` with
`from qac_diffusers.metrics import FRECHET_DISTANCE_METRIC_PATH`. This needs no network and no environment variable
(evaluate 0.4.6 opens no connection for a local script; for a folder it loads the script named after the folder).
evaluate copies the script into its modules cache (`HF_MODULES_CACHE`) and imports it from there, so the math comes
from the installed `qac_diffusers` (no relative imports here).
"""

import datasets
import evaluate
import torch

from qac_diffusers.metrics.frechet import frechet_distance, kernel_inception_distance


_DESCRIPTION = """
Frechet distance between Gaussians fitted to two feature sets, ||mu_p - mu_r||^2 + Tr(S_p + S_r - 2 (S_p S_r)^(1/2)):
FID when the features are those of the FID Inception-v3. With `kid_subsets > 0` it also returns the kernel inception
distance (unbiased MMD^2 with the kernel (x . y / d + 1)^3, averaged over random subsets). Extract the features first,
e.g. with `qac_diffusers.metrics.extract_features` and `InceptionFeatures` or `ClassifierFeatures`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape `(num_samples, feature_dim)`): Features of the generated images.
    references (`list` of `list` of `float`, shape `(num_samples, feature_dim)`): Features of the real images. evaluate
        stores predictions and references as the columns of one table, so both need the same number of samples; for
        sets of different sizes call `qac_diffusers.metrics.frechet_distance` directly.
    kid_subsets (`int`, defaults to 0): Number of KID subsets; 0 skips the KID.
    kid_subset_size (`int`, *optional*): Samples per KID subset; defaults to min(1000, num_samples).
    seed (`int`, defaults to 0): Seeds the KID subset draws.
Returns:
    frechet_distance (`float`): The Frechet distance.
    kernel_inception_distance, kernel_inception_distance_std (`float`): Mean and standard deviation of MMD^2 over the
        subsets; only with `kid_subsets > 0`.
Examples:
    >>> from qac_diffusers.metrics import FRECHET_DISTANCE_METRIC_PATH
    >>> metric = evaluate.load(FRECHET_DISTANCE_METRIC_PATH)
    >>> real = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]
    >>> shifted = [[1.0, 1.0], [2.0, 0.0], [3.0, 2.0]]  # the same covariance, the mean 1 further along x
    >>> round(metric.compute(predictions=shifted, references=real)["frechet_distance"], 6)
    1.0
"""

_CITATION = r"""
@inproceedings{heusel2017gans,
  title={{GANs} Trained by a Two Time-Scale Update Rule Converge to a Local {Nash} Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS},
  year={2017}
}
@inproceedings{binkowski2018demystifying,
  title={Demystifying {MMD} {GANs}},
  author={Bi{\'n}kowski, Miko{\l}aj and Sutherland, Danica J. and Arbel, Michael and Gretton, Arthur},
  booktitle={ICLR},
  year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FrechetDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references, kid_subsets=0, kid_subset_size=None, seed=0):
        # float64 explicitly: torch.tensor would round the Python floats to float32.
        generated = torch.tensor(predictions, dtype=torch.float64)
        real = torch.tensor(references, dtype=torch.float64)
        results = {"frechet_distance": frechet_distance(real, generated)}
        if kid_subsets > 0:
            generator = torch.Generator().manual_seed(seed)
            kid, kid_std = kernel_inception_distance(real, generated, kid_subsets, kid_subset_size, generator)
            results.update(kernel_inception_distance=kid, kernel_inception_distance_std=kid_std)
        return results
