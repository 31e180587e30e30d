"""The judgement cache: one JSON file per (backend identity, exact prompt), written atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from saeot.io import atomic_write_json

__all__ = ["JudgeCache"]


class JudgeCache:
    """One JSON file per judgement under ``root/<key[:2]>/<key>.json``; atomic writes.
    A file that cannot be read is ignored (and rewritten), never trusted."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() if root else None

    @staticmethod
    def key(identity: dict, messages: list[dict]) -> str:
        blob = json.dumps({"judge": identity, "messages": messages, "v": 1}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        if self.root is None:
            return None
        p = self._path(key)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(d, dict) or "raw" not in d or d.get("key") != key:
            return None
        return d

    def put(self, key: str, record: dict) -> None:
        if self.root is None:
            return
        atomic_write_json(self._path(key), {**record, "key": key})

