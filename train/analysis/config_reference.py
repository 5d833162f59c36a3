"""The configuration reference: every leaf key of the default config, its default and its meaning, read from the
comments of the YAML files in ``conf/`` that set it.

``python -m train.analysis.config_reference > docs/configuration.md`` writes the page; tests/test_config_reference.py
checks that every key has a meaning and that the page is current.

Where a key's meaning comes from, in this order: the inline comment on the line that sets the key (``key: value  #
meaning``), continued by the comment-only lines below it whose ``#`` is in the same column; else the comment lines
directly above the key (not a file's opening comment). The files are those Hydra's defaults list loads for the default
job; the group's own files are read first (``conf/draft/*.yaml`` for ``draft.*``, its shared files before the option),
then ``conf/config.yaml``, then the global overlays (``conf/sizes/``, ``conf/pipeline/``, ...). A key set inside a
flow mapping (``key: {a: 1, b: 2}  # meaning``) gets that line's comment only if no file has a better one.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from train.configs import config_dir

COMMAND = "python -m train.analysis.config_reference > docs/configuration.md"
TOP_LEVEL = "top level"  # the section of the keys config.yaml sets at the root
LONG_DEFAULT = 80        # a list of mappings longer than this many characters is summarised in the table

_KEY = re.compile(r"""(?P<indent>\s*)(?P<key>"[^"]*"|'[^']*'|[^\s#"'{}\[\]-][^:#]*?)\s*:(?=\s|$)(?P<rest>.*)$""")


@dataclass(frozen=True)
class Comment:
    """A meaning found in a YAML file: its text, where it was found, and how (``inline``, ``above`` or ``flow``)."""

    text: str
    file: Path
    line: int  # 1-based line of the key
    how: str


@dataclass(frozen=True)
class Entry:
    """One leaf key of the composed config: its dotted path, its unresolved default and its meaning (None: none)."""

    key: str
    default: object
    meaning: Comment | None


def _opens_quote(text: str, i: int) -> bool:
    """Whether the quote at ``text[i]`` starts a quoted scalar: at the start of a value or a flow item (an
    apostrophe inside a plain scalar, ``name: Stage-1's``, does not)."""
    before = text[:i].rstrip()
    return not before or before[-1] in ":[{,-"


def _split_comment(text: str) -> tuple[str, int | None]:
    """``text`` without its comment, and the comment's ``#`` index in ``text`` (None: no comment). A ``#`` starts a
    comment at the start or after whitespace, outside quoted scalars."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'" and _opens_quote(text, i):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip(), i
    return text.rstrip(), None


def _comment_text(line: str, column: int) -> str:
    """The text of the comment whose ``#`` is at ``column`` of ``line``."""
    return line[column + 1:].strip()


