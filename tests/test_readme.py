"""Every command the README shows composes; the ones a CPU runs also pass the config checks (GPU and real-data
commands are composed only: they need the hardware or the data). The default job itself runs cut down in
test_pipeline.py (``test_fast_dev_run_of_the_default_pipeline``)."""
import re
import shlex
from pathlib import Path

from conftest import compose_config

from train.config_checks import check_config

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_HARDWARE_OR_DATA = ("trainer=gpu", "trainer=ddp", "trainer=deepspeed", "data=natix", "data.root=")


def readme_commands() -> list[list[str]]:
    """The Hydra overrides of each ``python -m train`` / ``make train`` command in the README's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("#", 1)[0].strip()
            if command.startswith("python -m train"):
                out.append(shlex.split(command)[3:])
            elif command.startswith("make train"):
                args = re.search(r"ARGS='([^']*)'", command)
                out.append(shlex.split(args.group(1)) if args else [])
    return out


def test_every_readme_command_composes_and_the_cpu_ones_pass_the_checks():
    commands = readme_commands()
    assert len(commands) >= 5 and [] in commands  # the five next commands and `make train`
    checked = 0
    for overrides in commands:
        cfg = compose_config(*overrides)
        if not any(o.startswith(NEEDS_HARDWARE_OR_DATA) for o in overrides):
            check_config(cfg)
            checked += 1
    assert checked >= 2
