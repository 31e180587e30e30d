"""Profiling: one streaming pass turns every SAE feature into K weighted samples.

* :mod:`~saeot.profiling.samplers`: per-feature top-K / weighted-reservoir samplers (exact merge);
* :mod:`~saeot.profiling.statistics`: streaming co-moments (activation correlation; exact merge);
* :mod:`~saeot.profiling.stream`: the Lightning pass (``Trainer.predict``) and the consumers
  that absorb its batches and merge across DDP ranks.
"""

from saeot.profiling.samplers import MODES, StreamingProfiler, check_profiling, flatten_batch
from saeot.profiling.statistics import CorrelationAccumulator
from saeot.profiling.stream import (
    AlignedStatesConsumer,
    Consumer,
    CorrelationConsumer,
    ProfileConsumer,
    StreamPass,
)

__all__ = [
    "MODES", "StreamingProfiler", "check_profiling", "flatten_batch", "CorrelationAccumulator",
    "AlignedStatesConsumer", "Consumer", "CorrelationConsumer", "ProfileConsumer", "StreamPass",
]
