"""Model caches laid out as each tool lays them out, and a Hugging Face hub on 127.0.0.1.

The server speaks the part of the Hub API that ``huggingface_hub`` uses to list a repository and
download a file: ``GET /api/models/{repo}/tree/{rev}`` and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``
with ``X-Repo-Commit``, ``ETag`` (the LFS sha256), sizes and byte ranges for resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # the bundled model is 253 MB: a hard link where the file system allows
    except OSError:
        shutil.copyfile(src, dst)


def hub_layout(root: Path, repo: str, filename: str, src: Path) -> Path:
    """``models--owner--repo/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``."""
    folder = root / ("models--" + repo.replace("/", "--"))
    sha = sha256_of(src)
    _place(src, folder / "blobs" / sha)
    link = folder / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(folder / "blobs" / sha, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return link


def flat_layout(folder: Path, name: str, src: Path) -> Path:
    """LM Studio (``models/<publisher>/<repo>/<file>``) and llama.cpp's former ``owner_repo_file``."""
    _place(src, folder / name)
    return folder / name


def ollama_layout(root: Path, repo: str, tag: str, src: Path) -> Path:
    """``manifests/hf.co/<owner>/<repo>/<tag>`` naming ``blobs/sha256-<hex>`` as the model layer."""
    sha = sha256_of(src)
    blob = root / "blobs" / f"sha256-{sha}"
    _place(src, blob)
    manifest = root / "manifests" / "hf.co" / repo / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{sha}", "size": src.stat().st_size},
    ]}))
    return blob


@dataclass
class HubFile:
    data: bytes
    #: the sha256 the hub states (the LFS oid); by default the data's
    lfs_sha256: str = ""

    def __post_init__(self) -> None:
        self.lfs_sha256 = self.lfs_sha256 or hashlib.sha256(self.data).hexdigest()


@dataclass
class FakeHub:
    """Repositories of files, what was asked for, and faults to inject."""

    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    gets: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    #: the Authorization header of every request (None when there was none)
    tokens: list[str | None] = field(default_factory=list)
    #: close the connection after this many bytes of the next GET of a file (once)
    cut_after: int | None = None
    url: str = ""


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _file(self) -> tuple[HubFile, str] | None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                f = hub.repos.get(repo, {}).get(name)
                return (f, name) if f else None
            return None

        def _head(self, f: HubFile, length: int, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{f.lfs_sha256}"')
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_HEAD(self) -> None:
            hub.tokens.append(self.headers.get("Authorization"))
            found = self._file()
            if found is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            self._head(found[0], len(found[0].data))

        def do_GET(self) -> None:
            hub.tokens.append(self.headers.get("Authorization"))
            path = self.path.split("?")[0]
            if path.startswith("/api/models/"):
                repo = "/".join(path.split("/")[3:5])
                if repo not in hub.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.end_headers()
                    return
                body = json.dumps([{"type": "file", "oid": "1" * 40, "size": len(f.data), "path": name,
                                    "lfs": {"oid": f.lfs_sha256, "size": len(f.data), "pointerSize": 134}}
                                   for name, f in hub.repos[repo].items()]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            found = self._file()
            if found is None:
                self.send_response(404)
                self.end_headers()
                return
            f, name = found
            rng = self.headers.get("Range")
            hub.gets.append((name, rng))
            start = int(rng.split("=")[1].split("-")[0]) if rng else 0
            body = f.data[start:]
            if rng:
                self._head(f, len(body), 206)
            else:
                self._head(f, len(body))
            if hub.cut_after is not None:
                cut, hub.cut_after = hub.cut_after, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
