"""An offline corpus of tens of millions of tokens: the documentation text of the installed packages.

Every machine that ran ``make setup`` holds it, with no download: from every ``.py`` /
``.pyi`` file of the interpreter's ``site-packages`` and standard library the docstrings
(``ast``), the other long documentation strings (``add_docstr(torch.abs, "...")``,
numpy's ``add_newdoc``) and the blocks of ``#`` comments; the ``.rst`` / ``.md`` /
``.txt`` documentation files shipped in ``site-packages``; and the long descriptions
(READMEs) in the packages' ``METADATA``.

* **Documents**: one docstring (id ``source:relpath:qualname``), one documentation
  string or comment block (``source:relpath:string@line`` / ``comment@line``), one
  documentation file (``source:relpath``), one ``METADATA`` body. ``source`` is the
  top-level package (``torch``, ``numpy``, ...) or ``stdlib``. Test directories,
  licences, changelogs, build metadata and text that is mostly not prose (tables of
  numbers) are skipped.
* **Deduplicated**: a document whose normalised text (whitespace collapsed, case
  folded) hashes like an earlier one's is dropped; "earlier" is the sorted order of
  (source, path, position in the file), so the result does not depend on the file system.
* **Split by document**: ``sha256(id)`` gives each document a number ``u`` in [0, 1);
  ``u < profile`` -> ``profile``, ``u < profile + heldout`` -> ``heldout``, the rest
  ``fresh``. No document is in two splits. Within a split, documents are ordered by a
  second hash of the id (a fixed shuffle, so that the first contexts are not all from
  one package).

The documents are extracted once (a few minutes on two cores) into
``<cache>/corpus/<key>/{profile,heldout,fresh}.jsonl`` (written atomically, trusted only
with its completion marker); ``key`` hashes the settings and the name, size and mtime
of every file read, so installing a package builds a new corpus.

:class:`PackagesCorpus` is a text source (``conf/data/packages_corpus.yaml``): iterating
it yields every document (profile, then heldout, then fresh);
:meth:`PackagesCorpus.split_documents` yields one split's, which
:class:`saeot.data.datamodule.HiddenStateDataModule` uses to pack each split from its
own documents.

``python -m saeot.data.corpus`` prints its size (tokens of the SmolLM2 tokenizer, all
counted; ``--sample-every N`` estimates them from every N-th document), documents,
bytes and per-source counts.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import io
import json
import logging
import sys
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from saeot.data.text import EmptyCorpusError, iter_docstrings
from saeot.io import build_dir_atomically, default_cache_dir
from saeot.progress import progress_bar

__all__ = ["SPLITS", "Document", "PackagesCorpus", "collect_documents", "split_of", "normalized_hash"]

log = logging.getLogger(__name__)

SPLITS = ("profile", "heldout", "fresh")
DOC_SUFFIXES = (".rst", ".md", ".txt")
_SKIP_DIRS = {"test", "tests", "testing", "__pycache__", "idlelib", "lib2to3", "turtledemo", "site-packages"}
_SKIP_DOC_DIRS = {"data", "benchmarks", "examples", "fixtures"}  # data files named .txt, not documentation
_SKIP_NAME_PARTS = ("license", "licence", "copying", "notice", "authors", "requirements", "entry_points",
                    "top_level", "record", "sources", "dependency_links", "installer", "requested", "wheel",
                    "namespace_packages", "not-zip-safe", "api_tests", "changelog", "changes", "history")
#: distributions left out: this project itself (its METADATA is the README, which changes with every
#: edit and reinstall: the corpus, and every cache keyed on it, would change with it)
_SKIP_DISTS = {"saeot"}
FORMAT = 1


@dataclass(frozen=True)
class Document:
    """One document: ``id`` (``source:relpath[:qualname]``), its ``source`` and its ``text``."""

    id: str
    source: str
    text: str


def normalized_hash(text: str) -> str:
    """Hash of the text with whitespace collapsed and case folded (the deduplication key)."""
    return hashlib.sha256(" ".join(text.split()).casefold().encode()).hexdigest()


def _unit(doc_id: str, salt: str) -> float:
    h = hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_of(doc_id: str, fractions: dict[str, float]) -> str:
    """The split of a document: ``u = sha256(id)`` in [0, 1) against the cumulative ``fractions``."""
    u, acc = _unit(doc_id, "split"), 0.0
    for name in SPLITS[:-1]:
        acc += fractions[name]
        if u < acc:
            return name
    return SPLITS[-1]


def _prose(text: str, min_letters: float = 0.5) -> bool:
    """Mostly letters and spaces (skips tables of numbers, hex dumps, word lists)."""
    if not text:
        return False
    n_letters = sum(c.isalpha() or c.isspace() for c in text[:20000])
    return n_letters / min(len(text), 20000) >= min_letters and len(text.split()) >= 8


def _own(top: str) -> bool:
    """``top`` (a site-packages entry) belongs to a distribution in :data:`_SKIP_DISTS`
    (its package, its ``.dist-info``, its editable-install hooks)."""
    name = top.lower()
    for d in _SKIP_DISTS:
        if name in (d, f"{d}.py") or name.startswith((f"{d}-", f"__editable__.{d}-", f"__editable___{d}_")):
            return True
    return False


def _skipped(rel: Path) -> bool:
    parts = [p.lower() for p in rel.parts]
    if _own(parts[0]):
        return True
    if _SKIP_DIRS.intersection(parts[:-1]):
        return True
    if any(p.endswith(".dist-info") or p.endswith(".egg-info") for p in parts[:-1]):
        return parts[-1] != "metadata"
    return False


def _candidate_files(root: Path, stdlib: bool) -> list[Path]:
    """The files a root contributes, sorted: ``.py`` (docstrings), doc files and METADATA."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if not p.is_file() or _skipped(rel):
            continue
        name = p.name.lower()
        if p.suffix in (".py", ".pyi"):
            out.append(p)
        elif not stdlib and name == "metadata" and rel.parts[0].endswith(".dist-info"):
            out.append(p)
        elif (not stdlib and p.suffix.lower() in DOC_SUFFIXES and not any(s in name for s in _SKIP_NAME_PARTS)
              and not _SKIP_DOC_DIRS.intersection(q.lower() for q in rel.parts[:-1])):
            out.append(p)
    return sorted(out)


