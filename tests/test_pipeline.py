"""python -m train end to end: run folders, the registry, skipping, run_dir hand-off, multirun."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from train.__main__ import run_task
from train.errors import RunError
from train.runs import Run

ROOT = Path(__file__).resolve().parents[1]


def test_fast_dev_run_of_the_default_pipeline(tiny_config, tmp_path):
    """The default job is the whole cascade: every stage completes (one batch per training step)."""
    cfg = tiny_config("debug=fast_dev_run", "data.source.n_scenes=150", "data.source.workers=1")
    run_task(cfg)
    (run_path,) = (tmp_path / "checkpoints").iterdir()
    registry = json.loads((run_path / "registry.json").read_text())
    assert list(registry["tasks"]) == list(cfg.pipeline.stages) == [
        "data", "prepare", "stage1", "apt", "calibrate", "draft", "difficulty", "prm", "features", "fusion",
        "thresholds", "export", "evaluate"]
    assert all(task["status"] == "complete" for task in registry["tasks"].values())
    assert run_path.name.startswith("pipeline-")
    tiers = json.loads((run_path / "export" / "manifest.json").read_text())["tiers"]
    assert [t["name"] for t in tiers] == list(cfg.cascade.tiers)
    assert (run_path / "evaluate" / "cascade.json").is_file()
    log = (run_path / "train.log").read_text()  # every long step's progress, with the counts done
    prepared = json.loads((run_path / "prepare" / "shards.json").read_text())["splits"]["train"]["shape"][0]
    graphs = len(json.loads((run_path / "export" / "manifest.json").read_text())["models"])
    replayed = json.loads((run_path / "evaluate" / "cascade.json").read_text())["n"]
    for done in (f"prepare: train split: {prepared}/{prepared} images in ", "calibrate: stage1 on calib: ",
                 "calibrate: apt on calib: ", f"export: ONNX graphs: {graphs}/{graphs} graphs in ",
                 "evaluate: stage1 (fp32) on test: ", "replay: cascade on calib: ",
                 f"replay: cascade on test: {replayed}/{replayed} queries in "):
        assert f"INFO train.progress: {done}" in log, done
    assert graphs == 6


def test_tiny_run_records_artifacts_and_metrics(tiny_run):
    reg = tiny_run.read()
    assert list(reg["tasks"]) == ["data", "stage1", "calibrate", "export", "evaluate"]
    best = tiny_run.artifact("stage1", "best")
    assert best.suffix == ".ckpt" and best.parent.name == "checkpoints"
    metrics = tiny_run.metrics("stage1")
    assert {"test/L0/mcc", "test/L1/mcc", "test/mcc", "test/L0/acc"} <= set(metrics)
    assert abs(metrics["test/mcc"] - (metrics["test/L0/mcc"] + metrics["test/L1/mcc"]) / 2) < 1e-6
    summary = json.loads((tiny_run.path / "summary.json").read_text())
    assert summary["tasks"]["data"]["skipped_total"] == 0
    assert (tiny_run.path / "pipeline" / "config.yaml").exists() and (tiny_run.path / "train.log").exists()
    assert (tiny_run.path / "stage1" / "metrics.csv").exists()


def test_tiny_run_splits_are_scene_disjoint(tiny_run):
    index = pq.read_table(tiny_run.artifact("data", "index")).to_pydict()
    split_of_scene = {}
    for scene, split in zip(index["scene_id"], index["split"]):
        assert split_of_scene.setdefault(scene, split) == split
    assert set(index["split"]) == {"train", "meta", "val", "calib", "test"}
    assert 0.7 < sum(index["label"]) / len(index["label"]) < 0.9  # the 4:1 default


def test_rerun_skips_complete_stages(tiny_config, tiny_run, caplog):
    before = tiny_run.read()
    with caplog.at_level(logging.INFO):
        run_task(tiny_config(f"run_dir={tiny_run.path}", "pipeline=stage1"))
    for stage in ("data", "stage1", "calibrate", "export", "evaluate"):
        assert f"stage '{stage}' already complete" in caplog.text
    assert tiny_run.read()["tasks"] == before["tasks"]


def test_a_stage_reruns_alone_from_run_dir(tiny_config, tiny_run, tmp_path):
    import shutil
    copy = Run.open(shutil.copytree(tiny_run.path, tmp_path / "copy"))
    run_task(tiny_config("task=stage1", f"run_dir={copy.path}", "trainer.limit_train_batches=2"))
    assert copy.read()["tasks"]["stage1"]["finished"] >= tiny_run.read()["tasks"]["stage1"]["finished"]
    assert (copy.path / "stage1" / "config.yaml").exists()



def test_each_command_on_a_run_is_kept_in_overrides_yaml(data_run, data_dir, tmp_path, monkeypatch):
    """``python -m train`` (Hydra's entry point, in this process) twice on one run: ``overrides.yaml`` keeps both
    commands' task and overrides in order; a config composed without Hydra's runtime adds nothing."""
    import yaml
    from conftest import QUIET, compose_config, copy_run
    from hydra.core.hydra_config import HydraConfig

    from train.__main__ import main

    run = copy_run(data_run, tmp_path)  # its data stage is complete: the pipeline skips it
    first = [f"run_dir={run.path}", f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
             "pipeline.stages=[data]"]
    second = [*first, "seed=7"]
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # Hydra's runtime is gone again after the test
    for argv in (first, second):
        monkeypatch.setattr(sys, "argv", ["train", *argv])
        main()
    entries = yaml.safe_load((run.path / "overrides.yaml").read_text())
    assert [(e["task"], e["overrides"]) for e in entries] == [("pipeline", first), ("pipeline", second)]
    assert entries[0]["time"] <= entries[1]["time"]
    HydraConfig.instance().cfg = None  # as in a test's run_task(compose_config(...))
    run_task(compose_config(*first))
    assert yaml.safe_load((run.path / "overrides.yaml").read_text()) == entries


def test_every_stage_starts_from_the_seed(monkeypatch, tmp_path):
    """A stage draws the same random numbers after other stages in one process as when run alone."""
    from omegaconf import OmegaConf

    from train.tasks.pipeline import run_pipeline
    from train.tasks.registry import RANKS, TASKS
    draws: dict[str, list] = {}
    for name in ("first", "second"):
        monkeypatch.setitem(TASKS, name, lambda cfg, run, name=name: draws.setdefault(name, []).append(torch.rand(4)))
        monkeypatch.setitem(RANKS, name, "zero")
    run = Run.create(tmp_path, "seeds")
    run_pipeline(OmegaConf.create({"seed": 7, "pipeline": {"stages": ["first", "second"], "force": True}}), run)
    torch.rand(5)  # whatever ran before in the process
    run_pipeline(OmegaConf.create({"seed": 7, "pipeline": {"stages": ["second"], "force": True}}), run)
    assert torch.equal(draws["second"][0], draws["second"][1]) and torch.equal(draws["first"][0], draws["second"][0])


def test_missing_inputs_fail_clearly(tiny_config, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        run_task(tiny_config(f"run_dir={tmp_path / 'nope'}"))
    run = Run.create(tmp_path / "checkpoints", "empty")
    with pytest.raises(RunError, match=r"stage 'stage1' reads the outputs of \['data'\]: no earlier stage makes them "
                                       r"and run empty-\S+ does not hold them"):
        run_task(tiny_config("task=stage1", f"run_dir={run.path}"))
    with pytest.raises(ValueError, match=r"unknown task 'nope'; allowed: \["):
        run_task(tiny_config("pipeline.stages=[data,nope]"))


def test_tampered_artifact_is_detected(tiny_run, tmp_path):
    import shutil
    copy = Run.open(shutil.copytree(tiny_run.path, tmp_path / "copy"))
    with open(copy.path / "data" / "index.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(RunError, match="sha256 mismatch"):
        copy.artifact("data", "index")


def test_cli_multirun_in_place(tmp_path, data_dir):
    """`python -m train -m` as users type it: two jobs, two run folders, cwd untouched."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "train", "-m", "seed=1,2", "pipeline=stage1", "debug=fast_dev_run",
           "data.source.n_scenes=150",
           "data.source.workers=1", f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "print_config=false"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["multirun"]
    runs = sorted(p.relative_to(tmp_path / "checkpoints" / "multirun") for p in
                  (tmp_path / "checkpoints" / "multirun").glob("*/*/pipeline-*"))  # <sweep>/<job number>/<run>
    assert [r.parts[1] for r in runs] == ["0", "1"]
    assert not (tmp_path / "outputs").exists()
    assert out.stdout.count("bundle written to") == 2


def test_a_stage_whose_inputs_no_stage_makes_stops_before_the_run_folder(tiny_config, tiny_run, tmp_path):
    """The stages' needs are checked before anything runs: the draft reads the calibrated Stage-1, so a pipeline
    without calibrate stops naming it, and no run folder is made; in a run that holds those stages it may run alone."""
    from train.tasks.registry import check_needs

    with pytest.raises(RunError, match=r"stage 'draft' reads the outputs of \['calibrate'\]: no earlier stage makes "
                                       r"them and this is a new run; add them before 'draft'"):
        run_task(tiny_config("pipeline.stages=[data,stage1,draft]"))
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(RunError, match=r"stage 'thresholds' reads the outputs of \['draft', 'prm'\]: .* run "
                                       + tiny_run.path.name):
        check_needs(tiny_config("task=thresholds"), ["thresholds"], tiny_run)  # it holds stage1 and calibrate
    check_needs(tiny_config("task=draft"), ["draft"], tiny_run)
    cascade = tiny_config("cascade.tiers=[difficulty,stage1]", "calibrate.tiers=[stage1]",
                          "pipeline.stages=[data,stage1,calibrate,thresholds]")
    with pytest.raises(RunError, match=r"stage 'thresholds' reads the outputs of \['difficulty', 'draft'\]"):
        check_needs(cascade, cascade.pipeline.stages, None)  # a cascade tier no stage trains
    default = tiny_config()
    check_needs(default, default.pipeline.stages, None)  # the default job: every stage's inputs come first
