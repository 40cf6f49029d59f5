"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests.

`FakeHubServer` is a small stdlib HTTP server (``ThreadingHTTPServer`` on 127.0.0.1, any free port) that
answers the endpoints the real ``huggingface_hub`` client uses for:

- ``HfApi.create_repo`` / ``delete_repo`` / ``whoami``
- ``HfApi.upload_folder`` / ``upload_file`` / ``create_commit`` (every file is uploaded "regular", i.e. inline
  base64 in the commit payload: no LFS, no Xet)
- ``HfApi.model_info`` / ``repo_info`` / ``list_repo_tree`` / ``list_repo_files``
- ``hf_hub_download`` / ``snapshot_download`` (plain HTTP downloads: the server never sends Xet headers)

Repositories are kept in memory, with their full commit history (a commit is a snapshot ``{path: bytes}``), so
files can be downloaded by branch name ("main", the only branch) or by commit sha. A new repo starts, as on the
real Hub, with an "initial commit" holding a ``.gitattributes`` file.

`fake_hub_context` starts a server and points the already imported client at it (endpoint, cache folders, token,
offline flag: see its docstring), and `fake_hub` is the pytest fixture around it::

    def test_push(fake_hub):
        HfApi().create_repo("tiny")                       # -> "fake-user/tiny"
        HfApi().upload_folder(repo_id="fake-user/tiny", folder_path=...)
        path = snapshot_download("fake-user/tiny")        # lands in fake_hub.cache_dir
        with fake_hub.offline():                          # HF_HUB_OFFLINE on: served from the cache only
            assert snapshot_download("fake-user/tiny") == path

