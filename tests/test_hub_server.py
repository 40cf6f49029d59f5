"""The loopback Hub of tests/hub_server.py, driven by the real huggingface_hub client."""

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

from hub_server import FakeHubServer, fake_hub_context


def _make_folder(root: Path) -> dict[str, bytes]:
    """A small model-like folder (JSON, nested safetensors, text file, empty file, README) -> {relpath: bytes}."""
    (root / "unet" / "nested").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"_class_name": "Tiny", "sample_size": 8}))
    save_file({"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, root / "unet" / "model.safetensors")
    (root / "unet" / "nested" / "notes.txt").write_bytes(bytes(range(256)))
    (root / "empty.txt").write_bytes(b"")
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _read_tree(folder: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_upload_download_then_offline(fake_hub, tmp_path):
    local = _make_folder(tmp_path / "src")
    api = HfApi()

    repo_id = api.create_repo("roundtrip").repo_id  # no namespace: the token's user, as on the Hub
    assert repo_id == f"{fake_hub.user}/roundtrip"
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(repo_id)
    assert exc.value.response.status_code == 409

    first = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "src", commit_message="upload")
    stored = fake_hub.files(repo_id)
    assert stored == {".gitattributes": stored[".gitattributes"], **local}  # .gitattributes: the initial commit

    # snapshot_download: into the temporary cache, with identical bytes
    snapshot = snapshot_download(repo_id)
    assert Path(snapshot).is_relative_to(fake_hub.cache_dir)
    assert Path(snapshot).name == first.oid
    assert _read_tree(snapshot) == stored
    weights = load_file(Path(snapshot) / "unet" / "model.safetensors")
    assert torch.equal(weights["weight"], torch.arange(12.0).view(3, 4))

    # hf_hub_download of one nested file
    notes = hf_hub_download(repo_id, "unet/nested/notes.txt")
    assert notes == str(Path(snapshot) / "unet" / "nested" / "notes.txt")
    assert Path(notes).read_bytes() == bytes(range(256))

    # upload_file makes a new commit; an unchanged upload_folder makes none (preupload's oid lets the client skip)
    second = api.upload_file(path_or_fileobj=b"more", path_in_repo="extra/more.txt", repo_id=repo_id)
    assert second.oid != first.oid
    assert api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "src").oid == second.oid
    assert api.model_info(repo_id).sha == second.oid
    assert sorted(api.list_repo_files(repo_id)) == sorted([*stored, "extra/more.txt"])
    snapshot = snapshot_download(repo_id)
    assert Path(snapshot).name == second.oid
    assert _read_tree(snapshot) == {**stored, "extra/more.txt": b"more"}

    # every write carried the token; the fake saw no unknown route and no internal error
    assert all(token == fake_hub.token for method, _, token in fake_hub.requests if method == "POST")
    assert fake_hub.server.unhandled == [] and fake_hub.server.errors == []

    # offline mode: resolved from the cache, without a single request
    seen = len(fake_hub.requests)
    with fake_hub.offline():
        assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
        assert snapshot_download(repo_id) == snapshot
        assert hf_hub_download(repo_id, "unet/nested/notes.txt") == str(Path(snapshot) / "unet/nested/notes.txt")
    assert len(fake_hub.requests) == seen
    assert not constants.HF_HUB_OFFLINE

    # the Hub unreachable (server stopped, offline mode off): the client falls back to the cache too
    fake_hub.stop()
    assert snapshot_download(repo_id) == snapshot
    assert _read_tree(snapshot) == {**stored, "extra/more.txt": b"more"}


def test_not_found_errors(fake_hub):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("fake-user/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("fake-user/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("fake-user/missing")

    repo_id = api.create_repo("present").repo_id
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "no/such/file.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)

    # a private repo is not found without a token
    private_id = api.create_repo("secret", private=True).repo_id
    assert api.model_info(private_id).private
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(private_id, token=False)


def test_explicit_token(fake_hub, monkeypatch):
    """`--hub_token`-style usage: no token in the environment, one passed explicitly."""
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi().create_repo("anonymous")
    assert exc.value.response.status_code == 401

    seen = len(fake_hub.requests)
    api = HfApi(token="hf_from_cli")
    assert api.whoami()["name"] == fake_hub.user
    repo_id = api.create_repo("with-token").repo_id
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id, token="hf_other")
    tokens = [token for method, _, token in fake_hub.requests[seen:] if method == "POST"]
    assert tokens == ["hf_from_cli", "hf_other", "hf_other"]  # create, preupload, commit


def test_context_restores_client_state(tmp_path):
    from huggingface_hub import hf_api
    from huggingface_hub.utils import _cache_manager

    names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN_PATH")
    before = {name: getattr(constants, name) for name in names}
    env_before = {var: os.environ.get(var) for var in ("HF_ENDPOINT", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE")}
    api_endpoint, manager_cache = hf_api.api.endpoint, _cache_manager.HF_HUB_CACHE

    with fake_hub_context(tmp_path / "home") as hub:
        assert constants.ENDPOINT == hub.url == hf_api.api.endpoint == os.environ["HF_ENDPOINT"]
        assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub.url + "/")
        assert constants.HF_HUB_CACHE == _cache_manager.HF_HUB_CACHE == str(tmp_path / "home" / "hub")
        assert not constants.HF_HUB_OFFLINE
        hub.set_offline(True)  # left on: the exit restores it anyway

    assert {name: getattr(constants, name) for name in names} == before
    assert {var: os.environ.get(var) for var in env_before} == env_before
    assert (hf_api.api.endpoint, _cache_manager.HF_HUB_CACHE) == (api_endpoint, manager_cache)
    assert not hub.server.running


def test_server_without_client_patching():
    """The server alone: repos can be seeded directly, and it serves plain HTTP."""
    from urllib.request import urlopen

    with FakeHubServer() as server:
        repo = server.create_repo("org/seeded")
        server.commit(repo, "add", {**repo.files, "a/b.txt": b"hello"})
        with urlopen(f"{server.url}/org/seeded/resolve/main/a/b.txt") as response:
            assert response.read() == b"hello"
            assert response.headers["X-Repo-Commit"] == repo.head.oid
        with urlopen(f"{server.url}/api/models/org/seeded/tree/main?recursive=true") as response:
            assert {e["path"] for e in json.load(response)} == {".gitattributes", "a", "a/b.txt"}
    assert not server.running
