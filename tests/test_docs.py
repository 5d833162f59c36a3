"""The architecture page matches the tree: its layout names every package of ``train`` and every module the tiers and
tasks are made of, and the README's layout points at it. Every ``python -m train`` command the docs show composes."""
import re
import shlex
from pathlib import Path

from conftest import command_lines, compose_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "train"


def layout_block() -> str:
    page = (ROOT / "docs" / "architecture.md").read_text()
    section = page[page.index("## Layout"):]
    return section[section.index("```"):]


def test_the_architecture_page_lists_every_package_tier_and_task():
    layout = layout_block()
    packages = sorted(p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.glob("*/__init__.py"))
    tiers = sorted(p.parent.name for p in (PACKAGE / "tiers").glob("*/__init__.py"))
    shared = sorted(p.name for p in (PACKAGE / "tiers").glob("*.py") if p.name != "__init__.py")
    tasks = sorted(p.stem for p in (PACKAGE / "tasks").glob("*.py") if p.name != "__init__.py")
    missing = [f"{p}/" for p in packages if not re.search(rf"\b{p}/", layout)]
    missing += [f"tiers/{t}/" for t in tiers if not re.search(rf"\b{t}/", layout)]
    missing += [f"tiers/{m}" for m in shared if m not in layout]
    missing += [f"tasks/{t}" for t in tasks if t not in layout]
    assert not missing, f"docs/architecture.md's layout does not name {missing}"
    # the tier folders it lists are exactly the package's
    listed = layout[layout.index("one folder\n"):layout.index("what tiers share")]
    assert sorted(re.findall(r"\b(\w+)/", listed)) == sorted(tiers + ["tiers"]), listed
    assert {"stage1", "apt", "draft", "difficulty", "prm", "fusion"} <= set(tiers)


def test_the_readme_points_at_the_architecture_page():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    assert "docs/architecture.md" in layout.split("\n## ")[0]


def docs_commands() -> list[tuple[str, list[str]]]:
    """(page, overrides) of every ``python -m train`` command in the docs' bash blocks; a placeholder ``<run>`` stands
    for a value, ``...`` for more of the same and flags (``-m``) are Hydra's own."""
    out = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for command in command_lines(page.read_text()):
            if command.startswith("python -m train "):
                words = shlex.split(re.sub(r"<([^>]+)>", lambda m: m.group(1).replace(" ", "_"), command))[3:]
                if "-m" in words:  # a sweep: its first value of each swept key
                    words = [re.sub(r"^([^=\[{]+=[^,\[{]+),.*$", r"\1", w) for w in words]
                out.append((page.relative_to(ROOT).as_posix(), [w for w in words if w != "..." and w[0] != "-"]))
    return out


def test_every_command_the_docs_show_composes():
    commands = docs_commands()
    assert len(commands) >= 50
    failed = []
    for page, overrides in commands:
        try:
            compose_config(*overrides)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its page
            failed.append(f"{page}: {' '.join(overrides)}: {type(e).__name__}: {str(e).splitlines()[0]}")
    assert not failed, "\n".join(failed)
