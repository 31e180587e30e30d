"""The packages corpus (saeot.data.corpus) on a tiny fake site-packages directory."""

import json
import os

import pytest

from saeot.data.corpus import SPLITS, PackagesCorpus, corpus_summary, main, split_of
from saeot.data.datamodule import HiddenStateDataModule
from saeot.data.text import EmptyCorpusError

PROSE = "This sentence documents what the function computes and why a caller would want it. "

PKG_INIT = '''"""Module alpha: {prose}"""

# A block of comments that explains the algorithm in words,
# over two lines, long enough to count as documentation prose here.
X = 1


class Thing:
    """The Thing class. {prose}"""

    def method(self):
        """Method of Thing. {prose}"""


def short():
    """Too short."""


add_docstr(short, """Documentation attached by a call, like torch's add_docstr. {prose}{prose}{prose}""")
'''.replace("{prose}", PROSE)


def _fake_site(root, n_extra: int = 0):
    pkg = root / "alpha"
    (pkg / "docs").mkdir(parents=True)
    (pkg / "tests").mkdir()
    (pkg / "__init__.py").write_text(PKG_INIT)
    # the same docstring as Thing's, with other whitespace and case: dropped as a duplicate
    dup = "class Copy:\n    \"\"\"THE   Thing class.\n" + PROSE.upper() + "\"\"\"\n"
    (root / "beta.py").write_text(dup)
    (pkg / "docs" / "guide.rst").write_text("Guide\n=====\n\n" + PROSE * 3)
    (pkg / "docs" / "table.txt").write_text("\n".join(" ".join(str(i * j) for j in range(10)) for i in range(50)))
    (pkg / "LICENSE.txt").write_text("Permission is hereby granted " + PROSE * 3)
    (pkg / "tests" / "test_alpha.py").write_text('"""Tests of alpha: ' + PROSE + '"""\n')
    meta = root / "alpha-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: alpha\n\n# alpha\n\n" + PROSE * 2)
    (meta / "RECORD").write_text("alpha/__init__.py,sha256=x,10\n")
    for i in range(n_extra):
        (pkg / f"mod{i}.py").write_text(f'"""Extra module number {i}. {PROSE}"""\n')


def _corpus(tmp_path, **kw):
    return PackagesCorpus(roots=[str(tmp_path / "site")], stdlib=False, cache_dir=str(tmp_path / "cache"),
                          progress=False, **kw)


def test_documents_sources_dedup_and_skips(tmp_path):
    _fake_site(tmp_path / "site")
    c = _corpus(tmp_path)
    recs = [r for s in SPLITS for r in c.records(s)]
    ids = {r["id"] for r in recs}
    assert {"alpha:alpha/__init__.py:<module>", "alpha:alpha/__init__.py:Thing",
            "alpha:alpha/__init__.py:Thing.method", "alpha:alpha/docs/guide.rst",
            "alpha:alpha-1.0.dist-info/METADATA"} <= ids
    assert any(i.startswith("alpha:alpha/__init__.py:comment@3") for i in ids)  # the comment block
    assert any(i.startswith("alpha:alpha/__init__.py:string@") for i in ids)  # the add_docstr text
    texts = "\n".join(r["text"] for r in recs)
    assert "Too short" not in texts and "Tests of alpha" not in texts and "Permission" not in texts
    assert "Metadata-Version" not in texts and "sha256" not in texts
    assert not any("table.txt" in i for i in ids)  # numbers, not prose
    assert not any(i.startswith("beta") for i in ids)  # Thing's docstring again, other case/whitespace
    stats = json.loads((c.directory() / "stats.json").read_text())
    assert stats["n_duplicates_dropped"] == 1
    assert len(recs) == len(ids) == 7
    summary = corpus_summary(c)
    assert summary["documents"] == 7 and summary["sources"]["alpha"]["documents"] == 7
    assert summary["bytes"] == sum(len(r["text"].encode()) for r in recs)


def test_split_by_document_is_deterministic_and_disjoint(tmp_path):
    _fake_site(tmp_path / "site", n_extra=300)
    c = _corpus(tmp_path)
    by = {s: [r["id"] for r in c.records(s)] for s in SPLITS}
    all_ids = [i for v in by.values() for i in v]
    assert len(all_ids) == len(set(all_ids)) == 307
    for s, ids in by.items():
        assert all(split_of(i, c.fractions) == s for i in ids)
    n = len(all_ids)
    assert 0.7 * n < len(by["profile"]) < 0.9 * n and 0.04 * n < len(by["heldout"]) < 0.16 * n
    assert by["profile"] != sorted(by["profile"])  # a fixed shuffle, not file order
    again = _corpus(tmp_path)
    assert again.directory() == c.directory()
    assert {s: [r["id"] for r in again.records(s)] for s in SPLITS} == by
    mtime = (c.directory() / "profile.jsonl").stat().st_mtime_ns
    assert (again.directory() / "profile.jsonl").stat().st_mtime_ns == mtime  # read from the cache, not rebuilt
    # another split of the same documents: another cache entry, other splits
    other = _corpus(tmp_path, fractions={"profile": 0.5, "heldout": 0.25, "fresh": 0.25})
    assert other.directory() != c.directory() and len(list(other.records("profile"))) < len(by["profile"])


