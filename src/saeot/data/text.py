"""Text sources: where the tokens that are streamed through the model come from.

A text source is an iterable of documents (strings) in a fixed order. Hydra
builds one from ``conf/data/*.yaml`` (``data.text``):

* :class:`StdlibDocstrings` -- docstrings of the Python standard library (offline,
  present on every machine; the default);
* :class:`TextFiles` -- local files or globs;
* :class:`HFDataset` -- a Hugging Face dataset, streamed (online).
"""

from __future__ import annotations

import ast
import glob
import sysconfig
from collections.abc import Iterator
from pathlib import Path


class EmptyCorpusError(ValueError):
    """The configured text source yields no usable text."""


def iter_docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` of a module and of its classes and functions, in
    ``ast.walk`` order (the module first; ``"<module>"`` is its name). Empty docstrings are skipped."""
    names: dict[ast.AST, str] = {tree: "<module>"}
    for node in ast.walk(tree):
        parent = names.get(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[child] = child.name if parent in (None, "<module>") else f"{parent}.{child.name}"
            elif parent is not None and parent != "<module>":
                names[child] = parent
    for node in ast.walk(tree):
        if node is tree or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield names.get(node, getattr(node, "name", "?")), doc


class StdlibDocstrings:
    """Module, class and function docstrings of the Python standard library.

    Args:
        root: the standard library directory (default: this interpreter's).
        min_chars: docstrings shorter than this are skipped.
        max_docs: stop after this many docstrings (None: all, about 1.7 MB of text).
    """

    def __init__(self, root: str | None = None, min_chars: int = 80, max_docs: int | None = None) -> None:
        self.root = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
        self.min_chars = min_chars
        self.max_docs = max_docs

    def describe(self) -> str:
        return f"stdlib_docs:{self.root}:{self.min_chars}:{self.max_docs}"

    def _files(self) -> list[Path]:
        skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
        return sorted(
            p for p in self.root.rglob("*.py") if not skip.intersection(p.relative_to(self.root).parts)
        )

    def __iter__(self) -> Iterator[str]:
        if not self.root.is_dir():
            raise EmptyCorpusError(f"data.text.root={str(self.root)!r} is not a directory")
        n = 0
        for path in self._files():
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for _, doc in iter_docstrings(tree):
                if len(doc) >= self.min_chars:
                    yield doc
                    n += 1
                    if self.max_docs is not None and n >= self.max_docs:
                        return


class TextFiles:
    """Plain-text files, given as paths or glob patterns (documents = files).

    A file that holds NUL bytes (binary) or does not decode with ``encoding`` is an
    error naming it (never silently replaced characters); empty files are skipped, and
    an error says so when every file is empty.

    Args:
        paths: a path, a glob, or a list of them.
        encoding: text encoding of the files.
        max_docs: read at most this many (non-empty) files (None: all).
    """

    def __init__(self, paths: str | list[str], encoding: str = "utf-8", max_docs: int | None = None) -> None:
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self.encoding = encoding
        if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1):
            raise ValueError(f"data.text.max_docs={max_docs!r} must be a positive integer or null")
        self.max_docs = max_docs

    def describe(self) -> str:
        files = self.files()
        stamp = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
        return f"text_files:{stamp}:{self.encoding}:{self.max_docs}"

    def files(self) -> list[Path]:
        out: list[Path] = []
        for pattern in self.paths:
            matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
            out.extend(Path(m) for m in matches if Path(m).is_file())
        if not out:
            raise EmptyCorpusError(f"data.text.paths={self.paths} matches no files")
        return out

    def read(self, f: Path) -> str:
        """The text of file ``f``; ValueError naming it (and ``data.text``) if it is binary or not ``encoding``."""
        raw = f.read_bytes()
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise ValueError(f"data.text.paths: {f} is binary (NUL byte at offset {nul}); pass text files only")
        try:
            return raw.decode(self.encoding)
        except UnicodeDecodeError as e:
            raise ValueError(f"data.text.paths: {f} is not valid {self.encoding} (byte {raw[e.start]:#04x} at offset "
                             f"{e.start}); convert it or set data.text.encoding") from None
        except LookupError:
            raise ValueError(f"data.text.encoding={self.encoding!r} is not a text encoding Python knows") from None

    def __iter__(self) -> Iterator[str]:
        files, n = self.files(), 0
        for f in files:
            text = self.read(f)
            if text.strip():
                yield text
                n += 1
                if self.max_docs is not None and n >= self.max_docs:
                    return
        if n == 0:
            raise EmptyCorpusError(f"data.text.paths={self.paths}: all {len(files)} file(s) are empty")


class HFDataset:
    """A Hugging Face dataset, streamed (needs the network unless cached locally).

    Args:
        path: dataset name on the hub (e.g. ``monology/pile-uncopyrighted``) or a local path.
        split: dataset split.
        text_field: column with the text.
        name: dataset configuration name.
        max_docs: stop after this many documents.
    """

    def __init__(
        self, path: str, split: str = "train", text_field: str = "text", name: str | None = None,
        max_docs: int | None = 10000,
    ) -> None:
        self.path, self.split, self.text_field, self.name, self.max_docs = path, split, text_field, name, max_docs

    def describe(self) -> str:
        return f"hf_dataset:{self.path}:{self.name}:{self.split}:{self.text_field}:{self.max_docs}"

    def __iter__(self) -> Iterator[str]:
        from datasets import load_dataset  # optional (data=hf_dataset only) and slow to import

        ds = load_dataset(self.path, self.name, split=self.split, streaming=True)
        for i, row in enumerate(ds):
            if self.max_docs is not None and i >= self.max_docs:
                return
            if self.text_field not in row:
                raise KeyError(f"data.text.text_field={self.text_field!r} not in dataset columns {list(row)}")
            yield row[self.text_field]