def _source(rel: Path, stdlib: bool) -> str:
    if stdlib:
        return "stdlib"
    top = rel.parts[0]
    if top.endswith(".dist-info"):
        return top.split("-")[0].lower()
    return Path(top).stem.lower() if len(rel.parts) == 1 else top.lower()


def _doc_strings(tree: ast.Module, min_chars: int) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of string constants that are documentation but not docstrings
    (``add_docstr(torch.abs, "...")``, ``add_newdoc(...)``, ``_shared_docs[...] = "..."``):
    at least ``max(min_chars, 200)`` characters of prose."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and len(node.value) >= max(min_chars, 200) and _prose(node.value)):
            yield node.lineno, inspect.cleandoc(node.value)


def _comment_blocks(source: str, min_chars: int) -> Iterator[tuple[int, str]]:
    """``(first line, text)`` of runs of consecutive ``#`` comment lines (``#`` stripped), at
    least ``min_chars`` characters of prose (licence headers repeat and are deduplicated)."""
    block: list[str] = []
    start = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                if not block:
                    start = tok.start[0]
                block.append(tok.string.lstrip("#").strip())
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                text = "\n".join(block).strip()
                if len(text) >= min_chars and _prose(text):
                    yield start, text
                block = []
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return


def _metadata_body(text: str) -> str:
    """The long description of a ``METADATA`` file (the part after the first blank line)."""
    head, sep, body = text.partition("\n\n")
    return body if sep else ""


def _file_documents(path: Path, rel: Path, source: str, min_chars: int, max_file_bytes: int) -> Iterator[Document]:
    try:
        if path.stat().st_size > max_file_bytes:
            return
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    base = f"{source}:{rel.as_posix()}"
    if path.suffix in (".py", ".pyi"):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return
        for qualname, doc in iter_docstrings(tree):
            if len(doc) >= min_chars:
                yield Document(f"{base}:{qualname}", source, doc)
        for line, doc in _doc_strings(tree, min_chars):
            yield Document(f"{base}:string@{line}", source, doc)
        for line, doc in _comment_blocks(text, min_chars):
            yield Document(f"{base}:comment@{line}", source, doc)
        return
    if path.name == "METADATA":
        text = _metadata_body(text)
    text = text.strip()
    if len(text) >= min_chars and _prose(text):
        yield Document(base, source, text)