def _flow_paths(value: object, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """The key paths inside a parsed flow mapping (mappings included, as their own paths)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield prefix + (str(key),)
            yield from _flow_paths(inner, prefix + (str(key),))


def _balanced(text: str) -> bool:
    """Whether every ``{`` / ``[`` outside quotes in ``text`` is closed."""
    depth, quote = 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'" and _opens_quote(text, i):
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return depth <= 0


def file_comments(path: Path) -> dict[tuple[str, ...], Comment]:
    """The meaning of every key a YAML file sets, by its path inside the file. A key set on a line gets that line's
    inline comment and its continuation, else the comment lines directly above it; keys inside a flow mapping
    (``key: {a: 1}  # meaning``) get the line's comment with ``how="flow"``. Keys without a comment are left out.
    Sequence items nest under a ``[]`` path element, so nothing inside a list matches a config key."""
    lines = path.read_text().splitlines()
    found: dict[tuple[str, ...], Comment] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings and sequence items
    consumed: set[int] = set()         # comment-only lines that continue an inline comment
    header_end = 0                     # the file's opening comment block: it describes the file, not a key
    while header_end < len(lines) and lines[header_end].lstrip().startswith("#"):
        header_end += 1
    i = 0
    while i < len(lines):
        raw = lines[i]
        body, hash_at = _split_comment(raw)
        if not body.strip():
            i += 1
            continue
        # a flow collection may span lines: join them (the comment is the last line's)
        last = i
        while not _balanced(body) and last + 1 < len(lines):
            last += 1
            more, hash_more = _split_comment(lines[last])
            body += " " + more.strip()
            if hash_more is not None:
                raw, hash_at = lines[last], hash_more
        text = body
        indent = len(text) - len(text.lstrip())
        # sequence items: "- key: value" opens an item at the dash's indent, its keys two columns deeper
        while True:
            stripped = text.lstrip()
            if not (stripped.startswith("- ") or stripped == "-"):
                break
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, "[]"))
            text = " " * (indent + 2) + stripped[2:]
            indent += 2
        match = _KEY.match(text)
        if match is None:
            i = last + 1
            continue
        key = match["key"].strip().strip("\"'")
        rest = match["rest"].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        keypath = tuple(k for _, k in stack) + (key,)
        comment = None
        if hash_at is not None:
            comment = _comment_text(raw, hash_at)
            j = last + 1
            while j < len(lines):
                nxt = lines[j]
                if nxt.strip() and nxt.lstrip().startswith("#") and len(nxt) - len(nxt.lstrip()) == hash_at:
                    comment += " " + _comment_text(nxt, hash_at)
                    consumed.add(j)
                    j += 1
                else:
                    break
            how = "inline"
        else:
            j, above = i - 1, []
            while j >= header_end and j not in consumed and lines[j].lstrip().startswith("#"):
                above.insert(0, lines[j].strip().lstrip("#").strip())
                j -= 1
            comment = " ".join(above)
            how = "above"
        if comment:
            found[keypath] = Comment(comment, path, i + 1, how)
        if rest.startswith("{"):
            try:
                flow = yaml.safe_load(rest)
            except yaml.YAMLError:
                flow = None
            if comment and hash_at is not None:
                for inner in _flow_paths(flow, keypath):
                    found.setdefault(inner, Comment(comment, path, i + 1, "flow"))
        if not rest:  # a mapping (or a sequence) opens below
            stack.append((indent, key))
        i = last + 1
    return found


def _loaded_files(overrides: list[str]) -> list[tuple[Path, tuple[str, ...], str]]:
    """The conf/ files Hydra loads for ``overrides``, in its order: (file, package path, config group)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    out = []
    for default in loader.compute_defaults_list("config", overrides, RunMode.RUN).defaults:
        package = default.package or ""
        path = config_dir() / f"{default.config_path}.yaml"
        if package.split(".")[0] == "hydra" or not path.is_file():
            continue
        group = default.config_path.rsplit("/", 1)[0] if "/" in default.config_path else ""
        out.append((path, tuple(package.split(".")) if package else (), group))
    return out


def _leaves(node: object, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], object]]:
    """Every leaf under ``node``: a scalar, a list, or an empty mapping."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, prefix + (str(key),))
    else:
        yield prefix, node


def entries(overrides: list[str] | None = None) -> list[Entry]:
    """Every leaf key of the config ``python -m train`` composes (with ``overrides``; the ``hydra`` subtree left out),
    in the config's order, with its unresolved default and its meaning from the comments in conf/."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        files = _loaded_files(overrides)
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    comments = [(group, package, file_comments(path)) for path, package, group in files]
    out = []
    for path, value in _leaves(tree, ()):
        own = [c for c in comments if c[0] == path[0]]  # the group's own files first, in load order
        rest = [c for c in comments if c[0] == ""] + [c for c in comments if c[0] not in ("", path[0])]
        found, flow = None, None
        for _, package, by_key in own + rest:
            if path[:len(package)] != package:
                continue
            comment = by_key.get(path[len(package):])
            if comment is None:
                continue
            if comment.how != "flow":
                found = comment
                break
            flow = flow or comment
        out.append(Entry(".".join(path), value, found or flow))
    return out


def render_value(value: object) -> str:
    """A default as the YAML files write it: ``null``, ``true``, ``[0, 1]``, ``{}``, interpolations unresolved."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell: pipes escaped, ``<`` not read as an HTML tag."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _code(text: str) -> str:
    """``text`` as inline code in a table cell."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def render(overrides: list[str] | None = None) -> str:
    """The reference page in Markdown: one section per top-level group, a table of its leaf keys."""
    sections: dict[str, list[Entry]] = {}
    for entry in entries(overrides):
        group = entry.key.split(".")[0] if "." in entry.key else TOP_LEVEL
        sections.setdefault(group, []).append(entry)
    root = config_dir()
    out = ["# Configuration reference", "",
           f"Generated by `{COMMAND}` from the comments in `conf/`: every leaf key of the default config "
           "(`python -m train` with no overrides), its default (interpolations unresolved) and its meaning. "
           "Override any of them on the command line, e.g. `python -m train draft.epochs=4`.", ""]
    for group, rows in sections.items():
        out += [f"## {group}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for entry in rows:
            default = render_value(entry.default)
            if isinstance(entry.default, list) and any(isinstance(v, (dict, list)) for v in entry.default) \
                    and len(default) > LONG_DEFAULT:
                where = entry.meaning.file.relative_to(root.parent) if entry.meaning else "conf/"
                default = f"{len(entry.default)} entries ({where})"
                cell = _cell(default)
            else:
                cell = _code(default)
            meaning = _cell(entry.meaning.text) if entry.meaning else ""
            out.append(f"| `{entry.key}` | {cell} | {meaning} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    """Print the reference page (``python -m train.analysis.config_reference > docs/configuration.md``)."""
    print(render(), end="")


if __name__ == "__main__":
    main()
