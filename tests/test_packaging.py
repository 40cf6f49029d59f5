"""What a `pip install` of the package ships, beyond the Python modules."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import evaluate

from qac_diffusers.metrics import FRECHET_DISTANCE_METRIC_PATH


REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_SCRIPT = "qac_diffusers/metrics/frechet_distance/frechet_distance.py"


def test_the_metric_path_is_in_the_package_and_loads_offline():
    assert Path(FRECHET_DISTANCE_METRIC_PATH) == REPO_ROOT / "qac_diffusers" / "metrics" / "frechet_distance"
    metric = evaluate.load(FRECHET_DISTANCE_METRIC_PATH)
    features = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]
    shifted = [[x + 1.0, y] for x, y in features]
    # Same covariance, means 1 apart along one axis: the Frechet distance is |mu_a - mu_b|^2 = 1.
    result = metric.compute(predictions=shifted, references=features)
    assert abs(result["frechet_distance"] - 1.0) < 1e-9


def test_the_wheel_ships_the_metric_script_and_the_model_card_template(tmp_path):
    # Built from a copy, so that the build leaves nothing in the checkout.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("qac_diffusers", "model_cards"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=ignore)
    for file in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy(REPO_ROOT / file, source / file)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, source]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("qac_diffusers-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert METRIC_SCRIPT in names
    assert "qac_diffusers/model_cards/qac_model_card.md" in names
