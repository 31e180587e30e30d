"""The command line: sweep job directories that the override grammar accepts back."""

import re

from hydra.core.override_parser.overrides_parser import OverridesParser

from saeot.cli import path_slug


def test_sweep_job_dir_names_are_plain_override_values():
    """A job dir named from overrides with a path, a glob and a list is still one plain value
    for ``evaluate.py run_dir=...`` (Hydra's own ``k=v,k=v`` naming breaks its grammar)."""
    raw = "logger=none,matcher=semantic_ot,data.text.paths=[/data/*.txt]"
    parser = OverridesParser.create()
    try:
        parser.parse_override(f"run_dir=multirun/x/0_{raw}")
        raised = False
    except Exception:
        raised = True
    assert raised  # the problem the slug solves
    slug = path_slug(raw)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", slug)
    assert "matcher-semantic_ot" in slug and "*" not in slug
    value = f"multirun/x/0_{slug}"
    assert parser.parse_override(f"run_dir={value}").value() == value


def test_slug_is_bounded_and_never_empty():
    assert path_slug("") == "job"
    assert len(path_slug("a=" + "x" * 500)) == 120
