"""The default job, the ViT-B/16 experiment and FDSL pretraining on one CUDA GPU, cut down (``pytest -m gpu
tests/test_gpu.py`` on a GPU host; skipped elsewhere). Run them on the GPU machine whenever a stage changes."""
import json
import math

import pytest
import torch

from conftest import QUIET, compose_config
from train.__main__ import run_task
from train.runs import Run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_run(tmp_path, data_dir, *overrides: str) -> tuple[Run, dict]:
    """``python -m train trainer=gpu`` at debug=tiny sizes, loader workers on; returns the run and its registry."""
    cfg = compose_config(f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
                         "trainer=gpu", "data.num_workers=2", *overrides)
    run_task(cfg)
    (path,) = (tmp_path / "checkpoints").iterdir()
    run = Run.open(path)
    registry = run.read()["tasks"]
    assert list(registry) == list(cfg.pipeline.stages)
    assert all(task["status"] == "complete" for task in registry.values())
    return run, registry


def test_the_default_job_runs_every_stage_on_one_gpu(tmp_path, data_dir):
    run, registry = gpu_run(tmp_path, data_dir)
    for tier in ("stage1", "apt"):  # trained and tested on the GPU in bf16
        assert registry[tier]["test_precision"] == "bf16-mixed"
        assert -1 <= registry[tier]["metrics"]["test/L0/mcc"] <= 1
    manifest = json.loads((run.path / "export" / "manifest.json").read_text())
    cascade = json.loads((run.path / "evaluate" / "cascade.json").read_text())
    assert [t["name"] for t in manifest["tiers"]] == [t["name"] for t in cascade["tiers"]]
    assert math.isclose(sum(cascade["exit_fraction"].values()), 1.0, abs_tol=1e-6)
    assert cascade["flops"]["ratio"] > 0 and all(math.isfinite(v) for v in cascade["mcc_difference"].values())


def test_the_vit_b16_experiment_on_one_gpu(tmp_path, data_dir):
    """+experiment=stage1_vit_b16 (ViT-B/16 at 224 px, layer decay, EMA) from random weights: Stage-1 alone."""
    run, registry = gpu_run(tmp_path, data_dir, "+experiment=stage1_vit_b16", "model.backbone.pretrained=false",
                            "data.batch_size=16", "data.eval_batch_size=64")
    assert registry["stage1"]["test_precision"] == "bf16-mixed"
    config = json.loads(run.artifact("stage1", "model_config").read_text())
    assert config["backbone"]["name"] == "vit_base_patch16_224" and config["input"]["img_size"] == 224
    assert (run.path / "export" / "manifest.json").is_file()


def test_fdsl_pretraining_on_one_gpu(tmp_path, data_dir):
    """task=pretrain on the GPU: fractals rendered on the device, bf16, fused AdamW with clipping."""
    run_task(compose_config(f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", *QUIET, "trainer=gpu",
                            "task=pretrain", "pretrain.fdsl.classes=10", "pretrain.epochs=1",
                            "pretrain.steps_per_epoch=5", "pretrain.batch_size=64", "pretrain.held_out=128"))
    (path,) = (tmp_path / "checkpoints").iterdir()
    run = Run.open(path)
    assert run.metrics("pretrain")["images_seen"] == 5 * 64
    assert json.loads(run.artifact("pretrain", "card").read_text())["precision"] == "bf16-mixed"
