# Copyright 2026 The qac-diffusers authors. Licensed under the Apache License, Version 2.0.
"""The model card of a trained pipeline and its upload to the Hugging Face Hub (DESIGN.md section 1).

The card follows diffusers' training scripts (`diffusers.utils.hub_utils.load_or_create_model_card`): a
`huggingface_hub.ModelCard` rendered from a Jinja template with `ModelCardData` as its YAML metadata. The template is
the repository's `model_cards/qac_model_card.md`; an installed wheel ships it as `qac_diffusers/model_cards/`.
"""

import glob
import json
import os
from collections.abc import Callable, Collection, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from .data import BUILTIN_DATASETS


TEMPLATE_NAME = "qac_model_card.md"
TAGS = ["qac", "diffusers", "diffusers-training", "unconditional-image-generation"]
# What `qac_diffusers.training.code_usage.code_usage` returns; the card shows all of it.
CODE_USAGE_KEYS = ("codes_used", "entropy_bits", "perplexity", "largest_share", "codes_for_half_weight")
TRAINING_FACT_KEYS = ("steps", "images_seen", "final_loss")
# Top-level files uploaded beside the pipeline's component folders: the card, sample grids, model_index.json, the
# training configuration and the code `save_pretrained` ships for plain diffusers (.py); hidden names (.tmp-* files
# being written) excluded. Anything else (checkpoint-*, logs/, temporary folders, optimizer states) stays local.
UPLOADED_SUFFIXES = (".png", ".json", ".py")
CARD_NAME = "README.md"
# What the card says of each formulation, the `formulation` that model_index.json records.
FORMULATION_CARD_FIELDS = {
    "edm": {"loss_name": "EDM loss", "denoiser_name": "an EDM-preconditioned UNet"},
    "rectified_flow": {
        "loss_name": "rectified-flow loss", "denoiser_name": "a UNet that predicts the velocity of rectified flow"
    },
}
# What `num_inference_steps` means with the saved scheduler, by its class (none for other schedulers).
SAMPLER_NOTES = {
    "FlowMatchEulerDiscreteScheduler": 'N Euler steps of 1 / N; for Heun, set `pipe.scheduler = '
    'pipe.formulation.solver("heun")` and pass an odd NFE',
    "FlowMatchHeunDiscreteScheduler": "an odd NFE: (N + 1) / 2 Heun steps of equal length, the last one Euler",
}
# Uploaded files not searched for private strings before an upload: weights, large and never holding text.
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENS_URL = "https://huggingface.co/settings/tokens"


def default_template_path() -> Path:
    """The card template: in `qac_diffusers/model_cards/` when installed from a wheel, else in the repository's
    top-level `model_cards/` (a source checkout or an editable install)."""
    package_root = Path(__file__).resolve().parents[1]
    installed = package_root / "model_cards" / TEMPLATE_NAME
    return installed if installed.is_file() else package_root.parent / "model_cards" / TEMPLATE_NAME


def _check_output_dir(output_dir: str | os.PathLike) -> Path:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise OSError(
            f"{output_dir} does not exist or is not a folder. Save the trained pipeline there first with "
            "`pipeline.save_pretrained(output_dir)`."
        )
    if not (output_dir / "model_index.json").is_file():
        raise OSError(
            f"{output_dir} has no model_index.json: it holds no saved pipeline. Call "
            "`pipeline.save_pretrained(output_dir)` before writing the card or pushing."
        )
    return output_dir


def without_local_paths(config: Any, path_keys: Collection[str] = ()) -> Any:
    r"""
    A copy of a (nested) configuration that names no folder of this machine, to publish or to write beside a model.

    The values of `path_keys` (at any depth) and every absolute path become their last component:
    `{"train_data_dir": "/home/me/data/faces"}` becomes `{"train_data_dir": "faces"}`. `os.PathLike` values become
    strings. Relative paths outside `path_keys` are kept: nothing tells them apart from other strings.

    Args:
        config (`Any`):
            A JSON-like value: dicts, lists, tuples, strings, numbers, paths.
        path_keys (`Collection[str]`, *optional*):
            The keys whose string values are local paths, relative or absolute.

    Returns:
        `Any`: the same structure with the paths shortened (tuples become lists, as in JSON).
    """
    return _without_local_paths(None, config, path_keys)


