"""The wheel: built by pip, installed where the repository is out of sight, run from another folder."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import QUIET

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "train", "conf", "checkpoints/pretrained"]  # what the build reads
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([*PIP, "wheel", str(src), "--no-deps", "--no-index", "--no-build-isolation", "-w", str(dist)],
                   check=True, timeout=300)
    (path,) = dist.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed ``--no-deps`` into a folder of its own; the dependencies are the dev environment's."""
    path = tmp_path_factory.mktemp("site")
    subprocess.run([*PIP, "install", str(wheel), "--no-deps", "--no-index", "--target", str(path)], check=True,
                   timeout=300)
    return path


def shipped_as(path: Path, folders: dict[str, str]) -> str:
    """Where a file of the repository lands in the wheel, given pyproject.toml's package-dir (package: folder)."""
    rel = path.relative_to(ROOT).as_posix()
    for package, folder in sorted(folders.items(), key=lambda item: -len(item[1])):
        if rel.startswith(f"{folder}/"):
            return package.replace(".", "/") + rel[len(folder):]
    return rel


def test_wheel_holds_the_package_its_configs_and_weights(wheel):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {shipped_as(p, folders) for p in (ROOT / "train").rglob("*.py")}
    assert not modules - names, "a package is missing from [tool.setuptools] packages in pyproject.toml"
    configs = {shipped_as(p, folders) for p in (ROOT / "conf").rglob("*.yaml")}
    assert "train/conf/config.yaml" in configs and not configs - names
    weights = {shipped_as(p, folders) for p in (ROOT / "checkpoints" / "pretrained").glob("*.safetensors")}
    assert weights and {w.replace(".safetensors", ".json") for w in weights} | weights <= names
    assert not [n for n in names if n.startswith("conf/")]  # under the package, not a top-level conf


def test_installed_wheel_runs_from_another_folder(site, tmp_path, data_dir):
    """`roadwork-train --help` and the default job's first stages (fast_dev_run) with the installed package and
    the configs it ships, from a folder outside the repository."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("ROADWORK_ROOT", None)
    work = tmp_path / "work"
    work.mkdir()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run(sys.executable, "-c", "import train, train.configs as c; print(train.__file__, c.config_dir())")
    assert where.stdout.split() == [str(site / "train" / "__init__.py"), str(site / "train" / "conf")]

    # a debug option only the installed configs have: the job composes from them, not from the repository's
    debug = site / "train" / "conf" / "debug"
    shutil.copy(debug / "fast_dev_run.yaml", debug / "wheel.yaml")
    # the console script's help beside the job (it waits on imports: 2 cores do both in the time of one)
    help_ = subprocess.Popen([site / "bin" / "roadwork-train", "--help"], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    stages = ["data", "prepare", "stage1"]
    out = run(sys.executable, "-m", "train", "debug=wheel", f"pipeline.stages=[{','.join(stages)}]",
              "data.source.n_scenes=150", "data.source.workers=1", "data.test_levels=[0]",
              f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", *QUIET)
    stdout, stderr = help_.communicate(timeout=300)
    assert help_.returncode == 0, stderr[-3000:]
    assert "== Configuration groups ==" in stdout and "debug: fast_dev_run, tiny, wheel" in stdout
    assert out.returncode == 0, out.stderr[-3000:]
    (run_path,) = (tmp_path / "checkpoints").iterdir()
    tasks = json.loads((run_path / "registry.json").read_text())["tasks"]
    assert list(tasks) == stages and all(t["status"] == "complete" for t in tasks.values())
    assert list(work.iterdir()) == []  # nothing written where it ran
