"""The language model saeot reads hidden states from: a frozen HookedTransformer,
its text codec and a short name.

Hook names are transformer_lens's, built by :mod:`saeot.hooks`:
``blocks.{layer}.hook_resid_post`` etc.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from saeot.hooks import hook_name
from saeot.models.codecs import TextCodec

__all__ = ["LanguageModel"]


@dataclass
class LanguageModel:
    """A HookedTransformer (eval mode, frozen), its text codec and a short name.

    Attributes:
        model: the transformer; ``model(tokens)`` maps ``[batch, T]`` long ids to
            ``[batch, T, d_vocab]`` logits.
        codec: turns text into the ids the model reads.
        name: short identifier used in run directories and reports, e.g.
            ``"smollm2_135m"``, ``"tiny_random"``, ``"gpt2"``.
    """

    model: HookedTransformer
    codec: TextCodec
    name: str

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_name(self, layer: int, site: str = "resid_post") -> str:
        """The transformer_lens hook name ``blocks.{layer}.hook_{site}``
        (:func:`saeot.hooks.hook_name`), checked against this model.

        Raises ValueError if ``layer`` is not in ``0..n_layers-1`` or the model has no
        such hook (e.g. a misspelt ``site``). Activations at ``resid_*`` hooks have
        shape ``[batch, T, d_model]``.
        """
        try:
            layer = operator.index(layer)  # ints and numpy ints; not floats or strings
        except TypeError:
            raise ValueError(f"layer must be an integer, got {layer!r}") from None
        if not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer!r} is out of range for model {self.name!r} "
                f"({self.n_layers} layers: 0..{self.n_layers - 1})"
            )
        name = hook_name(layer, site)
        if name not in self.model.hook_dict:
            prefix = hook_name(layer, "")  # "blocks.{layer}.hook_"
            sites = sorted(h.removeprefix(prefix) for h in self.model.hook_dict if h.startswith(prefix))
            raise ValueError(f"model {self.name!r} has no hook {name!r}; sites: {sites}")
        return name

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        """Tokenize ``text`` with the codec: a ``[1, T]`` long tensor on the model's
        device, with BOS first if ``prepend_bos`` (T = len(codec.encode(text)) + 1)."""
        ids = self.codec.encode(text)
        if prepend_bos:
            bos = self.codec.bos_token_id
            if bos is None:
                raise ValueError(
                    f"model {self.name!r} has no BOS token; call to_tokens(..., prepend_bos=False)"
                )
            ids = [bos, *ids]
        return torch.tensor([ids], dtype=torch.long, device=self.device)
