"""The Stage-1 benchmark (train/bench/stage1.py): FLOP counting, a tiny CPU run end to end, the step's hygiene."""
import json
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import compose_config
from train.export.flops import count_flops
from train.optim import fused_default
from train.utils.progress import RichProgressBar

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "4", "--warmup", "1", "--steps", "2",
        "--window", "1", "--workers", "0", "--shard-workers", "0"]


def test_training_flops_of_a_two_layer_mlp_by_hand():
    """Forward 2B(8*16 + 16*4); backward: both weight gradients and the hidden layer's input gradient (the input
    needs none)."""
    mlp, batch = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 5
    x = torch.randn(batch, 8)
    forward = 2 * batch * (8 * 16 + 16 * 4)
    assert count_flops(mlp, x) == forward
    assert count_flops(mlp, x, backward=True) == forward + 2 * batch * (16 * 4 + 16 * 4 + 8 * 16)


def test_training_flops_of_cpu_attention_count_its_backward():
    """Forward: QK^T and PV (4 b h s^2 d); backward: scores again, dV, dP, dQ, dK (10 b h s^2 d)."""
    b, h, s, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    assert count_flops(F.scaled_dot_product_attention, q, k, v) == 4 * b * h * s * s * d
    assert count_flops(F.scaled_dot_product_attention, q, k, v, backward=True) == 14 * b * h * s * s * d


def test_a_tiny_cpu_run_measures_every_row_and_writes_json(tmp_path, data_dir, one_thread, monkeypatch, capsys):
    from train.bench.__main__ import main

    out = tmp_path / "stage1.json"
    argv = ["bench", "stage1", "--json", str(out), *TINY, "--root", str(tmp_path), "--peak-tflops", "0.001",
            "--levers", "no_clip", "--save", "--override", f"paths.data_dir={data_dir}",
            "callbacks.progress_bar=null", "data.source.image_size=64"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert list(rows) == ["raw/eager", "full/shards", "full/jpeg", "lever/no_clip"]
    assert all(r["img_s"] > 0 and len(r["windows"]) == 2 for r in rows.values())
    assert rows["raw/eager"]["ratio_vs_raw"] == 1.0
    full = rows["full/shards"]
    assert full["ratio_vs_raw"] == pytest.approx(full["img_s"] / rows["raw/eager"]["img_s"])
    assert full["mfu"] == pytest.approx(full["img_s"] * figures["flops_per_image"] / 1e9)
    assert full["loader_img_s"] > 0 and full["to_device_img_s"] > 0 and "loader_img_s" not in rows["lever/no_clip"]
    assert rows["full/jpeg"]["overrides"][0] == "data.train_source=jpeg"
    assert figures["prepare"]["size"] == 37 and figures["settings"]["compile"] is False
    assert {"torch", "timm", "pytorch_lightning"} <= set(figures["versions"])
    assert len(list((tmp_path / "checkpoints" / "benchmarks").glob("stage1-*.json"))) == 1
    printed = capsys.readouterr().out
    assert "full/shards" in printed and "| lever/no_clip |" in printed


def test_the_progress_bar_reads_metrics_only_at_logging_steps(monkeypatch):
    reads = []
    monkeypatch.setattr(pl.callbacks.RichProgressBar, "get_metrics", lambda self, t, m: reads.append(t.global_step)
                        or {"train/loss": t.global_step})
    bar = RichProgressBar()
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=5, training=True)
    shown = []
    for step in range(1, 12):
        trainer.global_step = step
        shown.append(bar.get_metrics(trainer, None)["train/loss"])
    assert reads == [1, 5, 10] and shown == [1] * 4 + [5] * 5 + [10] * 2
    trainer.training = False  # validation: always fresh
    assert bar.get_metrics(trainer, None)["train/loss"] == 11


def test_adamw_is_fused_on_cuda_unless_the_config_says_otherwise():
    from functools import partial

    model = nn.Linear(4, 2)
    assert fused_default(partial(torch.optim.AdamW, lr=1e-3), model) == {}  # on the CPU: the foreach loop
    if torch.cuda.is_available():
        model = model.cuda()
        assert fused_default(partial(torch.optim.AdamW, lr=1e-3, fused=None), model) == {"fused": True}
        assert fused_default(partial(torch.optim.AdamW, lr=1e-3, fused=False), model) == {}


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_a_fused_optimizer_is_clipped_by_the_module(algorithm):
    """Lightning refuses to clip for fused optimizers under mixed precision; the module clips them itself."""
    from hydra.utils import instantiate

    module = instantiate(compose_config("model.img_size=32", "model.backbone.depth=1",
                                         "model.backbone.pretrained=false").model)
    optimizer = torch.optim.AdamW(module.net.parameters(), fused=True)  # fused AdamW runs on the CPU too
    for p in module.net.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(optimizer, 1.0, algorithm)
    grads = [p.grad for p in module.net.parameters()]
    if algorithm == "norm":
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert norm == pytest.approx(1.0, rel=1e-4)
    else:
        assert all(g.eq(1.0).all() for g in grads)


def test_stage1_with_fused_adamw_bf16_and_clipping_trains(data_run, tmp_path, one_thread):
    from conftest import QUIET, copy_run
    from train.__main__ import run_task

    run = copy_run(data_run, tmp_path)
    run_task(compose_config(f"run_dir={run.path}", "debug=tiny", *QUIET, "task=stage1", "debug=fast_dev_run",
                            "model.bootstrap=0", "model.optimizer.fused=true", "trainer.precision=bf16-mixed",
                            "trainer.gradient_clip_val=1.0"))
    assert run.is_complete("stage1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_tiny_gpu_run(tmp_path, data_dir):
    from train.bench.stage1 import run

    figures = run([*TINY, "--batch", "16", "--no-compile", "--data", "shards", "--root", str(tmp_path),
                   "--override", f"paths.data_dir={data_dir}", "callbacks.progress_bar=null",
                   "data.source.image_size=64"])
    full = figures["rows"]["full/shards"]
    assert full["img_s"] > 0 and full["peak_memory_gb"] > 0 and 0 < full["mfu"] < 1 and figures["peak_flops"] > 1e12


def test_a_compiled_module_keeps_plain_parameter_names():
    from hydra.utils import instantiate

    module = instantiate(compose_config("model.img_size=32", "model.backbone.depth=1", "model.compile=true",
                                         "model.backbone.pretrained=false").model)
    assert module.net._compiled_call_impl is not None  # compiled in place, once, at construction
    assert not any("_orig_mod" in k for k in module.state_dict())


def test_the_step_profiler_writes_its_tables(tmp_path):
    """StepProfiler profiles exactly its steps and writes wall time per step and the op tables."""
    from torch.utils.data import DataLoader, TensorDataset

    from train.bench.profile import StepProfiler

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StepProfiler("tiny", start=2, steps=3, out_dir=str(tmp_path))])
    trainer.fit(Tiny(), data)
    text = (tmp_path / "profile-tiny.txt").read_text()
    wall = float(text.split("wall ")[1].split(" ms/step")[0])
    assert 0 < wall < 1000 and "aten::addmm" in text and "GPU busy 0.0 ms/step" in text
