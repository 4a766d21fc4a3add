"""Fetching a model this machine lacks, only when asked (``--kv-download``): with huggingface_hub,
into the standard hub cache, so llama.cpp and every other tool find it there too.

The hub client does the transfer (resume from ``.incomplete``, progress bar, a lock per file so
parallel processes download once, HF_TOKEN/HF_ENDPOINT). What it does not do here is trust the
bytes: each downloaded file is hashed and must equal the hub's LFS sha256 and any pinned one; a file
that does not is deleted from the cache, and the error says both hashes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .environment import env_flag
from .hub import Found, HubRef, hub_cache, split_part_names


class DownloadError(RuntimeError):
    """A model could not be fetched, or what was fetched is not what was asked for."""


def hub_offline(env: Mapping[str, str]) -> bool:
    return env_flag("HF_HUB_OFFLINE", False, env) is True


def download(ref: HubRef, env: Mapping[str, str], cache_dir: Path) -> Found:
    """Fetch ``ref`` (every part of a split GGUF) and return the first part, hashed and checked."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    from .resolve import file_sha256

    if hub_offline(env):
        raise DownloadError(f"{ref.label} is not on this machine and HF_HUB_OFFLINE is set, so it is not fetched")
    endpoint = env.get("HF_ENDPOINT") or None
    token = env.get("HF_TOKEN") or None
    cache = hub_cache(env)
    where = endpoint or "https://huggingface.co"
    try:
        listing = [e for e in HfApi(endpoint=endpoint, token=token).list_repo_tree(
            ref.repo, revision=ref.revision, recursive=True) if isinstance(e, RepoFile)]
    except Exception as e:  # the hub client's errors: not found, gated, no network
        raise DownloadError(f"cannot list the files of {ref.repo} on {where}: {e}") from e
    chosen = ref.pick([e.path for e in listing])
    if chosen is None:
        ggufs = [e.path for e in listing if e.path.lower().endswith(".gguf")]
        raise DownloadError(f"{ref.repo} on {where} has no GGUF for {ref.label}; its GGUF files: "
                            f"{', '.join(ggufs) or 'none'}")
    lfs = {e.path: e.lfs.sha256 if e.lfs else None for e in listing}
    first: Found | None = None
    for part in split_part_names(chosen):
        hub_sha = lfs.get(part)
        pinned = ref.sha256 if part == chosen else None
        if pinned and hub_sha and pinned.lower() != hub_sha:
            raise DownloadError(f"{ref.repo}/{part}: the registry pins sha256 {pinned}, the hub lists {hub_sha}; "
                                "not downloaded")
        try:
            local = Path(hf_hub_download(ref.repo, part, revision=ref.revision, cache_dir=cache, endpoint=endpoint,
                                         token=token))
        except Exception as e:
            raise DownloadError(f"downloading {ref.repo}/{part} from {where} failed: {e} (run again to resume)") from e
        got = file_sha256(local, cache_dir)
        for expected, source in ((hub_sha, "the hub's LFS sha256"), (pinned, "the registry's pinned sha256")):
            if expected and got != expected.lower():
                _discard(local)
                raise DownloadError(f"{ref.repo}/{part}: the downloaded file has sha256 {got}, {source} is "
                                    f"{expected}; the file was deleted from {cache} and is not used")
        first = first or Found(local, f"downloaded from {where} into the Hugging Face hub cache {cache}", got)
    assert first is not None
    return first


def _discard(snapshot_file: Path) -> None:
    """Remove a bad download: the blob and the snapshot's link to it."""
    blob = snapshot_file.resolve()
    for p in (blob, snapshot_file):
        p.unlink(missing_ok=True)