def _without_local_paths(key: str | None, value: Any, path_keys: Collection[str]) -> Any:
    if isinstance(value, dict):
        return {name: _without_local_paths(name, item, path_keys) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_local_paths(key, item, path_keys) for item in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and (key in path_keys or os.path.isabs(value)):
        return Path(os.path.abspath(value)).name  # abspath: "." or "runs/.." is named after the folder it means
    return value


def _check_keys(name: str, values: dict, required: tuple[str, ...]) -> None:
    missing = [key for key in required if key not in values]
    if missing:
        raise ValueError(f"`{name}` lacks {missing}: it must hold {list(required)}.")


def _check_card_inputs(
    code_usage: dict | None, training_facts: dict, sample_grid: str | None, is_baseline: bool, has_codebook: bool
) -> None:
    if is_baseline and code_usage is not None:
        raise ValueError("A baseline has no codes: pass `code_usage=None` with `is_baseline=True`.")
    if not is_baseline and has_codebook and code_usage is None:
        raise ValueError(
            "A QAC model's card shows its code usage: pass `code_usage=code_usage(pipeline.encoder.code_weights)`, "
            "or `is_baseline=True` for a pipeline without encoder."
        )
    if code_usage is not None:
        _check_keys("code_usage", code_usage, CODE_USAGE_KEYS)
    _check_keys("training_facts", training_facts, TRAINING_FACT_KEYS)
    if sample_grid is not None and (Path(sample_grid).name != sample_grid or not sample_grid.endswith(".png")):
        raise ValueError(
            f"`sample_grid` must name a .png file at the top of output_dir (only those are uploaded), "
            f"got {sample_grid!r}."
        )


def _dataset_fields(dataset_name: str) -> dict[str, str]:
    """How the card names the data: a built-in name, a Hub id (linked) or a local folder (its name only, no path)."""
    if dataset_name in BUILTIN_DATASETS:
        return {"dataset_kind": "builtin", "dataset_name": dataset_name}
    if os.path.isdir(dataset_name):
        return {"dataset_kind": "folder", "dataset_name": Path(dataset_name).resolve().name}
    return {"dataset_kind": "hub", "dataset_name": dataset_name}


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    repo_id: str,
    dataset_name: str,
    training_config: dict,
    code_usage: dict | None,
    training_facts: dict,
    sample_grid: str | None = "samples.png",
    license: str = "apache-2.0",
    is_baseline: bool = False,
    has_codebook: bool = True,
    template_path: str | os.PathLike | None = None,
) -> Path:
    r"""
    Write the model card (README.md) of a saved pipeline, as diffusers' training scripts do.

    Args:
        output_dir (`str` or `os.PathLike`):
            The folder the pipeline was saved to with `save_pretrained`; the card is written there.
        repo_id (`str`):
            The full Hub repo id ("user/name"), used in the card's title and usage snippet.
        dataset_name (`str`):
            What the model was trained on: a built-in name ("digits", "animal-mnist"), a Hub data set id (listed in
            the card's `datasets` metadata and linked) or a local image folder (named, its path left out).
        training_config (`dict`):
            The resolved training configuration, shown as JSON (other values with `str`, as train_qac.py writes
            training_config.json) after [`without_local_paths`]: absolute paths are shown by their last component
            only. Pass relative paths through `without_local_paths` with their keys first, and leave secrets such as
            `hub_token` out: the card is public.
        code_usage (`dict`, *optional*):
            `qac_diffusers.training.code_usage.code_usage` of the published code weights; `None` for a baseline.
        training_facts (`dict`):
            At least `steps`, `images_seen` and `final_loss`; every entry is shown.
        sample_grid (`str`, *optional*, defaults to `"samples.png"`):
            A PNG file name at the top of `output_dir`, shown in the card when the file exists.
        license (`str`, *optional*, defaults to `"apache-2.0"`):
            The license in the card's metadata.
        is_baseline (`bool`, *optional*, defaults to `False`):
            Whether the pipeline is the unconditional baseline (no encoder); adds the `baseline` tag.
        has_codebook (`bool`, *optional*, defaults to `True`):
            Whether the encoder has code weights (FSQ); `False` for a Gaussian condition encoder, whose card shows no
            code usage.
        template_path (`str` or `os.PathLike`, *optional*):
            A Jinja template to render instead of [`default_template_path`].

    Returns:
        `Path`: the path of the written README.md.

    Raises:
        `OSError`: if `output_dir` does not exist or holds no model_index.json.
        `ValueError`: if `code_usage` does not fit `is_baseline`, lacks a key, `training_facts` lacks a key, or
        `sample_grid` is not a top-level PNG file name.
    """
    output_dir = _check_output_dir(output_dir)
    _check_card_inputs(code_usage, training_facts, sample_grid, is_baseline, has_codebook)
    dataset = _dataset_fields(dataset_name)
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        tags=TAGS + (["baseline"] if is_baseline else []),
        datasets=[dataset_name] if dataset["dataset_kind"] == "hub" else None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=template_path or default_template_path(),
        repo_id=repo_id,
        is_baseline=is_baseline,
        sample_grid=sample_grid if sample_grid and (output_dir / sample_grid).is_file() else None,
        training_facts=training_facts,
        code_usage=code_usage,
        diffusers_version=diffusers.__version__,  # that of the code save_pretrained ships
        has_codebook=has_codebook,
        **_pipeline_fields(output_dir),
        training_config_json=json.dumps(without_local_paths(training_config), indent=2, default=str),
        **dataset,
    )
    card_path = output_dir / CARD_NAME
    card.save(card_path)
    return card_path