def test_a_changed_file_builds_a_new_corpus(tmp_path):
    _fake_site(tmp_path / "site")
    c = _corpus(tmp_path)
    first = c.directory()
    guide = tmp_path / "site" / "alpha" / "docs" / "guide.rst"
    guide.write_text("Guide\n=====\n\nA new guide. " + PROSE * 4)
    os.utime(guide, ns=(1, 1))
    c2 = _corpus(tmp_path)
    assert c2.directory() != first
    assert any("A new guide" in t for s in SPLITS for t in c2.split_documents(s))


def test_this_project_is_not_part_of_its_own_corpus(tmp_path):
    """saeot's METADATA is its README: were it in the corpus, every README edit + reinstall would
    build another corpus (found when a reinstall made the suite re-extract it)."""
    site = tmp_path / "site"
    _fake_site(site)
    own = site / "saeot-0.1.0.dist-info"
    own.mkdir()
    (own / "METADATA").write_text("Metadata-Version: 2.1\nName: saeot\n\n# saeot README\n\n" + PROSE * 2)
    (site / "saeot").mkdir()
    (site / "saeot" / "__init__.py").write_text('"""saeot package docstring. ' + PROSE + '"""\n')
    (site / "__editable___saeot_0_1_0_finder.py").write_text('"""saeot editable finder. ' + PROSE + '"""\n')
    (site / "saeotherpkg.py").write_text('"""Another package whose name starts alike. ' + PROSE + '"""\n')
    c = _corpus(tmp_path)
    first = c.directory()
    ids = {r["id"] for s in SPLITS for r in c.records(s)}
    assert not any("saeot" in i.split(":")[1] and "saeotherpkg" not in i for i in ids), ids
    assert any(i.startswith("saeotherpkg:") for i in ids)  # only the distribution itself is left out
    assert "alpha:alpha-1.0.dist-info/METADATA" in ids
    (own / "METADATA").write_text("Metadata-Version: 2.1\nName: saeot\n\n# saeot README, edited\n\n" + PROSE * 3)
    os.utime(own / "METADATA", ns=(1, 1))
    assert _corpus(tmp_path).directory() == first


def test_bad_settings_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="data.text.fractions"):
        PackagesCorpus(roots=[str(tmp_path)], stdlib=False, fractions={"profile": 0.9, "heldout": 0.2, "fresh": 0.0})
    with pytest.raises(EmptyCorpusError, match="data.text.roots"):
        PackagesCorpus(roots=[str(tmp_path / "nowhere")], stdlib=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyCorpusError, match="no documentation text"):
        PackagesCorpus(roots=[str(tmp_path / "empty")], stdlib=False, cache_dir=str(tmp_path / "c")).directory()


def test_data_module_packs_each_split_from_its_own_documents(tiny_lm, tmp_path):
    _fake_site(tmp_path / "site", n_extra=300)
    c = _corpus(tmp_path)
    dm = HiddenStateDataModule(tiny_lm, c, ["blocks.0.hook_resid_post"], context_len=48, max_contexts=40,
                               heldout_fraction=0.25, fresh_contexts=6)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"profile": 30, "heldout": 10, "fresh": 6}
    owner = {}
    for s in SPLITS:
        for r in c.records(s):
            owner[r["text"].split(".")[0]] = s  # "Extra module number 17" -> its split
    n_seen = 0
    for split, idx in dm.splits.items():
        for i in idx:
            text = tiny_lm.codec.decode(dm.contexts[i].tolist())
            found = [k for k in owner if k.startswith("Extra module number") and k + "." in text]
            assert {owner[k] for k in found} <= {split}, (split, text)
            n_seen += len(found)
    assert n_seen >= 8  # markers whole inside one context
    # the run's contexts and fingerprint do not depend on the fresh split
    plain = HiddenStateDataModule(tiny_lm, c, ["blocks.0.hook_resid_post"], context_len=48, max_contexts=40,
                                  heldout_fraction=0.25)
    assert plain.fingerprint() == dm.fingerprint() and "fresh" not in plain.splits


def test_size_command_prints_json(tmp_path, capsys, monkeypatch):
    _fake_site(tmp_path / "site")
    monkeypatch.setattr("saeot.data.corpus._default_roots", lambda: [(tmp_path / "site", False), (tmp_path / "site", True)])
    main(["--no-tokens", "--cache-dir", str(tmp_path / "cache")])
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] >= 7 and set(out["splits"]) == set(SPLITS) and "alpha" in out["sources"]
