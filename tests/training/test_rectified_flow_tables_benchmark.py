"""benchmarks/rectified_flow_tables.py's tables: every row a valid train_qac.py run, and the report's orderings."""

import json
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import rectified_flow_tables as tables  # noqa: E402

import train_qac  # noqa: E402


@pytest.mark.parametrize("model", sorted(tables.MODEL_FLAGS))
def test_every_model_is_a_valid_rectified_flow_run(model):
    args = train_qac.parse_args(tables.MODEL_FLAGS[model])
    train_qac.check_args(args)
    assert args.formulation == "rectified_flow"


def test_rows_differ_only_in_their_encoders():
    parsed = {model: vars(train_qac.parse_args(flags)) for model, flags in tables.MODEL_FLAGS.items()}
    encoder_flags = {"condition", "code_dim", "code_levels", "noise_encoder"}
    others = [{key: value for key, value in args.items() if key not in encoder_flags} for args in parsed.values()]
    assert all(other == others[0] for other in others)
    assert parsed["fsq_L2_d20"]["code_dim"] == 20 and parsed["fsq_L8_d4"]["code_levels"] == 8
    assert parsed["rne_qac"]["noise_encoder"] == "shared" and parsed["vae"]["condition"] == "gaussian"


def test_every_table_row_is_a_model_and_tables_train_only_what_they_need():
    for table in tables.TABLES.values():
        assert set(table.rows.values()) <= {*tables.MODEL_FLAGS, tables.OFFLINE}
        assert set(table.paper) <= set(table.rows)
    assert tables.models_of([2]) == ["qac"]  # the offline-weights row is made from the trained QAC model
    assert tables.models_of([1, 5]) == ["rectified_flow", "rne", "qac", "rne_qac"]


def test_report_orders_rows_best_first_for_ours_and_the_paper():
    values = {
        "Rectified flow": {"heun 5": [30.0, 32.0], "heun 7": [20.0, 20.0], "heun 9": [9.0, 9.0]},
        "w/ RNE only": {"heun 5": [25.0, 25.0], "heun 7": [21.0, 21.0], "heun 9": [10.0, 10.0]},
        "w/ QAC only": {"heun 5": [20.0, 20.0], "heun 7": [19.0, 19.0], "heun 9": [11.0, 11.0]},
        "w/ RNE & QAC": {"heun 5": [19.0, 19.0], "heun 7": [18.0, 18.0], "heun 9": [12.0, 12.0]},
    }
    report = tables.markdown_table(5, tables.TABLES[5], values, {"seeds": [0, 1], "num_samples": 2000})
    assert "Measured with: seeds [0, 1], num_samples 2000." in report
    assert "| Rectified flow | 31.00 ± 1.00 | 20.00 ± 0.00 | 9.00 ± 0.00 | 37.19 | 18.6 | 12.92 |" in report
    assert ("- heun 5, best first: ours w/ RNE & QAC < w/ QAC only < w/ RNE only < Rectified flow; paper w/ RNE & "
            "QAC < w/ QAC only < w/ RNE only < Rectified flow") in report
    assert "- heun 9, best first: ours Rectified flow < w/ RNE only < w/ QAC only < w/ RNE & QAC;" in report


def test_a_model_folder_trained_otherwise_is_refused(tmp_path):
    args = tables.parse_args(["--work_dir", str(tmp_path)])
    trained = vars(train_qac.parse_args([*tables.MODEL_FLAGS["qac"], "--max_train_steps", "1200"]))
    (tmp_path / "training_config.json").write_text(json.dumps({"args": trained}))
    tables.check_reused_model(args, tmp_path, tables.MODEL_FLAGS["qac"])
    edm = {**trained, "formulation": "edm"}  # e.g. few_step_quality.py's "qac-seed0"
    (tmp_path / "training_config.json").write_text(json.dumps({"args": edm}))
    with pytest.raises(ValueError, match=r"'formulation': \('edm', 'rectified_flow'\)"):
        tables.check_reused_model(args, tmp_path, tables.MODEL_FLAGS["qac"])


def test_a_cached_cell_loads_no_pipeline(tmp_path, monkeypatch):
    args = tables.parse_args(["--work_dir", str(tmp_path), "--num_samples", "100"])
    cached = {"frechet_distance heun nfe 5 100 samples": 12.5,
              f"frechet_distance rk45 100 samples {args.rk45_batch_size} per solve": [11.0, 80]}
    (tmp_path / "benchmark_measurements.json").write_text(json.dumps(cached))

    def refuse(*args, **kwargs):
        raise AssertionError("a cached value loaded its pipeline")

    monkeypatch.setattr(tables.QACPipeline, "from_pretrained", refuse)
    assert tables.measure(args, tmp_path, 0, "heun 5", None, None, None) == 12.5
    assert tables.measure(args, tmp_path, 0, "rk45 NFE", None, None, None) == 80
    with pytest.raises(AssertionError, match="loaded its pipeline"):
        tables.measure(args, tmp_path, 0, "heun 7", None, None, None)  # not cached: loads
