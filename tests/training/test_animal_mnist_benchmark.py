"""benchmarks/few_step_quality_animal_mnist.py's records: settings and feature-space checks, and how seeds gather."""

import json
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import few_step_quality_animal_mnist as animal  # noqa: E402


SPACE = {"classifier_accuracy": 0.9, "floors": {"classifier": 2.0, "inception": 30.0, "nearest_median": 5.0,
                                                "heldout_duplicates": 0.01}}


def make_record(args, model: str, seed: int, shift: float) -> dict:
    """A record whose classifier FD is `shift` + the NFE for ipndm and `shift` + 2 * NFE for dpmsolver2."""
    nfes = [*map(str, args.nfe), str(args.reference_nfe)]
    return {
        "model": model, "seed": seed, "settings": {key: vars(args)[key] for key in animal.RECORDED_SETTINGS},
        "feature_space": SPACE,
        "frechet_distance": {"ipndm": {nfe: shift + int(nfe) for nfe in nfes},
                             "dpmsolver2": {nfe: shift + 2 * int(nfe) for nfe in map(str, args.nfe)}},
        "best_solver": dict.fromkeys(nfes, "ipndm"),
        "best_solver_measurements": {nfe: {"inception_fd": 10 * shift, "nearest_train": [1.0, 3.0]} for nfe in nfes},
        "curvature": shift, "L_CFM": shift / 10, "code_usage": None if model == "baseline" else {"codes_used": 7},
        "images_per_second": 20.0, "made_by": {"commit": "abc1234", "command": "python bench.py"},
    }


@pytest.fixture
def args(tmp_path):
    return animal.parse_args(["--records_dir", str(tmp_path), "--seeds", "0", "1", "2", "--nfe", "3", "5",
                              "--solvers", "ipndm", "dpmsolver2"])


def write(args, record: dict) -> None:
    path = Path(args.records_dir) / f"{record['model']}-seed{record['seed']}.json"
    path.write_text(json.dumps(record))


def test_gather_keeps_only_seeds_with_every_model_recorded(args):
    for model, seed in (("baseline", 0), ("qac", 0), ("baseline", 2), ("qac", 2), ("qac", 1)):
        write(args, make_record(args, model, seed, shift=seed + (0.5 if model == "qac" else 0)))
    gathered = animal.gather(args, animal.load_records(args))
    assert gathered["seeds"] == [0, 2]  # seed 1's baseline is missing
    assert gathered["frechet_distance"]["ipndm"]["qac"]["3"] == [3.5, 5.5]
    assert gathered["frechet_distance"]["dpmsolver2"]["baseline"]["5"] == [10, 12]
    assert gathered["straightness"]["qac"] == {"curvature": [0.5, 2.5], "L_CFM": [0.05, 0.25]}
    assert sorted(gathered["code_usage"]) == ["qac-seed0", "qac-seed2"]
    assert gathered["feature_space"] == SPACE


def test_best_sampler_cells_follow_each_seeds_own_best(args):
    first, second = make_record(args, "qac", 0, shift=0), make_record(args, "qac", 1, shift=1)
    second["best_solver"]["3"] = "dpmsolver2"
    for record in (first, second, make_record(args, "baseline", 0, 0), make_record(args, "baseline", 1, 0)):
        write(args, record)
    gathered = animal.gather(args, animal.load_records(args))
    assert animal.best_distances(gathered, "qac", "3") == [3, 7]  # ipndm's 0 + 3, then dpmsolver2's 1 + 2 * 3
    assert animal.solver_counts(gathered["best_solver"]["qac"]["3"]) == "ipndm, dpmsolver2"
    assert animal.solver_counts(["ipndm", "ipndm", "dpmsolver2"]) == "ipndm x2, dpmsolver2"
    table = "\n".join(animal.best_tables(args, gathered))
    assert "| 3 | 3.00 ± 0.00 (ipndm x2) | 5.00 ± 2.00 (ipndm, dpmsolver2) |" in table
    assert "| real vs held-out | 30.00 | 30.00 |" in table


