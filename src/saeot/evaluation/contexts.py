"""Top-activating contexts of a feature, read from a run's feature samples; shared by the
LLM judge (:mod:`saeot.evaluation.judge`) and ``report.html`` (:mod:`saeot.evaluation.report`).

A feature's profiling kept its K largest (or reservoir-sampled) activations with their
``locations [F, K, 2]`` = (context index, position) into the run's packed contexts
``[N, T]``. A :class:`Context` is the text around one such position: ``window`` tokens
left of the firing token, the token, ``right`` tokens right of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saeot.pipeline.rundir import read_feature_tensors

if TYPE_CHECKING:
    from saeot.models.codecs import TextCodec

__all__ = ["NEWLINE_MARK", "Context", "feature_contexts", "FeatureContexts"]

NEWLINE_MARK = "⏎"


@dataclass
class Context:
    """One top-activating context of a feature: text left of the token, the token, text right."""

    left: str
    token: str
    right: str
    activation: float
    context_index: int = -1
    position: int = -1

    def marked(self) -> str:
        """``left<<token>>right`` (the prompt's form)."""
        return f"{self.left}<<{self.token}>>{self.right}"


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", NEWLINE_MARK).replace("\t", " ")


def feature_contexts(
    locations: Tensor, activations: Tensor, contexts: Tensor, codec: TextCodec, n: int = 5, window: int = 12,
    right: int = 4, skip_ids: Sequence[int] = (),
) -> list[Context]:
    """The ``n`` most active distinct contexts of one feature.

    Args:
        locations: ``[K, 2]`` (context index into ``contexts``, position), -1 on padding.
        activations: ``[K]`` the feature's activation there.
        contexts: ``[N, T]`` the run's packed token contexts (``datamodule.contexts``).
        codec: decodes token ids (``lm.codec``).
        n: contexts returned (fewer if the feature has fewer samples).
        window / right: tokens shown left / right of the marked token.
        skip_ids: ids dropped from the shown text (BOS).

    Newlines are shown as ``⏎`` so that a snippet stays on one line.
    """
    valid = (locations[:, 0] >= 0) & (locations[:, 1] >= 0)
    idx = torch.nonzero(valid).flatten()
    idx = idx[torch.argsort(activations[idx].float(), descending=True, stable=True)]
    out: list[Context] = []
    seen: set[tuple[int, int]] = set()
    skip = set(int(i) for i in skip_ids)
    for k in idx.tolist():
        ci, pos = int(locations[k, 0]), int(locations[k, 1])
        if (ci, pos) in seen or ci >= contexts.shape[0] or pos >= contexts.shape[1]:
            continue
        seen.add((ci, pos))
        row = contexts[ci].tolist()
        left_ids = [t for t in row[max(0, pos - window):pos] if t not in skip]
        right_ids = [t for t in row[pos + 1:pos + 1 + right] if t not in skip]
        out.append(Context(
            left=_clean(codec.decode(left_ids)) if left_ids else "",
            token=_clean(codec.decode([row[pos]])),
            right=_clean(codec.decode(right_ids)) if right_ids else "",
            activation=float(activations[k]), context_index=ci, position=pos,
        ))
        if len(out) >= n:
            break
    return out


class FeatureContexts:
    """The top contexts of any feature of a run.

    Reads only the small tensors of ``run_dir/features/<hook>.safetensors`` (locations,
    activations, n_fire), once per hook; ``contexts [N, T]`` are the run's packed token
    contexts (the evaluation data module's, whose first N are the run's own) and ``codec``
    the model's text codec. One object serves the judge and the report of a run.
    """

    TENSORS = ("locations", "activations", "n_fire")

    def __init__(self, run_dir: str | Path, contexts: Tensor, codec: TextCodec) -> None:
        self.run_dir = Path(run_dir)
        self.contexts, self.codec = contexts, codec
        self._tensors: dict[str, dict[str, Tensor]] = {}
        bos = getattr(codec, "bos_token_id", None)
        self.skip_ids = () if bos is None else (int(bos),)

    def _load(self, hook: str) -> dict[str, Tensor]:
        if hook not in self._tensors:
            path = self.run_dir / "features" / f"{hook}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the judge and the report need the run's feature samples")
            self._tensors[hook] = read_feature_tensors(path, self.TENSORS)
        return self._tensors[hook]

    def has_contexts(self, hook: str) -> Tensor:
        """``[F]`` bool: features with at least one sample."""
        return (self._load(hook)["locations"][:, :, 0] >= 0).any(1)

    def n_fire(self, hook: str) -> Tensor:
        """``[F]`` tokens on which each feature fired during the run's profiling."""
        return self._load(hook)["n_fire"]

    def get(self, hook: str, feature: int, n: int = 5, window: int = 12, right: int = 4) -> list[Context]:
        """The ``n`` most active contexts of ``feature`` at ``hook`` (see :func:`feature_contexts`)."""
        t = self._load(hook)
        return feature_contexts(t["locations"][feature], t["activations"][feature], self.contexts, self.codec,
                                n=n, window=window, right=right, skip_ids=self.skip_ids)
