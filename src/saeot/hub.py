"""Can the Hugging Face hub serve what a setting names? Asked once, quickly, before a download.

A model or SAE release that is not in the local Hugging Face cache needs the hub. When
``HF_HUB_OFFLINE=1`` is set, or the hub does not answer within a few seconds, the run
stops at once with :class:`HubUnreachable` naming the setting, instead of ending after
retries in a raw ``OSError`` traceback. Cached repositories are left to the loaders.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, model_info

__all__ = ["HubUnreachable", "PROBE_TIMEOUT_S", "is_cached", "require_hub"]

#: seconds the probe waits for the hub
PROBE_TIMEOUT_S = 10.0


class HubUnreachable(ConnectionError):
    """A setting names something that must be downloaded, and the hub cannot be reached."""


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def is_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of model repository ``repo_id``."""
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "ConnectError", "NetworkError", "TimeoutException", "ConnectTimeout"})


def require_hub(repo_id: str, setting: str) -> None:
    """Return if ``repo_id`` is cached or the hub answers; else raise :class:`HubUnreachable`
    naming ``setting`` (e.g. ``model.name='gpt2'``). HTTP errors other than a failed
    connection (a gated or renamed repository) are left to the loader to report."""
    if is_cached(repo_id):
        return
    if _offline():
        raise HubUnreachable(f"{setting} needs {repo_id!r} from the Hugging Face hub, which cannot be reached "
                             "(HF_HUB_OFFLINE=1) and it is not in the local cache: unset HF_HUB_OFFLINE, or download "
                             "it once on a machine with access to the hub, or use a local model / SAE")
    try:
        model_info(repo_id, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # huggingface_hub raises its HTTP client's errors
        if _network_error(e):
            raise HubUnreachable(f"{setting} needs {repo_id!r} from the Hugging Face hub ({constants.ENDPOINT}), "
                                 f"which cannot be reached ({type(e).__name__}: {e}) and it is not in the local "
                                 "cache") from None
