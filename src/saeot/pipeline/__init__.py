"""A run as stages that hand typed results down (see :mod:`saeot.pipeline.state`).

``train.py`` = :func:`run_train`: :func:`setup` -> :func:`stream` -> :func:`fit_reference`
-> :func:`match` -> callbacks -> artifacts. ``evaluate.py`` reads a finished run
back with :class:`saeot.pipeline.rundir.RunDir` and never rebuilds it.
"""

from saeot.pipeline.artifacts import (
    MATCH_COLUMNS,
    read_matches,
    save_artifacts,
    write_feature_stats,
    write_matches,
)
from saeot.pipeline.callbacks import RunCallback
from saeot.pipeline.config import (
    ConfigError,
    build,
    check_layers,
    layer_ids,
    layer_pairs,
    run_hooks,
)
from saeot.pipeline.run import log_run, run_train
from saeot.pipeline.stages import fit_reference, match, setup, stream, summarize
from saeot.pipeline.state import Matches, ReferenceFit, RunSetup, Streams, TrainResult

__all__ = [
    "MATCH_COLUMNS", "read_matches", "save_artifacts", "write_feature_stats", "write_matches",
    "RunCallback",
    "ConfigError", "build", "check_layers", "layer_ids", "layer_pairs", "run_hooks",
    "fit_reference", "match", "setup", "stream", "summarize",
    "Matches", "ReferenceFit", "RunSetup", "Streams", "TrainResult",
    "log_run", "run_train",
]
