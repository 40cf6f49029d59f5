"""benchmarks/gpu_throughput.py's arithmetic (the script itself was run on the CPU with the tiny preset)."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_throughput  # noqa: E402


def test_images_per_second_counts_the_windows_after_the_warm_up():
    # Windows of 50 steps of 10 images: (0, 50] is warm-up; (50, 100] takes 500 / 200 s, (100, 150] 500 / 400 s.
    metrics = [{"step": 50, "images_per_second": 100.0}, {"step": 100, "images_per_second": 200.0},
               {"step": 150, "images_per_second": 400.0}]
    assert gpu_throughput.images_per_second(metrics, batch=10, warmup_steps=50) == pytest.approx(1000 / 3.75)


def test_step_time_ratio_and_speedups():
    runs = {"qac_off": {"images_per_second": 500.0}, "qac_on": {"images_per_second": 1600.0},
            "baseline_on": {"images_per_second": 1700.0}}
    figures = gpu_throughput.summary({"args": {"device": "cuda"}, "runs": runs})
    assert figures["speedup_options_on_vs_off"] == pytest.approx(3.2)
    assert figures["qac_baseline_step_time_ratio_options_on"] == pytest.approx(1700 / 1600)
    assert figures["days_for_200_mimg"] == pytest.approx(200e6 / 1600 / 86400)
    assert "qac_baseline_step_time_ratio_options_off" not in figures  # its baseline run did not happen


def test_a_cpu_run_is_never_compared_with_the_gpu_figure():
    figures = gpu_throughput.summary({"args": {"device": "cpu"}, "runs": {"qac_on": {"images_per_second": 9.0}}})
    assert "speedup_vs_747" not in figures