def _pipeline_fields(output_dir: Path) -> dict[str, str]:
    """The card's words for the saved pipeline's formulation and scheduler, read from its model_index.json."""
    model_index = json.loads((output_dir / "model_index.json").read_text())
    scheduler_name = model_index["scheduler"][1]
    sampler_note = SAMPLER_NOTES.get(scheduler_name, "")
    if scheduler_name == "IPNDMScheduler":
        config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
        sampler_note = "iPNDM with the analytical first step" if config["analytical_first_step"] else "iPNDM"
    formulation = model_index.get("formulation", "edm")
    return {"scheduler_name": scheduler_name, "sampler_note": sampler_note, **FORMULATION_CARD_FIELDS[formulation]}


def _is_uploaded_file(path: Path) -> bool:
    hidden = path.name.startswith(".")
    return path.is_file() and not hidden and (path.name == CARD_NAME or path.suffix in UPLOADED_SUFFIXES)


def _top_level_files(output_dir: Path) -> list[Path]:
    return [path for path in sorted(output_dir.iterdir()) if _is_uploaded_file(path)]


def _component_folders(output_dir: Path) -> list[str]:
    """The folders of the pipeline's components, as model_index.json names them."""
    model_index = json.loads((output_dir / "model_index.json").read_text(encoding="utf-8"))
    # `_class_name` is a list too when it names the pipeline's shipped file, but it is no folder
    components = {name: value for name, value in model_index.items() if not name.startswith("_")}
    return [name for name, value in components.items() if isinstance(value, list) and value[0] is not None]


def _upload_patterns(output_dir: Path) -> list[str]:
    """`allow_patterns` for `upload_folder`: the component folders named in model_index.json and the top-level
    README.md, PNG and JSON files that are not hidden (exact names, escaped: a `*.png` pattern would also match
    inside subfolders, since fnmatch's `*` matches "/")."""
    top_level = [glob.escape(path.name) for path in _top_level_files(output_dir)]
    return top_level + [f"{name}/*" for name in _component_folders(output_dir)]


def _uploaded_files(output_dir: Path) -> list[Path]:
    """The files that `upload_folder` sends with `_upload_patterns`."""
    in_components = [
        path for name in _component_folders(output_dir) for path in sorted((output_dir / name).rglob("*"))
    ]
    return _top_level_files(output_dir) + [path for path in in_components if path.is_file()]


def _json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _json_strings(item)
    elif isinstance(value, str):
        yield value


def _local_paths_named(path: Path, content: bytes, private_paths: set[str]) -> list[str]:
    """The private paths in a file's content and, for a JSON file, every absolute path among its values (e.g. the
    `_name_or_path` that diffusers records when a pipeline loaded from a local folder is saved again)."""
    named = sorted(private for private in private_paths if private.encode() in content)
    if path.suffix == ".json":
        named += [value for value in _json_strings(json.loads(content)) if os.path.isabs(value)]
    return named


def _check_nothing_private(output_dir: Path, token: str | None) -> None:
    """Refuse to upload a file that holds the token (e.g. a `--hub_token` recorded in the training config) or names
    a local path: the output folder's, one in the home folder, or any absolute path in a JSON file."""
    home = Path.home()
    private_paths = {str(output_dir.resolve()), str(output_dir.absolute())}
    private_paths |= {str(home) + os.sep} if home.parent != home else set()
    for path in _uploaded_files(output_dir):
        if path.suffix in WEIGHT_SUFFIXES:
            continue
        content = path.read_bytes()
        if token is not None and token.encode() in content:
            raise ValueError(
                f"{path} holds the Hub token, which the upload would publish. Leave the token out of it (e.g. drop "
                "`hub_token` from the training configuration), write it again, and revoke the token if it was shared."
            )
        named = _local_paths_named(path, content, private_paths)
        if named:
            raise ValueError(
                f"{path} names the local path {named[0]!r}, which the upload would publish. Write it again without "
                "local paths (`qac_diffusers.training.hub.without_local_paths` shortens those of a configuration)."
            )


