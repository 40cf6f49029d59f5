import os

from .feature_networks import (
    ClassifierFeatures,
    FeatureNetwork,
    InceptionFeatures,
    extract_features,
    train_feature_classifier,
)
from .frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_images,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    kernel_inception_distance_from_images,
)
from .trajectory import (
    conditional_flow_matching_loss,
    pipeline_conditional_flow_matching_loss,
    pipeline_curvature,
    pipeline_denoiser,
    trajectory_curvature,
)


# The folder of the `evaluate` metric, installed with the package: `evaluate.load(FRECHET_DISTANCE_METRIC_PATH)`.
FRECHET_DISTANCE_METRIC_PATH = os.path.join(os.path.dirname(__file__), "frechet_distance")
