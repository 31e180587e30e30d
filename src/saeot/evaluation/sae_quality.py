"""How good the run's SAEs are: reconstruction, loss recovered, sparsity, dead features.

For every SAE hook h of a finished ``train.py`` run, on up to ``max_tokens`` tokens of
the held-out split (BOS excluded), with ``h_hat = decode(encode(h))``:

* ``explained_variance``: ``1 - sum ||h - h_hat||^2 / sum ||h - mean(h)||^2``;
* ``delta_ce``: next-token cross-entropy (nats per token) with ``h_hat`` spliced in at h
  (every position but BOS; the rest of the model runs on it) minus the clean one;
* ``ce_loss_recovered``: ``(CE_mean - CE_sae) / (CE_mean - CE_clean)``, with ``CE_mean`` the
  cross-entropy when h is replaced by its mean over the run's held-out aligned states
  (mean ablation; 1 = as good as the clean model, 0 = no better than the mean);
* ``l0``: mean number of active features per token;
* ``dead_fraction``: fraction of features that never fired in the run's profile pass;
* ``n_train_tokens``, ``minutes``: from the SAE's ``training.json`` when it was trained
  locally (None otherwise).

The clean pass is shared by all hooks; each hook adds two forward passes from h on
(``start_at_layer``). Stored under ``metrics.json["saes"]`` (callback ``sae_quality``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saeot.evaluation.functional import next_token_ce, run_from_hook
from saeot.pipeline.callbacks import RunCallback
from saeot.pipeline.state import TrainResult
from saeot.saes.codes import decode, encode
from saeot.saes.providers import TRAINING_RECORD

if TYPE_CHECKING:
    from sae_lens import SAE

    from saeot.models.language_model import LanguageModel

__all__ = ["SAEQuality", "sae_quality"]

log = logging.getLogger(__name__)


@torch.no_grad()
def sae_quality(lm: LanguageModel, saes: dict[str, SAE], batches, means: dict[str, torch.Tensor],
                max_tokens: int | None = None) -> dict[str, dict]:
    """The reconstruction and loss numbers of the module docstring, per hook.

    Args:
        lm: the language model.
        saes: hook -> SAE.
        batches: iterable of batch dicts with ``tokens [B, T]`` and ``mask [B, T]``.
        means: hook -> ``[d]`` the mean-ablation vector.
        max_tokens: stop after this many (masked) tokens.
    """
    model = lm.model
    hooks = list(saes)
    z = {h: {"sse": 0.0, "s1": torch.zeros(lm.d_model, dtype=torch.float64), "s2": 0.0, "l0": 0.0,
             "ce_sae": 0.0, "ce_mean": 0.0} for h in hooks}
    ce_clean, n_tok, n_ce = 0.0, 0, 0
    for batch in batches:
        tokens, mask = batch["tokens"], batch["mask"]
        ce_mask = mask[:, :-1]
        logits, cache = model.run_with_cache(tokens, names_filter=hooks)
        ce_clean += float(next_token_ce(logits, tokens)[ce_mask].double().sum())
        del logits
        n_ce += int(ce_mask.sum())
        n_tok += int(mask.sum())
        keep = mask[..., None]
        for h in hooks:
            x = cache[h].float()
            codes = encode(saes[h], x)
            x_hat = decode(saes[h], codes)
            acc = z[h]
            xm = x[mask].double()
            acc["sse"] += float((xm - x_hat[mask].double()).pow(2).sum())
            acc["s1"] += xm.sum(0).cpu()
            acc["s2"] += float(xm.pow(2).sum())
            acc["l0"] += float((codes[mask] > 0).sum())
            for name, value in (("ce_sae", x_hat), ("ce_mean", means[h].to(x)[None, None, :].expand_as(x))):
                sub = torch.where(keep, value, x)
                acc[name] += float(next_token_ce(run_from_hook(model, h, sub, tokens), tokens)[ce_mask].double().sum())
        del cache
        if max_tokens is not None and n_tok >= max_tokens:
            break
    if n_tok == 0:
        raise ValueError("sae_quality: the held-out split has no usable token")
    ce0 = ce_clean / max(n_ce, 1)
    out = {}
    for h, acc in z.items():
        sst = acc["s2"] - float(acc["s1"].pow(2).sum()) / n_tok
        ce_sae, ce_mean = acc["ce_sae"] / max(n_ce, 1), acc["ce_mean"] / max(n_ce, 1)
        gap = ce_mean - ce0
        out[h] = {"explained_variance": 1.0 - acc["sse"] / sst if sst > 0 else float("nan"),
                  "ce_loss_recovered": (ce_mean - ce_sae) / gap if gap > 1e-6 else float("nan"),
                  "delta_ce": ce_sae - ce0, "ce_clean": ce0, "ce_sae": ce_sae, "ce_mean_ablation": ce_mean,
                  "l0": acc["l0"] / n_tok, "n_eval_tokens": n_tok}
    return out


class SAEQuality(RunCallback):
    """``metrics.json["saes"][hook]``: the quality of every SAE of the run (module docstring).

    Args:
        max_tokens: held-out tokens evaluated (the clean pass plus two passes per hook).
        split: the split evaluated (``heldout``).
    """

    key = "saes"

    def __init__(self, max_tokens: int = 8192, split: str = "heldout") -> None:
        self.max_tokens, self.split = max_tokens, split

    def on_matching_end(self, result: TrainResult) -> dict[str, Any]:
        t0 = time.perf_counter()
        run = result.setup
        device = next(run.lm.model.parameters()).device
        means = {h: x.float().mean(0) for h, x in result.streams.aligned.items()}
        batches = run.datamodule.iter_batches(self.split, device=device, hidden=False, progress=True,
                                              desc="SAE quality")
        out = sae_quality(run.lm, run.saes, batches, means, self.max_tokens)
        for h, q in out.items():
            s = result.samples[h]
            q["dead_fraction"] = float((s.n_fire == 0).float().mean())
            q["n_profile_tokens"] = int(s.n_tokens)
            q["d_sae"] = int(run.saes[h].cfg.d_sae)
            q["architecture"] = run.saes[h].cfg.architecture()
            q.update(_training_record(run.sae_records.get(h, {})))
        log.info("SAE quality (%.0f s): %s", time.perf_counter() - t0,
                 {h: (round(q["explained_variance"], 3), round(q["ce_loss_recovered"], 3)) for h, q in out.items()})
        return out


def _training_record(record: dict) -> dict:
    """``n_train_tokens`` and ``minutes`` of a locally trained SAE (None when unknown)."""
    try:
        rec = json.loads((Path(record["path"]) / TRAINING_RECORD).read_text())
    except (KeyError, OSError, json.JSONDecodeError):
        rec = {}
    return {"n_train_tokens": rec.get("n_train_tokens"), "minutes": rec.get("minutes")}
