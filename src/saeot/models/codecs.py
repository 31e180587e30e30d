"""Text codecs: text to token ids and back, for the data module and the prompts.

:class:`ByteCodec` is the tokenizer of the tiny random model (UTF-8 bytes);
:class:`HFCodec` wraps a Hugging Face tokenizer. Both satisfy :class:`TextCodec`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["TextCodec", "ByteCodec", "HFCodec"]


@runtime_checkable
class TextCodec(Protocol):
    """Turns text into token ids and back; what the data module tokenizes with."""

    bos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (length T), without BOS or any other special token."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the token ids ``ids`` (length T)."""
        ...


class ByteCodec:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, 256 is BOS; vocab_size 257.

    Lossless for any text. Used with :func:`saeot.models.load_tiny_random`.
    """

    bos_token_id: int | None = 256
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte of ``text`` (so T = ``len(text.encode())``), no BOS."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; BOS ids are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= 256]
        if bad:
            raise ValueError(f"ByteCodec ids must be in 0..256, got {bad[:5]}")
        return bytes(i for i in ids if i != 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteCodec()"


class HFCodec:
    """A Hugging Face tokenizer as a :class:`TextCodec`.

    ``encode`` adds no special tokens (the caller decides about BOS through
    :meth:`saeot.models.LanguageModel.to_tokens`); ``vocab_size`` is ``len(tokenizer)``,
    i.e. including added tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (length T), without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (length T); special tokens are kept as text."""
        return self.tokenizer.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFCodec({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"
