"""Where a run's time and memory go: wall seconds and peak resident memory per stage, the
``resources`` block of ``metrics.json``.

    clock = StageClock()
    with clock.stage("setup"):
        ...
    metrics["resources"] = clock.summary()

Peak RSS is the process's high-water mark (:func:`peak_rss_gb`), read when each stage ends: it never decreases, so the stage whose entry jumps is the one that raised it.
``peak_rss_gb_children`` is the same for finished child processes (DDP workers launched by
this one, data-loader workers).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

__all__ = ["peak_rss_gb", "StageClock"]

#: ru_maxrss is in bytes on macOS, kilobytes on Linux
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss_gb(who: int = resource.RUSAGE_SELF) -> float:
    """The high-water mark of resident memory of this process (or its finished children), GB.

    On Linux this process's own is ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s
    ``ru_maxrss`` survives ``exec``, so a process started from a large one (a test runner, a
    launcher) would report its parent's size."""
    if who == resource.RUSAGE_SELF:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / 1e9
        except OSError:
            pass
    return resource.getrusage(who).ru_maxrss * _RSS_UNIT / 1e9


class StageClock:
    """Wall seconds and the peak RSS at the end of each named stage, in the order they ran."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            entry = self.stages.setdefault(name, {"seconds": 0.0, "peak_rss_gb": 0.0})
            entry["seconds"] += time.perf_counter() - t
            entry["peak_rss_gb"] = round(peak_rss_gb(), 3)

    def summary(self) -> dict:
        """``{"stages": [{stage, seconds, peak_rss_gb}, ...] (in the order they ran), "seconds_total",
        "peak_rss_gb", "peak_rss_gb_children"}``."""
        return {
            "stages": [{"stage": k, "seconds": round(v["seconds"], 3), "peak_rss_gb": v["peak_rss_gb"]}
                       for k, v in self.stages.items()],
            "seconds_total": round(time.perf_counter() - self.t0, 3),
            "peak_rss_gb": round(peak_rss_gb(), 3),
            "peak_rss_gb_children": round(peak_rss_gb(resource.RUSAGE_CHILDREN), 3),
        }
