"""The placement probe's findings kept on disk: the probe creates a throwaway context with the
scheduler's debug output (0.8 s of a 7.5 s cached run on the H200), and what it finds depends only
on what the key holds: the build, the devices, the model file, the cache config and the context's
geometry. Anything else in the key's place means a fresh probe, never a stale answer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..files import atomic_write

#: bump when what the probe records changes
VERSION = 1


class PlacementCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: dict[str, Any]) -> tuple[Path, str]:
        text = json.dumps({"version": VERSION, **key}, sort_keys=True)
        return self.root / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json", text

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The facts stored under exactly this key (its full text is compared, not only the hash)."""
        path, text = self._path(key)
        try:
            stored = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("key") != text or not isinstance(stored.get("facts"), dict):
            return None
        facts: dict[str, Any] = stored["facts"]
        return facts

    def put(self, key: dict[str, Any], facts: dict[str, Any]) -> None:
        """Store the facts; a cache that cannot be written costs the next run a probe, nothing more."""
        path, text = self._path(key)
        try:
            atomic_write(path, json.dumps({"key": text, "facts": facts}) + "\n")
        except OSError:
            pass
