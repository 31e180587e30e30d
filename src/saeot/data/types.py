"""The data modules the evaluation and SAE stages accept: the live
:class:`~saeot.data.datamodule.HiddenStateDataModule`, or its activation-store wrapper
:class:`~saeot.data.activation_store.StoredHiddenStates` (which answers everything it does
not store from the live module it wraps).

Callers read many of the live module's attributes (``iter_batches``, ``view``, ``setup``,
``contexts``, ``splits``, ``n_contexts``, ``context_len``, ``fingerprint``, ... and
``stores_hidden`` where present), too many for a small protocol: the alias names the two classes.
"""

from __future__ import annotations

from typing import TypeAlias, Union

from saeot.data.activation_store import StoredHiddenStates
from saeot.data.datamodule import HiddenStateDataModule

__all__ = ["DataModule"]

#: a set-up data module: the live one or the one reading activation stores
DataModule: TypeAlias = Union[HiddenStateDataModule, StoredHiddenStates]