def test_records_of_other_settings_or_another_feature_space_are_refused(args):
    record = make_record(args, "qac", 0, shift=0)
    other = animal.parse_args(["--records_dir", args.records_dir, "--max_train_steps", "10"])
    with pytest.raises(ValueError, match=r"other settings .*'max_train_steps': \(1400, 10\)"):
        animal.check_record(other, record, None)
    moved = {**SPACE, "floors": {**SPACE["floors"], "classifier": 2.1}}
    with pytest.raises(ValueError, match=r"another feature space .*\[0.9, 2.0, 0.01, 30.0, 5.0\], here \[0.9, 2.1, "):
        animal.check_record(args, record, moved)
    animal.check_record(args, record, {**SPACE, "classifier_accuracy": 0.9 + 1e-7})  # float noise is accepted
    reordered = animal.parse_args(["--records_dir", args.records_dir, "--nfe", "5", "3", "--solvers", "dpmsolver2",
                                   "ipndm"])
    animal.check_record(reordered, record, SPACE)  # the same NFEs and solvers in another order
    write(args, record)
    write(args, {**make_record(args, "baseline", 0, 0), "feature_space": moved})
    with pytest.raises(ValueError, match="another feature space"):
        animal.load_records(args)  # every record of the folder, not only those of the asked models and seeds


def test_a_record_under_another_name_is_refused(args):
    (Path(args.records_dir) / "qac-seed1.json").write_text(json.dumps(make_record(args, "qac", 0, shift=0)))
    with pytest.raises(ValueError, match="holds the record of qac, seed 0: its name must be qac-seed0.json"):
        animal.load_records(args)


def test_arguments_the_report_cannot_use_are_refused():
    with pytest.raises(ValueError, match="--inception_samples 600 must be <= --num_samples 500"):
        animal.parse_args(["--num_samples", "500", "--inception_samples", "600"])
    with pytest.raises(ValueError, match="--solvers must name ipndm"):
        animal.parse_args(["--solvers", "dpmsolver2"])
    with pytest.raises(ValueError, match="--nfe must not hold the reference"):
        animal.parse_args(["--nfe", "3", "30"])


def test_report_only_trains_and_measures_nothing(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("--only report trained or measured")

    monkeypatch.setattr(animal.fsq, "train_model", refuse)
    monkeypatch.setattr(animal, "feature_data", refuse)
    monkeypatch.setattr(sys, "argv", ["bench", "--only", "report", "--dataset", "digits", "--resolution", "8",
                                      "--work_dir", str(tmp_path / "work"), "--records_dir", str(tmp_path / "records"),
                                      "--results_dir", str(tmp_path / "results")])
    animal.main()
    assert "No seed has all of ['baseline', 'qac'] recorded yet: no report written." in capsys.readouterr().out
    assert not any((tmp_path / "results").iterdir())


def test_writes_are_renamed_into_place_and_a_concurrent_folder_is_kept(tmp_path):
    record = tmp_path / "record.json"
    animal.fsq.write_atomically(record, lambda partial: partial.write_text("old"))
    animal.fsq.write_atomically(record, lambda partial: partial.write_text("new"))
    assert record.read_text() == "new"

    def save_folder(text: str):
        def write(partial: Path) -> None:
            partial.mkdir()
            (partial / "config.json").write_text(text)
        return write

    folder = tmp_path / "feature-classifier"
    animal.fsq.write_atomically(folder, save_folder("first"))
    animal.fsq.write_atomically(folder, save_folder("second"))  # a concurrent run that finished later
    assert (folder / "config.json").read_text() == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["feature-classifier", "record.json"]

    with pytest.raises(FileNotFoundError):  # a failed write is not hidden
        animal.fsq.write_atomically(tmp_path / "missing.json", lambda partial: None)

    def fail_halfway(partial: Path) -> None:
        partial.mkdir()
        (partial / "config.json").write_text("half")
        raise RuntimeError("killed by the test")

    with pytest.raises(RuntimeError, match="killed by the test"):  # and leaves no partial folder behind
        animal.fsq.write_atomically(tmp_path / "half-written", fail_halfway)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["feature-classifier", "record.json"]
