"""A saved QAC pipeline ships its code: plain diffusers loads it with `trust_remote_code=True` (issue 12)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from conftest import make_tiny_pipeline, seeded
from qac_diffusers import FSQConditionEncoder, IPNDMScheduler, QACImageEditPipeline, QACPipeline, QACUNet2DModel
from qac_diffusers.models.fingerprint import model_fingerprint
from qac_diffusers.pipelines.qac import pipeline_qac
from qac_diffusers.pipelines.qac.remote_code import shipped_source
from qac_diffusers.training.code_usage import code_usage
from qac_diffusers.training.hub import push_to_hub, write_model_card


ROOT_MODULES = {
    "pipeline_qac.py",
    "pipeline_qac_edit.py",
    "editing_operators.py",
    "unet_2d_qac.py",
    "fsq_condition_encoder.py",
    "edm_denoiser.py",
    "fingerprint.py",
    "scheduling_ipndm.py",
    "fitted_schedules.py",
    "gaussian_condition_encoder.py",
    # the formulations (issue 9), the package's __init__ as formulations.py, and the EDM modules edm.py imports
    "formulations.py",
    "base.py",
    "edm.py",
    "rectified_flow.py",
    "scheduling_flow_match_euler_fitted.py",
    "scheduling_flow_match_heun_fitted.py",
    "solvers.py",
    "edm_loss.py",
    "qac_pipeline.py",
    "qac_image_edit.py",
}
SHIPPED_ENTRIES = {
    "_class_name": ["qac_pipeline", "QACPipeline"],
    "unet": ["unet_2d_qac", "QACUNet2DModel"],
    "encoder": ["fsq_condition_encoder", "FSQConditionEncoder"],
    "scheduler": ["scheduling_ipndm", "IPNDMScheduler"],
}
PACKAGE_ENTRIES = {
    "_class_name": "QACPipeline",
    "unet": ["qac_diffusers.models.unet_2d_qac", "QACUNet2DModel"],
    "encoder": ["qac_diffusers.models.fsq_condition_encoder", "FSQConditionEncoder"],
    "scheduler": ["qac_diffusers.schedulers.scheduling_ipndm", "IPNDMScheduler"],
}
# Run by a Python that cannot import qac_diffusers (it is installed in the venv, editable: a meta-path finder refuses
# it): load with plain diffusers by repo id and from a folder, sample, save the arrays.
PLAIN_DIFFUSERS_SCRIPT = r'''
import json, sys
import numpy as np
import torch


class NoQAC:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "qac_diffusers":
            raise ImportError(f"{name} is not installed here")


sys.meta_path.insert(0, NoQAC())
try:
    import qac_diffusers  # noqa: F401
    sys.exit("qac_diffusers is importable: the block failed")
except ImportError:
    pass
from diffusers import DiffusionPipeline

repo_id, folder, out = sys.argv[1:]
kinds = {}


def sample(name, pipe):
    pipe.set_progress_bar_config(disable=True)
    output = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    np.save(f"{out}/{name}.npy", output.images)
    np.save(f"{out}/{name}_codes.npy", output.code_indices.numpy())
    kinds[name] = [type(pipe).__module__, type(pipe.unet).__module__, type(pipe.encoder).__module__,
                   type(pipe.scheduler).__module__]


sample("repo", DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True))
sample("folder", DiffusionPipeline.from_pretrained(folder, trust_remote_code=True))
edit = DiffusionPipeline.from_pretrained(repo_id, custom_pipeline="qac_image_edit", trust_remote_code=True)
edit.set_progress_bar_config(disable=True)
image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
mask = torch.zeros(8, 8)
mask[2:6, 3:7] = 1
edited = edit(image, task="inpaint", mask=mask, num_inference_steps=5, generator=torch.Generator().manual_seed(1),
              output_type="np")
np.save(f"{out}/edit.npy", edited.images)
kinds["edit"] = [type(edit).__name__, type(edit).__module__]
json.dump({"kinds": kinds, "qac_modules": sorted(m for m in sys.modules if m.startswith("qac_diffusers"))},
          open(f"{out}/kinds.json", "w"))
'''


# A schedule "fitted" at NFE 4, the NFE the routes are compared at: both must find it in the config and sample on it,
# and both must accept it as fitted to this model (its fingerprint computed by the package and by the shipped code).
FITTED_AT_NFE_4 = [80.0, 20.0, 3.0, 0.8, 0.1, 0.002]


@pytest.fixture
def saved(tmp_path) -> tuple[QACPipeline, Path]:
    pipe = make_tiny_pipeline()
    fingerprint = model_fingerprint(pipe.unet, pipe.encoder)
    pipe.scheduler = IPNDMScheduler(fitted_sigmas=[FITTED_AT_NFE_4], fitted_model_fingerprint=fingerprint)
    pipe.save_pretrained(tmp_path / "model")
    return pipe, tmp_path / "model"


def sample(pipe: QACPipeline) -> tuple[np.ndarray, np.ndarray]:
    pipe.set_progress_bar_config(disable=True)
    output = pipe(batch_size=3, num_inference_steps=4, generator=seeded(0), output_type="np")
    return output.images, output.code_indices.numpy()


def test_the_folder_ships_the_code_diffusers_loads(saved):
    _, folder = saved
    model_index = json.loads((folder / "model_index.json").read_text())
    assert {key: model_index[key] for key in SHIPPED_ENTRIES} == SHIPPED_ENTRIES
    assert {path.name for path in folder.glob("*.py")} == ROOT_MODULES
    for name, (module, _) in SHIPPED_ENTRIES.items():
        if name != "_class_name":  # each component's module, with the scheduler's base of fitted schedules
            imported = ["fitted_schedules.py"] if name == "scheduler" else []
            assert sorted(path.name for path in (folder / name).glob("*.py")) == sorted([f"{module}.py", *imported])


def test_shipped_code_is_the_library_with_sibling_imports(saved):
    _, folder = saved
    shipped = (folder / "pipeline_qac.py").read_text()
    assert shipped == shipped_source(pipeline_qac)
    assert shipped.startswith("# Generated from qac_diffusers/pipelines/qac/pipeline_qac.py by qac-diffusers")
    assert "from .fsq_condition_encoder import FSQConditionEncoder\n" in shipped
    assert "from .unet_2d_qac import QACUNet2DModel\n" in shipped
    assert "from .base import Formulation\nfrom .formulations import formulation_from_name\n" in shipped
    # the package-only methods are left out; the rest of the class is the library's text
    assert "def save_pretrained" not in shipped and "def load_config" not in shipped
    assert "def interpolation_codes(" in shipped
    source_lines = Path(pipeline_qac.__file__).read_text().splitlines()
    assert len(shipped.splitlines()) < len(source_lines)
    for path in [*folder.glob("*.py"), *folder.glob("*/*.py")]:
        tree = ast.parse(path.read_text())
        absolute = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0]
        assert not [module for module in absolute if module.startswith("qac_diffusers")], path
        # scipy (RK45 only) is imported where it is used, so plain diffusers loads and samples without it
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert not [node for node in top_level if "scipy" in ast.unparse(node)], path
    edit_entry = (folder / "qac_image_edit.py").read_text()
    assert "from .pipeline_qac_edit import QACImageEditPipeline  # noqa: F401\n" in edit_entry
    assert "from .pipeline_qac import __name__ as _pipeline_qac  # noqa: F401\n" in edit_entry


def test_the_package_loads_new_folders_with_its_own_classes(saved):
    pipe, folder = saved
    loaded = QACPipeline.from_pretrained(folder)  # no trust_remote_code: the shipped code is not run
    assert type(loaded) is QACPipeline
    assert (type(loaded.unet), type(loaded.encoder), type(loaded.scheduler)) == (
        QACUNet2DModel,
        FSQConditionEncoder,
        IPNDMScheduler,
    )
    assert all(np.array_equal(a, b) for a, b in zip(sample(loaded), sample(pipe)))
    loaded.scheduler.set_timesteps(4)  # `sample` ran on the fitted schedule
    assert loaded.scheduler.sigmas.tolist() == pytest.approx(FITTED_AT_NFE_4, rel=1e-6)
    assert type(QACImageEditPipeline.from_pretrained(folder)) is QACImageEditPipeline


def test_the_package_loads_folders_saved_before_the_code_was_shipped(saved):
    pipe, folder = saved
    for path in [*folder.glob("*.py"), *folder.glob("*/*.py")]:
        path.unlink()
    # what save_pretrained wrote before: full module paths, `_class_name` a string
    model_index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**model_index, **PACKAGE_ENTRIES}))
    loaded = QACPipeline.from_pretrained(folder)
    assert type(loaded.unet) is QACUNet2DModel
    assert all(np.array_equal(a, b) for a, b in zip(sample(loaded), sample(pipe)))


def test_a_saved_edit_pipeline_names_its_entry_file(tmp_path):
    pipe = make_tiny_pipeline(pipeline_class=QACImageEditPipeline)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == [
        "qac_image_edit",
        "QACImageEditPipeline",
    ]
    assert type(QACImageEditPipeline.from_pretrained(tmp_path)) is QACImageEditPipeline


def test_plain_diffusers_without_trust_remote_code_says_how_to_load(saved):
    _, folder = saved
    with pytest.raises(ValueError, match=r"custom code.*\n.*Pass `trust_remote_code=True`"):
        DiffusionPipeline.from_pretrained(folder)


def test_plain_diffusers_loads_the_pushed_model_bit_for_bit(saved, fake_hub, tmp_path):
    """Push, then load by repo id and from the folder in a Python without qac_diffusers; compare with the package."""
    pipe, folder = saved
    repo_id = push_to_hub(folder, "tiny-remote-code")
    assert {"qac_pipeline.py", "unet/unet_2d_qac.py"} <= set(fake_hub.files(repo_id))
    with pytest.raises(ValueError, match="Pass `trust_remote_code=True`"):
        DiffusionPipeline.from_pretrained(repo_id)

    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "plain_diffusers.py"
    script.write_text(PLAIN_DIFFUSERS_SCRIPT)
    # -I: no PYTHONPATH, no current folder on sys.path; the loopback Hub's endpoint and cache are in the environment
    command = [sys.executable, "-I", str(script), repo_id, str(folder), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr[-3000:]

    kinds = json.loads((out / "kinds.json").read_text())
    assert kinds["qac_modules"] == []
    assert all(module.startswith("diffusers_modules.") for module in kinds["kinds"]["repo"])
    assert kinds["kinds"]["edit"][0] == "QACImageEditPipeline"
    images, code_indices = sample(QACPipeline.from_pretrained(repo_id))
    for route in ("repo", "folder"):
        assert np.array_equal(np.load(out / f"{route}.npy"), images)
        assert np.array_equal(np.load(out / f"{route}_codes.npy"), code_indices)
    edit = QACImageEditPipeline.from_pretrained(repo_id)
    edit.set_progress_bar_config(disable=True)
    mask = torch.zeros(8, 8)
    mask[2:6, 3:7] = 1
    image = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    edited = edit(image, task="inpaint", mask=mask, num_inference_steps=5, generator=seeded(1), output_type="np")
    assert np.array_equal(np.load(out / "edit.npy"), edited.images)


def test_model_card_leads_with_plain_diffusers(saved):
    pipe, folder = saved
    card = write_model_card(
        folder,
        repo_id="fake-user/tiny",
        dataset_name="digits",
        training_config={},
        code_usage=code_usage(pipe.encoder.code_weights),
        training_facts={"steps": 1, "images_seen": 2, "final_loss": 0.5},
    ).read_text()
    plain = card.index('DiffusionPipeline.from_pretrained("fake-user/tiny", trust_remote_code=True)')
    assert plain < card.index('QACPipeline.from_pretrained("fake-user/tiny")')
    assert f"generated with diffusers {diffusers.__version__} " in card
    assert "pip install" not in card and "not on PyPI" in card