def collect_documents(
    roots: Sequence[tuple[Path, bool]], min_chars: int = 80, max_file_bytes: int = 4_000_000, progress: bool = False,
) -> tuple[list[Document], int]:
    """Every document of ``roots`` (``(directory, is_stdlib)``) in sorted order, deduplicated.

    Returns the kept documents and the number of duplicates dropped.
    """
    files = [(root, p, stdlib) for root, stdlib in roots for p in _candidate_files(root, stdlib)]
    files.sort(key=lambda t: (_source(t[1].relative_to(t[0]), t[2]), t[1].relative_to(t[0]).as_posix()))
    seen: set[str] = set()
    docs: list[Document] = []
    n_dup = 0
    for root, path, stdlib in progress_bar(files, desc="corpus: read files", enabled=progress, mininterval=2):
        rel = path.relative_to(root)
        for doc in _file_documents(path, rel, _source(rel, stdlib), min_chars, max_file_bytes):
            key = normalized_hash(doc.text)
            if key in seen:
                n_dup += 1
                continue
            seen.add(key)
            docs.append(doc)
    return docs, n_dup


def _default_roots() -> list[tuple[Path, bool]]:
    paths = sysconfig.get_paths()
    roots = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and all(p != r for r, _ in roots):
            roots.append((p, False))
    roots.append((Path(paths["stdlib"]), True))
    return roots