To use the fixture from other test modules, tests/conftest.py needs ``from hub_server import fake_hub  # noqa: F401``
(tests/ is on sys.path under pytest's default "prepend" import mode, as long as tests/ has no __init__.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


DEFAULT_USER = "fake-user"
DEFAULT_TOKEN = "hf_fake_hub_token"

# Same content as the `.gitattributes` the real Hub puts in a new repo's initial commit (abridged).
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_TYPES = r"(?P<types>models|datasets|spaces)"


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what the Hub returns as a regular file's oid/ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class FakeCommit:
    oid: str
    message: str
    files: dict[str, bytes]  # full snapshot of the repo at this commit
    date: str = field(default_factory=_now)


@dataclass
class FakeRepo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    commits: list[FakeCommit] = field(default_factory=list)  # oldest first; the last one is "main"
    created_at: str = field(default_factory=_now)

    @property
    def head(self) -> FakeCommit:
        return self.commits[-1]

    @property
    def files(self) -> dict[str, bytes]:
        """Files on "main": {path_in_repo: content}."""
        return self.head.files

    def commit_at(self, revision: str) -> FakeCommit | None:
        """'main' or a full commit sha (the forms huggingface_hub sends); None if unknown."""
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class HubError(Exception):
    """Raised by an endpoint to answer with an error status and the Hub's error headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class FakeHubServer:
    """In-memory Hub on http://127.0.0.1:<port>. Use `start()`/`stop()` or `with FakeHubServer() as server:`.

    Any ``Authorization: Bearer <anything>`` is accepted; writes (create, delete, preupload, commit) need one, and so
    do reads of private repos. Every request is appended to `requests` as ``(method, path, token_or_None)``;
    requests no route matched go to `unhandled` and exceptions raised by handlers (answered with 500) to `errors`,
    so a test can assert that both stay empty.
    """

    def __init__(self, user: str = DEFAULT_USER, host: str = "127.0.0.1", port: int = 0):
        self.user = user
        self.repos: dict[tuple[str, str], FakeRepo] = {}  # (repo_type, repo_id) -> repo
        self.requests: list[tuple[str, str, str | None]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._host, self._port = host, port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "FakeHubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer((self._host, self._port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; later requests fail with a connection error (as when the Hub is unreachable)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> "FakeHubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FakeHubServer is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    endpoint = url

    # ------------------------------------------------------------------------------------------------ storage
    def get_repo(self, repo_id: str, repo_type: str = "model") -> FakeRepo:
        """The stored repo (KeyError if it does not exist)."""
        return self.repos[(repo_type, repo_id)]

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> FakeRepo:
        """Create a repo directly (no HTTP), with the Hub's initial commit. Used by POST /api/repos/create."""
        with self._lock:
            repo = FakeRepo(repo_id=repo_id, repo_type=repo_type, private=private)
            self.repos[(repo_type, repo_id)] = repo
            self.commit(repo, "initial commit", {".gitattributes": GITATTRIBUTES})
            return repo

    def commit(self, repo: FakeRepo, message: str, files: dict[str, bytes]) -> FakeCommit:
        """Append a commit whose snapshot is `files`; its sha is content-derived and unique per commit."""
        with self._lock:
            self._commit_counter += 1
            parent = repo.commits[-1].oid if repo.commits else ""
            digest = hashlib.sha1(f"{parent}\n{self._commit_counter}\n{message}\n".encode())
            for path in sorted(files):
                digest.update(f"{path}\0{git_blob_oid(files[path])}\n".encode())
            new = FakeCommit(oid=digest.hexdigest(), message=message, files=dict(files))
            repo.commits.append(new)
            return new


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to a `FakeHubServer` (set as the class attribute `hub` by `FakeHubServer.start`)."""

    hub: FakeHubServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive after `stop()`
    server_version = "FakeHub/1.0"

    # (method, regex on the still-quoted path, handler name); first match wins.
    ROUTES = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("ANY", r"/api/telemetry/.*", "telemetry"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", rf"/api/{_TYPES}/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/{_TYPES}/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", rf"/api/{_TYPES}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("GET", rf"/api/{_TYPES}/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("HEAD", rf"/(?:(?P<types>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", rf"/(?:(?P<types>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    # ------------------------------------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr access log
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        scheme, _, credentials = (self.headers.get("Authorization") or "").partition(" ")
        self.token = (credentials.strip() or None) if scheme.lower() == "bearer" else None
        self.hub.requests.append((self.command, split.path, self.token))
        try:
            for method, pattern, name in self.ROUTES:
                if method in (self.command, "ANY") and (match := re.fullmatch(pattern, split.path)):
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if "types" in params:
                        params["repo_type"] = _API_TYPES[params.pop("types")]
                    getattr(self, f"ep_{name}")(**params)
                    return
            self.hub.unhandled.append((self.command, self.path))
            raise HubError(404, f"FakeHub: no route for {self.command} {split.path}")
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send_json({"error": e.message, **e.body}, status=e.status, headers=headers)
        except Exception as e:  # a bug in the fake: answer 500 and keep it for the test to see
            self.hub.errors.append(f"{self.command} {self.path}: {type(e).__name__}: {e}")
            self._send_json({"error": f"FakeHub internal error: {e}"}, status=500)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json; charset=utf-8", headers)

    def _require_token(self) -> None:
        if not self.token:
            raise HubError(401, "Invalid username or password.")

    def _repo(self, repo_type: str, repo_id: str) -> FakeRepo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.token):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit_at(self, repo: FakeRepo, rev: str) -> FakeCommit:
        commit = repo.commit_at(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return commit

    def _main_only(self, rev: str) -> None:
        if rev != "main":
            raise HubError(404, f"FakeHub only writes to 'main', got revision {rev!r}", code="RevisionNotFound")

    def _repo_url(self, repo: FakeRepo) -> str:
        return f"{self.hub.url}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # ------------------------------------------------------------------------------------------- endpoints
    def ep_whoami(self) -> None:
        """GET /api/whoami-v2: `HfApi.whoami()` (and whatever asks who the token belongs to)."""
        self._require_token()
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "Fake Hub User",
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def ep_agent_harnesses(self) -> None:
        """GET /api/agent-harnesses: registry fetched once per process when the client builds its User-Agent."""
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def ep_telemetry(self) -> None:
        """HEAD /api/telemetry/...: `send_telemetry` (fire-and-forget); always 200."""
        self._send_json({})

    def ep_validate_yaml(self) -> None:
        """POST /api/validate-yaml: called by create_commit/upload_folder when a README.md is committed."""
        self._json_body()
        self._send_json({"errors": [], "warnings": []})

    def ep_create_repo(self) -> None:
        """POST /api/repos/create: `HfApi.create_repo`. 409 if it exists (`exist_ok=True` turns that into success)."""
        self._require_token()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise HubError(400, f"FakeHub does not support repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                url = self._repo_url(self.hub.repos[(repo_type, repo_id)])
                # the client reads "url" from this body when create_repo(..., exist_ok=True)
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        repo_hash = hashlib.sha1(repo_id.encode()).hexdigest()
        self._send_json({"url": self._repo_url(repo), "name": repo_id, "id": repo_hash})

    def ep_delete_repo(self) -> None:
        """DELETE /api/repos/delete: `HfApi.delete_repo`."""
        self._require_token()
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        with self.hub._lock:
            if self.hub.repos.pop((payload.get("type") or "model", repo_id), None) is None:
                raise HubError(404, "Repository not found", code="RepoNotFound")
        self._send_json({})

    def ep_preupload(self, repo_type: str, repo: str, rev: str) -> None:
        """POST /api/{type}s/{repo}/preupload/{rev}: `_fetch_upload_modes` in create_commit / upload_*.

        Every file is answered uploadMode "regular" (content goes inline in the commit: no LFS, no Xet). `oid` is the
        git blob sha of the file already on "main", which lets the client skip unchanged files, as on the real Hub.
        """
        self._require_token()
        fake_repo = self._repo(repo_type, repo)
        self._main_only(rev)
        if self.query.get("create_pr"):
            raise HubError(400, "FakeHub does not support create_pr")
        head = fake_repo.head
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(head.files[f["path"]]) if f["path"] in head.files else None,
            }
            for f in self._json_body().get("files", [])
        ]
        self._send_json({"files": files, "commitOid": head.oid})

    def ep_commit(self, repo_type: str, repo: str, rev: str) -> None:
        """POST /api/{type}s/{repo}/commit/{rev}: `_send_commit` (ndjson: a "header" line, then one line per op).

        Supported ops: "file" (base64 content), "deletedFile", "deletedFolder". "lfsFile" is refused (400) since the
        preupload endpoint never asks for LFS. A stale "parentCommit" gets 412, as on the Hub.
        """
        self._require_token()
        fake_repo = self._repo(repo_type, repo)
        self._main_only(rev)
        if self.query.get("create_pr"):
            raise HubError(400, "FakeHub does not support create_pr")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a 'header' line")
        header = lines[0]["value"]
        with self.hub._lock:
            parent = header.get("parentCommit")
            if parent and parent != fake_repo.head.oid:
                raise HubError(412, f"Parent commit {parent} is not the head of 'main' ({fake_repo.head.oid})")
            files = dict(fake_repo.head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    files[path] = base64.b64decode(value.get("content", ""))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"FakeHub does not support commit operation {key!r}")
            new = self.hub.commit(fake_repo, header.get("summary") or "", files)
        self._send_json(
            {
                "success": True,
                "commitOid": new.oid,
                "commitUrl": f"{self._repo_url(fake_repo)}/commit/{new.oid}",
                "pullRequestUrl": None,
            }
        )

    def ep_repo_info(self, repo_type: str, repo: str, rev: str = "main") -> None:
        """GET /api/{type}s/{repo}[/revision/{rev}]: `model_info`/`repo_info`, used by `snapshot_download` for `sha`.

        `siblings` lists the files (with `size`/`blobId` when asked with ?blobs=true).
        """
        fake_repo = self._repo(repo_type, repo)
        commit = self._commit_at(fake_repo, rev)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": p, **({"size": len(c), "blobId": git_blob_oid(c)} if with_blobs else {})}
            for p, c in sorted(commit.files.items())
        ]
        self._send_json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                **({"modelId": repo} if repo_type == "model" else {}),
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": fake_repo.created_at,
                "private": fake_repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                **({"sdk": "static"} if repo_type == "space" else {}),
            }
        )

    def ep_tree(self, repo_type: str, repo: str, rev: str, path: str = "") -> None:
        """GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=..: `list_repo_tree`, used by `snapshot_download`.

        One page (no Link header). Files: {type, oid, size, path}; folders: {type: "directory", oid, size: 0, path}.
        """
        commit = self._commit_at(self._repo(repo_type, repo), rev)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        base = path.strip("/")
        prefix = base + "/" if base else ""
        if base and base not in commit.files and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{base} does not exist on {rev}", code="EntryNotFound")
        files: dict[str, bytes] = {}
        folders: set[str] = set()
        for p, content in commit.files.items():
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # every folder above the file (relative to `base`)
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files[p] = content
        entries = [
            {"type": "directory", "oid": hashlib.sha1(f"{commit.oid}:{d}".encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ] + [{"type": "file", "oid": git_blob_oid(c), "size": len(c), "path": p} for p, c in sorted(files.items())]
        self._send_json(entries)

    def ep_resolve(self, repo: str, rev: str, path: str, repo_type: str = "model") -> None:
        """HEAD and GET /[{type}s/]{repo}/resolve/{rev}/{path}: `hf_hub_download` (HEAD for metadata, then GET).

        Headers read by the client: X-Repo-Commit (commit sha), ETag (git blob sha of a regular file; the cache blob
        name), Content-Length. No X-Linked-Etag/X-Linked-Size (not LFS) and no X-Xet-* (so no Xet download).
        A missing file gets 404 + X-Error-Code: EntryNotFound + X-Repo-Commit, as on the Hub. GET honours
        "Range: bytes=a-[b]" (used by the client to resume a download).
        """
        commit = self._commit_at(self._repo(repo_type, repo), rev)
        if path not in commit.files:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_oid(content)}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}";',
        }
        status = 200
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if self.command == "GET" and range_match:
            start = int(range_match.group(1))
            end = min(int(range_match.group(2)) if range_match.group(2) else len(content) - 1, len(content) - 1)
            if start >= len(content):
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(content)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self._send(status, content, "application/octet-stream", headers)


# ---------------------------------------------------------------------------------------------------------------
# Pointing the (already imported) huggingface_hub client at the server
# ---------------------------------------------------------------------------------------------------------------

# Packages whose module-level copies of huggingface_hub constants (`from huggingface_hub.constants import X`, made at
# import time) are patched too, e.g. diffusers.utils.hub_utils.HF_HUB_OFFLINE,
# diffusers.loaders.lora_base.HF_HUB_OFFLINE, huggingface_hub.utils._cache_manager.HF_HUB_CACHE,
# diffusers.utils.constants.HF_HOME / HF_MODULES_CACHE.
PATCHED_PACKAGES = (
    "huggingface_hub",
    "diffusers",
    "transformers",
    "accelerate",
    "datasets",
    "evaluate",
    "peft",
    "qac_diffusers",
)


class FakeHub:
    """What the `fake_hub` fixture yields: a running `FakeHubServer` and the client pointed at it.

    Attributes: `server`, `url` / `endpoint` (same), `token` (also in $HF_TOKEN), `user` (namespace of repos created
    without one), `home` ($HF_HOME), `cache_dir` ($HF_HUB_CACHE, where snapshot_download puts repos).
    """

    def __init__(
        self, server: FakeHubServer, mp: pytest.MonkeyPatch, token: str, home: Path, packages: tuple[str, ...]
    ):
        self.server, self.token, self.home = server, token, home
        self.url = self.endpoint = server.url
        self.user = server.user
        self.cache_dir = home / "hub"
        self._mp, self._packages = mp, packages

    # ---------------------------------------------------------------------------------------- stored content
    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        """Every request the server got: (method, path, bearer token or None)."""
        return self.server.requests

    def repo(self, repo_id: str, repo_type: str = "model") -> FakeRepo:
        return self.server.get_repo(repo_id, repo_type)

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """{path_in_repo: bytes} stored for the repo at `revision` ("main" or a commit sha)."""
        commit = self.repo(repo_id, repo_type).commit_at(revision)
        if commit is None:
            raise KeyError(revision)
        return dict(commit.files)

    # ---------------------------------------------------------------------------------------- offline switch
    def set_offline(self, offline: bool) -> None:
        """Turn huggingface_hub's offline mode (HF_HUB_OFFLINE) on or off: the constant, its module-level copies in
        PATCHED_PACKAGES and $HF_HUB_OFFLINE. With it on, the client makes no request at all (it raises
        OfflineModeIsEnabled internally and falls back to the cache). Undone at fixture teardown."""
        self._mp.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        for module in _loaded_modules(self._packages):
            if isinstance(vars(module).get("HF_HUB_OFFLINE"), bool):
                self._mp.setattr(module, "HF_HUB_OFFLINE", offline)

    @contextlib.contextmanager
    def offline(self, stop_server: bool = False) -> Iterator["FakeHub"]:
        """`with fake_hub.offline():` offline mode on inside the block. `stop_server=True` also stops the server
        for good (to prove nothing is fetched; the fixture cannot go back online after that)."""
        self.set_offline(True)
        if stop_server:
            self.server.stop()
        try:
            yield self
        finally:
            self.set_offline(False)

    def stop(self) -> None:
        """Stop the server (the Hub becomes unreachable; offline mode unchanged)."""
        self.server.stop()


def _loaded_modules(packages: tuple[str, ...]) -> list[Any]:
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and name.split(".", 1)[0] in packages
    ]


@contextlib.contextmanager
def fake_hub_context(
    home: str | os.PathLike,
    *,
    token: str = DEFAULT_TOKEN,
    user: str = DEFAULT_USER,
    packages: tuple[str, ...] = PATCHED_PACKAGES,
) -> Iterator[FakeHub]:
    """Start a `FakeHubServer` and make the already imported huggingface_hub use it; undo it all on exit.

    Inside the block:
    - endpoint: `constants.ENDPOINT`, `constants.HUGGINGFACE_CO_URL_TEMPLATE` (what `hf_hub_url` formats),
      `constants.HF_URL_HOSTS`, the module-level `huggingface_hub.hf_api.api` behind `huggingface_hub.create_repo`,
      `upload_folder`, `model_info`, ... (and any other module-level `HfApi` instance), module-level copies
      (`ENDPOINT`, diffusers' `HUGGINGFACE_CO_RESOLVE_ENDPOINT`) and $HF_ENDPOINT. An `HfApi()` created inside the
      block picks the endpoint up by itself; one created before it keeps its own `endpoint`.
    - cache: `home` becomes HF_HOME, `home/"hub"` HF_HUB_CACHE, and likewise the assets/xet caches, the token files
      and the agent-registry file (constants, their module-level copies, and the env vars). The client reads
      `constants.HF_HUB_CACHE` at call time (`cache_dir=None`), so downloads land in `home/"hub"`.
    - token: $HF_TOKEN = `token` (any Bearer token is accepted); an explicit `token=` still wins.
    - offline mode off (`FakeHub.set_offline`/`FakeHub.offline()` to switch it), telemetry off.
    - the shared httpx client is closed on entry and exit, so no pooled connection outlives the server.
    """
    from huggingface_hub import constants
    from huggingface_hub.hf_api import HfApi
    from huggingface_hub.utils import _http

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    server = FakeHubServer(user=user).start()
    old_endpoint, new_endpoint = constants.ENDPOINT, server.url
    old_offline = constants.HF_HUB_OFFLINE

    # name -> (value at import, value inside the block); copies are matched by name *and* old value.
    hub_cache = str(home / "hub")
    path_values = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "default_cache_path": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "default_assets_cache_path": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "default_xet_cache_path": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
    }
    replacements: dict[str, tuple[Any, Any]] = {
        name: (getattr(constants, name), value) for name, value in path_values.items() if hasattr(constants, name)
    }
    # diffusers derives its dynamic-modules cache from HF_HOME at import time
    replacements["HF_MODULES_CACHE"] = (
        os.getenv("HF_MODULES_CACHE", os.path.join(constants.HF_HOME, "modules")),
        str(home / "modules"),
    )
    replacements["ENDPOINT"] = (old_endpoint, new_endpoint)
    replacements["HUGGINGFACE_CO_RESOLVE_ENDPOINT"] = (old_endpoint, new_endpoint)
    replacements["HUGGINGFACE_CO_URL_TEMPLATE"] = (
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        new_endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    replacements["HF_URL_HOSTS"] = (constants.HF_URL_HOSTS, constants.HF_URL_HOSTS | {"127.0.0.1"})
    replacements["HF_HUB_DISABLE_TELEMETRY"] = (constants.HF_HUB_DISABLE_TELEMETRY, True)

    _http.close_session()
    mp = pytest.MonkeyPatch()
    modules_before = {id(m) for m in _loaded_modules(packages)}
    try:
        for module in _loaded_modules(packages):
            namespace = vars(module)  # vars(): no lazy-module __getattr__ (diffusers) is triggered
            for name, (old, new) in replacements.items():
                if name in namespace and namespace[name] == old:
                    mp.setattr(module, name, new)
            for name, value in list(namespace.items()):
                if isinstance(value, HfApi) and value.endpoint == old_endpoint:
                    mp.setattr(value, "endpoint", new_endpoint)
        # The agent registry is fetched from ENDPOINT once per process while building headers; make it a no-op.
        from huggingface_hub.utils import _detect_agent

        if getattr(_detect_agent, "_registry", None) is None and hasattr(_detect_agent, "_EMPTY_REGISTRY"):
            mp.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)

        # Environment, for code reading it at call time and for subprocesses (e.g. a training script under test).
        mp.setenv("HF_ENDPOINT", new_endpoint)
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_CACHE", hub_cache)
        mp.setenv("HF_TOKEN", token)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setenv("NO_PROXY", ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])))
        for var in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            mp.delenv(var, raising=False)

        hub = FakeHub(server, mp, token=token, home=home, packages=packages)
        hub.set_offline(False)
        yield hub
    finally:
        server.stop()
        _http.close_session()
        mp.undo()
        # Modules imported inside the block copied the patched values: give them the original ones.
        for module in _loaded_modules(packages):
            if id(module) in modules_before:
                continue
            namespace = vars(module)
            for name, (old, new) in replacements.items():
                if name in namespace and namespace[name] == new:
                    setattr(module, name, old)
            if isinstance(namespace.get("HF_HUB_OFFLINE"), bool):
                setattr(module, "HF_HUB_OFFLINE", old_offline)


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    """A running `FakeHubServer` with huggingface_hub pointed at it and its cache in `tmp_path / "hf_home"`.

    See `fake_hub_context` for what is patched; everything is restored at teardown.
    """
    with fake_hub_context(tmp_path / "hf_home") as hub:
        yield hub
