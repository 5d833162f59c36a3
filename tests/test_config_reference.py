"""The configuration reference (train/analysis/config_reference.py, docs/configuration.md): every leaf key of the
default config is explained by a comment in conf/, and the page is the generator's current output."""
from pathlib import Path

import pytest

from conftest import CONF_DIR
from train.analysis.config_reference import COMMAND, entries, file_comments, render

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def default_entries():
    return {entry.key: entry for entry in entries()}


def test_every_leaf_key_has_a_meaning(default_entries):
    assert len(default_entries) > 100 and not any(key.startswith("hydra.") for key in default_entries)
    missing = [key for key, entry in default_entries.items() if entry.meaning is None or not entry.meaning.text.strip()]
    assert not missing, (f"{len(missing)} config keys have no comment in conf/ (add one on the line that sets the key "
                         f"in its group's file, then run `{COMMAND}`):\n" + "\n".join(missing))


def test_the_page_is_current():
    assert PAGE.is_file() and PAGE.read_text() == render(), (
        f"docs/configuration.md is out of date with conf/: run `{COMMAND}`")


def _line(path: Path, key: str) -> tuple[int, str]:
    """The 1-based line of the top-level ``key`` in ``path`` and its inline comment."""
    lines = path.read_text().splitlines()
    (number,) = [i for i, line in enumerate(lines) if line.startswith(f"{key}:")]
    return number + 1, lines[number].split("#", 1)[1].strip()


def test_meanings_come_from_the_groups_own_file(default_entries):
    draft, cascade = CONF_DIR / "draft" / "default.yaml", CONF_DIR / "cascade" / "default.yaml"
    # draft.epochs is also set by conf/sizes/cpu.yaml (the composed default): the meaning is draft/default.yaml's
    number, comment = _line(draft, "epochs")
    epochs = default_entries["draft.epochs"]
    assert comment and (epochs.meaning.file, epochs.meaning.line, epochs.meaning.text) == (draft, number, comment)
    assert epochs.default == 12  # conf/sizes/cpu.yaml's, the composed default
    # cascade.alpha's comment goes on over the comment-only line below it
    number, comment = _line(cascade, "alpha")
    alpha = default_entries["cascade.alpha"]
    continued = cascade.read_text().splitlines()[number].strip().lstrip("#").strip()
    assert (alpha.meaning.file, alpha.meaning.line) == (cascade, number)
    assert alpha.meaning.text == f"{comment} {continued}"


def test_file_comments_inline_continued_above_flow_and_lists(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "# the file's opening comment\n"
        "a: 1         # one\n"
        "             # and more\n"
        "# above b\n"
        "b:\n"
        "  c: [1, 2]  # see `c`: a # in a comment\n"
        "  d: {e: 1, f: {g: 2}}  # flow\n"
        "  h: \"x # not a comment\"\n"
        "  n: Stage-1's   # an apostrophe in a plain scalar\n"
        "items:\n"
        "  - k: 1     # in a list\n"
        "    m: 2\n")
    found = {".".join(key): (c.text, c.how) for key, c in file_comments(path).items()}
    assert found == {"a": ("one and more", "inline"), "b": ("above b", "above"),
                     "b.c": ("see `c`: a # in a comment", "inline"), "b.d": ("flow", "inline"),
                     "b.d.e": ("flow", "flow"), "b.d.f": ("flow", "flow"), "b.d.f.g": ("flow", "flow"),
                     "b.n": ("an apostrophe in a plain scalar", "inline"), "items.[].k": ("in a list", "inline")}