class PackagesCorpus:
    """Docstrings and documentation of the installed packages and the standard library,
    deduplicated and split by document (module docstring).

    Args:
        roots: directories of packages (default: this interpreter's ``site-packages``).
        stdlib: include the standard library's docstrings.
        stdlib_root: the standard library directory (default: this interpreter's).
        min_chars: shorter documents are skipped.
        max_file_bytes: larger files are skipped (generated code, data).
        fractions: share of documents in ``profile`` / ``heldout`` / ``fresh`` (sums to 1).
        cache_dir: cache root (default ``$SAEOT_CACHE`` or ``~/.cache/saeot``).
        progress: progress bar while the corpus is first extracted.
    """

    def __init__(
        self,
        roots: Sequence[str] | None = None,
        stdlib: bool = True,
        stdlib_root: str | None = None,
        min_chars: int = 80,
        max_file_bytes: int = 4_000_000,
        fractions: dict[str, float] | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        fr = dict(fractions or {"profile": 0.8, "heldout": 0.1, "fresh": 0.1})
        if set(fr) != set(SPLITS) or any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1) > 1e-6:
            raise ValueError(f"data.text.fractions={fr}: give profile, heldout and fresh, >= 0, summing to 1")
        self.fractions = {k: float(fr[k]) for k in SPLITS}
        default = _default_roots()
        pkg_roots = [(Path(r).expanduser(), False) for r in roots] if roots is not None else [
            r for r in default if not r[1]]
        for r, _ in pkg_roots:
            if not r.is_dir():
                raise EmptyCorpusError(f"data.text.roots: {str(r)!r} is not a directory")
        std = [(Path(stdlib_root).expanduser() if stdlib_root else default[-1][0], True)] if stdlib else []
        self.roots = pkg_roots + std
        self.min_chars, self.max_file_bytes = min_chars, max_file_bytes
        self.cache_dir, self.progress = cache_dir, progress
        self._dir: Path | None = None

    # ------------------------------------------------------------------ cache
    def _source_stamp(self) -> dict:
        """Settings plus (name, size, mtime) of every file read: the cache key's input."""
        h = hashlib.sha256()
        for root, stdlib in self.roots:
            for p in _candidate_files(root, stdlib):
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"format": FORMAT, "roots": [[str(r), s] for r, s in self.roots], "min_chars": self.min_chars,
                "max_file_bytes": self.max_file_bytes, "fractions": self.fractions, "files": h.hexdigest()}

    def directory(self) -> Path:
        """The cached corpus directory, extracted on first use."""
        if self._dir is not None:
            return self._dir
        source = self._source_stamp()
        key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        self._dir = build_dir_atomically(root / "corpus" / key, source, self._build)
        return self._dir

    def _build(self, out: Path) -> None:
        log.info("extracting the packages corpus from %s (once)", [str(r) for r, _ in self.roots])
        docs, n_dup = collect_documents(self.roots, self.min_chars, self.max_file_bytes, self.progress)
        if not docs:
            raise EmptyCorpusError(f"data.text.roots={[str(r) for r, _ in self.roots]} hold no documentation text")
        by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for d in docs:
            by_split[split_of(d.id, self.fractions)].append(d)
        stats: dict = {"n_duplicates_dropped": n_dup, "splits": {}}
        for split, items in by_split.items():
            items.sort(key=lambda d: _unit(d.id, "order"))
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for d in items:
                    f.write(json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n")
            stats["splits"][split] = {"documents": len(items), "chars": sum(len(d.text) for d in items)}
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    # ------------------------------------------------------------------ text source
    def describe(self) -> str:
        return f"packages_corpus:{self.directory().name}"

    def records(self, split: str) -> Iterator[dict]:
        """``{"id", "source", "text"}`` of every document of ``split``, in the corpus order."""
        if split not in SPLITS:
            raise ValueError(f"unknown corpus split {split!r}; expected one of {SPLITS}")
        with open(self.directory() / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def split_documents(self, split: str) -> Iterator[str]:
        """The texts of ``split``'s documents, in the corpus order."""
        for r in self.records(split):
            yield r["text"]

    def __iter__(self) -> Iterator[str]:
        for split in SPLITS:
            yield from self.split_documents(split)


# --------------------------------------------------------------------------- the size command


def corpus_summary(corpus: PackagesCorpus, tokenizer=None, exact: bool = False, sample_every: int = 50,
                   top: int = 25) -> dict:
    """Documents, bytes and tokens per split and per source.

    Tokens are counted with ``tokenizer`` (a Hugging Face tokenizer) on every document
    when ``exact``, else on every ``sample_every``-th document and scaled by bytes.
    """
    per_source: dict[str, dict] = {}
    per_split: dict[str, dict] = {}
    sample: list[str] = []
    n = 0
    for split in SPLITS:
        s = per_split.setdefault(split, {"documents": 0, "bytes": 0})
        for r in corpus.records(split):
            b = len(r["text"].encode("utf-8"))
            src = per_source.setdefault(r["source"], {"documents": 0, "bytes": 0})
            src["documents"] += 1
            src["bytes"] += b
            s["documents"] += 1
            s["bytes"] += b
            if exact or n % sample_every == 0:
                sample.append(r["text"])
            n += 1
    total_bytes = sum(s["bytes"] for s in per_split.values())
    out = {"directory": str(corpus.directory()), "documents": n, "bytes": total_bytes,
           "duplicates_dropped": json.loads((corpus.directory() / "stats.json").read_text())["n_duplicates_dropped"]}
    if tokenizer is not None and sample:
        n_tok = 0
        for i in range(0, len(sample), 256):
            n_tok += sum(len(ids) for ids in tokenizer(sample[i:i + 256], add_special_tokens=False)["input_ids"])
        bytes_per_token = sum(len(t.encode("utf-8")) for t in sample) / max(n_tok, 1)
        out["tokens"] = n_tok if exact else int(total_bytes / bytes_per_token)
        out["tokens_counted"] = "exact" if exact else f"estimated from every {sample_every}th document ({len(sample)} documents, {n_tok} tokens)"
        out["bytes_per_token"] = round(bytes_per_token, 3)
        for d in list(per_split.values()) + list(per_source.values()):
            d["tokens_est"] = int(d["bytes"] / bytes_per_token)
    out["splits"] = per_split
    ranked = sorted(per_source.items(), key=lambda kv: -kv[1]["bytes"])
    out["sources"] = dict(ranked[:top])
    if len(ranked) > top:
        rest = ranked[top:]
        out["sources"][f"other ({len(rest)} sources)"] = {
            k: sum(v[k] for _, v in rest) for k in rest[0][1]}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m saeot.data.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--sample-every", type=int, default=0,
                   help="estimate tokens from every n-th document (default 0: tokenize all, ~30 s on 2 cores)")
    p.add_argument("--no-tokens", action="store_true", help="do not load the SmolLM2 tokenizer")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = PackagesCorpus(cache_dir=args.cache_dir)
    tok = None
    if not args.no_tokens:
        from transformers import AutoTokenizer  # slow import, only for counting tokens

        from saeot.models import ensure_smollm2_hf_dir

        tok = AutoTokenizer.from_pretrained(ensure_smollm2_hf_dir(args.cache_dir))
    summary = corpus_summary(corpus, tok, exact=args.sample_every <= 0, sample_every=max(args.sample_every, 1))
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