def check_hub_access(repo_id: str, token: str | None = None, private: bool = False) -> str:
    r"""
    Check, before a long job, that its result can be pushed: a token is found, the Hub answers, the token may write,
    and the repo exists or can be created (it is created now, with `exist_ok=True`, as diffusers' training scripts do
    at their start).

    A read-only token is refused from what the Hub says about it (`whoami`); a fine-grained token's permissions per
    repo are only known when the upload is tried.

    Args:
        repo_id (`str`):
            The repo id; without a namespace ("name") it goes to the token's user.
        token (`str`, *optional*):
            The Hub token; defaults to the client's (`HF_TOKEN` or `hf auth login`).
        private (`bool`, *optional*, defaults to `False`):
            Whether a newly created repo is private.

    Returns:
        `str`: the full repo id ("user/name").

    Raises:
        `ValueError`: if offline mode (`HF_HUB_OFFLINE`) is on, no token is found, the Hub rejects the token, the
        token is read-only, or the repo cannot be created.
        `ConnectionError`: if the Hub cannot be reached.
    """
    token = token or get_token()
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"Pushing to the Hub repo {repo_id} needs the network, but HF_HUB_OFFLINE is set: unset it.")
    if token is None:
        raise ValueError(
            f"Pushing to the Hub repo {repo_id} needs a token with write access, and none was found: log in with "
            f"`hf auth login` or set the HF_TOKEN environment variable (tokens: {TOKENS_URL})."
        )
    api = HfApi(token=token)
    access_token = _hub_call(api.whoami, api.endpoint, "check the token").get("auth", {}).get("accessToken", {})
    if access_token.get("role") == "read":
        raise ValueError(
            f"The Hub token {access_token.get('displayName')!r} is read-only: pushing to {repo_id} needs one with "
            f"write access. Create one at {TOKENS_URL} and log in with it (`hf auth login`)."
        )
    create = partial(api.create_repo, repo_id, private=private, exist_ok=True)
    return _hub_call(create, api.endpoint, f"create or open the repo {repo_id}").repo_id


def _hub_call(call: Callable[[], Any], endpoint: str, purpose: str) -> Any:
    """`call()`, with its failure said in one sentence: the Hub's answer, or that it could not be reached."""
    try:
        return call()
    except HfHubHTTPError as error:
        raise ValueError(f"The Hub at {endpoint} refused to {purpose}: {error}") from error
    except Exception as error:  # the HTTP client's network errors (httpx2 today) share no base class with OSError
        raise ConnectionError(
            f"Cannot reach the Hub at {endpoint} to {purpose} ({type(error).__name__}: {error}). Check the network "
            "connection (and HF_ENDPOINT if set)."
        ) from error


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload QAC pipeline trained with train_qac.py",
) -> str:
    r"""
    Create the Hub repo (if needed) and upload a saved pipeline with its card, sample grid and training configuration.

    Only what `QACPipeline.from_pretrained` needs is uploaded (model_index.json and the folders of its components),
    plus the top-level README.md, PNG and JSON files; checkpoint-* folders, logs/, temporary folders and every other
    training-only file stay local.

    Args:
        output_dir (`str` or `os.PathLike`):
            The folder the pipeline was saved to; call [`write_model_card`] first so that it holds README.md.
        repo_id (`str`):
            The repo id; without a namespace ("name") it goes to the token's user.
        token (`str`, *optional*):
            The Hub token; defaults to the client's (`HF_TOKEN` or `hf auth login`).
        private (`bool`, *optional*, defaults to `False`):
            Whether a newly created repo is private; an existing repo keeps its visibility.
        commit_message (`str`, *optional*):
            The message of the upload commit.

    Returns:
        `str`: the full repo id ("user/name"), ready for `QACPipeline.from_pretrained`.

    Raises:
        `OSError`: if `output_dir` does not exist or holds no model_index.json.
        `ValueError`: if a file to upload holds the `token` passed or names the absolute path of `output_dir` or of
        the home folder (nothing is created or uploaded then).
    """
    output_dir = _check_output_dir(output_dir)
    _check_nothing_private(output_dir, token)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        allow_patterns=_upload_patterns(output_dir),
    )
    return repo_id
