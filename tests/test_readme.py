"""Every command the README shows composes; the ones a CPU runs also pass the config checks and run cut down
(GPU and real-data commands are composed only: they need the hardware or the data). The default job itself runs
cut down in test_pipeline.py (``test_fast_dev_run_of_the_default_pipeline``); the others here, on a copy of the
shared tiny run standing in for the README's example run folder."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import QUIET, command_lines, compose_config, copy_run

from train.config_checks import check_config

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_HARDWARE_OR_DATA = ("trainer=gpu", "trainer=ddp", "trainer=deepspeed", "data=natix", "data.root=")
EXAMPLE_RUN = "checkpoints/pipeline-20261201-101500"


def readme_commands() -> list[list[str]]:
    """The Hydra overrides of each ``python -m train`` / ``make train`` command in the README's bash blocks."""
    out = []
    for command in command_lines(README.read_text()):
        if command.startswith("python -m train"):
            out.append(shlex.split(command)[3:])
        elif command.startswith("make train"):
            args = re.search(r"ARGS='([^']*)'", command)
            out.append(shlex.split(args.group(1)) if args else [])
    return out


def runs_on_a_cpu(overrides: list[str]) -> bool:
    """A command that needs neither a GPU nor the real data."""
    return not any(o.startswith(NEEDS_HARDWARE_OR_DATA) for o in overrides)


def test_every_readme_command_composes_and_the_cpu_ones_pass_the_checks():
    commands = readme_commands()
    assert len(commands) >= 5 and [] in commands  # the five next commands and `make train`
    checked = 0
    for overrides in commands:
        cfg = compose_config(*overrides)
        if runs_on_a_cpu(overrides):
            check_config(cfg)
            checked += 1
    assert checked >= 2


def test_the_readme_cpu_commands_run_cut_down_on_an_earlier_run(tiny_run, data_dir, tmp_path):
    """Each CPU command that works in an earlier run (``run_dir=``) runs on a copy of the tiny run with
    debug=tiny; each ``python -c`` line runs as written against that copy."""
    from train.__main__ import run_task
    from train.runs import Run

    run = copy_run(tiny_run, tmp_path)
    in_a_run = [o for o in readme_commands() if runs_on_a_cpu(o) and f"run_dir={EXAMPLE_RUN}" in o]
    assert in_a_run, "the README shows no command on an earlier run"
    for overrides in in_a_run:
        task = next(o.split("=", 1)[1] for o in overrides if o.startswith("task="))
        assert not run.is_complete(task)
        overrides = [o.replace(EXAMPLE_RUN, str(run.path)) for o in overrides]
        # pipeline=stage1: the settings the tiny run was made with (it has no prepared shards)
        run_task(compose_config(f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
                                "pipeline=stage1", *overrides))
        assert Run.open(run.path).is_complete(task)
    snippets = [shlex.split(c)[2] for c in command_lines(README.read_text()) if c.startswith("python -c ")]
    assert snippets, "the README shows no python -c line"
    for code in snippets:
        result = subprocess.run([sys.executable, "-c", code.replace(EXAMPLE_RUN, str(run.path))],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
