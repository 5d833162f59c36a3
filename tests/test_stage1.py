"""task=stage1: fine-tuning modes, trainer flags, exact resume, the plain-model hand-off, learning."""
import shutil

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from train.__main__ import run_task
from train.models import count_parameters
from train.models.saving import load_classifier
from train.runs import Run

TINY_VIT = ["model.img_size=32", "model.backbone.patch_size=8", "model.backbone.depth=2",
            "model.backbone.embed_dim=64", "model.backbone.num_heads=2",
            "model.backbone.pretrained=false"]


def stage1_on_copy(tiny_config, tiny_run, tmp_path, *overrides) -> Run:
    """Run task=stage1 alone on a copy of the shared tiny run (its data stage is reused)."""
    copy = Run.open(shutil.copytree(tiny_run.path, tmp_path / "run", dirs_exist_ok=True))
    shutil.rmtree(copy.path / "stage1")
    run_task(tiny_config(f"run_dir={copy.path}", "task=stage1", *TINY_VIT, *overrides))
    return copy


def module(*overrides):
    cfg = compose_config(*TINY_VIT, *overrides)
    return instantiate(cfg.model)


def test_plain_model_hand_off_reproduces_the_tested_model(tiny_run):
    weights = tiny_run.artifact("stage1", "model")
    model, config = load_classifier(weights)
    assert config["id2label"] == {"0": "None", "1": "Roadwork"}
    assert config["backbone"]["name"] == "vit_tiny_patch16_224" and config["backbone"]["depth"] == 4
    best = torch.load(tiny_run.artifact("stage1", "best"), map_location="cpu", weights_only=True)
    state = {k.removeprefix("net."): v for k, v in best["state_dict"].items() if k.startswith("net.")}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    size = config["input"]["img_size"]
    assert model(torch.randn(2, 3, size, size)).shape == (2, 2)


def test_test_metrics_carry_every_level_and_bootstrap_bounds(tiny_run):
    metrics = tiny_run.metrics("stage1")
    for level in (0, 1):
        for name in ("mcc", "acc", "f1", "auroc", "reward"):
            assert f"test/L{level}/{name}" in metrics
        assert metrics[f"test/L{level}/mcc_low"] <= metrics[f"test/L{level}/mcc"] <= metrics[f"test/L{level}/mcc_high"]
    reward = (0.5 * max(metrics["test/L0/mcc"], 0) + 0.5 * metrics["test/L0/acc"]) ** 3
    assert metrics["test/L0/reward"] == pytest.approx(reward, abs=1e-5)


@pytest.mark.parametrize("mode", ["full", "linear_probe", "lora", "dora", "rslora"])
def test_each_finetune_mode_trains_and_hands_off_a_plain_model(mode, tiny_config, tiny_run, tmp_path):
    run = stage1_on_copy(tiny_config, tiny_run, tmp_path, f"model.finetune.mode={mode}", "debug=fast_dev_run",
                         "model.bootstrap=0")
    model, config = load_classifier(run.artifact("stage1", "model"))
    assert config["finetune"] == mode
    assert not any("lora" in k for k in model.state_dict())  # adapters merged into plain weights
    trainable, total = count_parameters(module(f"model.finetune.mode={mode}").net)
    head = 64 * 2 + 2
    if mode == "full":
        assert trainable == total
    elif mode == "linear_probe":
        assert trainable == head
    else:
        assert head < trainable < 0.2 * total


@pytest.mark.parametrize("flags", [
    ["callbacks=ema", "trainer.max_epochs=2"],
    ["model.layer_decay=0.7"],
    ["model.mixup={mixup_alpha:0.8,cutmix_alpha:1.0,prob:1.0}"],
    ["model.backbone.drop_path_rate=0.2"],
    ["trainer.gradient_clip_val=0.5", "trainer.gradient_clip_algorithm=value"],
    ["trainer.precision=bf16-mixed"],
    ["model.channels_last=true"],
    ["model.grad_checkpointing=true"],
    ["trainer.accumulate_grad_batches=3"],
    ["model.compile=true"],
], ids=lambda f: f[0].split("=")[0].split(".")[-1])
def test_each_trainer_flag_runs(flags, tiny_config, tiny_run, tmp_path):
    run = stage1_on_copy(tiny_config, tiny_run, tmp_path, "model.bootstrap=0", "trainer.limit_train_batches=3",
                         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                         *flags)
    assert run.is_complete("stage1")
    last = torch.load(run.artifact("stage1", "last"), map_location="cpu", weights_only=True)
    if "callbacks=ema" in flags:  # the checkpoint's weights are the average, the raw ones kept beside
        raw = last["current_model_state"]
        assert any(not torch.equal(v, raw[k]) for k, v in last["state_dict"].items() if k.startswith("net."))
        best = torch.load(run.artifact("stage1", "best"), map_location="cpu", weights_only=True)
        model, _ = load_classifier(run.artifact("stage1", "model"))  # the hand-off holds the average
        assert all(torch.equal(v, best["state_dict"][f"net.{k}"]) for k, v in model.state_dict().items())
        assert any(not torch.equal(v, best["current_model_state"][f"net.{k}"]) for k, v in model.state_dict().items())
    if flags[0].startswith("trainer.accumulate"):
        assert last["global_step"] == 1  # 3 batches, one optimizer step


def test_flags_are_applied_to_the_module():
    m = module("model.backbone.drop_path_rate=0.2", "model.label_smoothing=0.2", "model.channels_last=true",
               "model.grad_checkpointing=true", "model.mixup={mixup_alpha:0.8,cutmix_alpha:0,prob:1.0}")
    assert m.net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert m.criterion.label_smoothing == 0.2 and m.net.grad_checkpointing
    assert m.net.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])
    mixed, soft = m.mixup(images.clone(), labels)
    assert not torch.equal(mixed, images) and soft.shape == (4, 2) and ((soft > 0.01) & (soft < 0.99)).any()


def test_layer_decay_scales_lr_by_depth():
    from train.optim import build_optimizer
    m = module("model.layer_decay=0.5", "model.optimizer.lr=0.01")
    optimizer = build_optimizer(m.optimizer_factory, m.net, m.layer_decay)
    lrs = sorted({round(g["lr"], 8) for g in optimizer.param_groups})
    # depth 2: embeddings (layer 0), blocks 1-2, head (layer 3) -> 0.01 * 0.5 ** (3 - layer)
    assert lrs == pytest.approx(sorted(0.01 * 0.5 ** k for k in range(4)))
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0]
    assert no_decay and all(p.ndim <= 1 or p is m.net.pos_embed or p is m.net.cls_token
                            for g in no_decay for p in g["params"])


def test_warmup_cosine_schedule_by_steps():
    from train.optim import warmup_cosine
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02) and lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_resume_is_exact(tiny_config, tiny_run, tmp_path):
    """Two epochs straight == stopped after the first epoch, then resumed from last.ckpt for the second == killed by
    SIGTERM inside the second epoch (a subprocess; the signal also reaches its loader worker), then resumed."""
    common = ["trainer.limit_train_batches=4", "model.backbone.drop_path_rate=0.1", "model.bootstrap=0",
              "model.mixup={mixup_alpha:0.4,cutmix_alpha:0,prob:0.5}", "data.balance=sampler"]
    straight = stage1_on_copy(tiny_config, tiny_run, tmp_path / "a", "trainer.max_epochs=2", *common)
    broken = stage1_on_copy(tiny_config, tiny_run, tmp_path / "b", "trainer.max_epochs=2", *common,
                            "+callbacks.stop._target_=interrupt.StopAfterEpoch", "+callbacks.stop.epoch=0")
    assert torch.load(broken.artifact("stage1", "last"), weights_only=True)["global_step"] == 4
    preempted = preempted_stage1(tiny_config, tiny_run, tmp_path / "c", "trainer.max_epochs=2", *common)
    for run in (broken, preempted):
        run_task(tiny_config(f"run_dir={run.path}", "task=stage1", *TINY_VIT, "trainer.max_epochs=2", "ckpt_path=last",
                             *common))
    a = torch.load(straight.artifact("stage1", "last"), map_location="cpu", weights_only=True)
    for run in (broken, preempted):
        b = torch.load(run.artifact("stage1", "last"), map_location="cpu", weights_only=True)
        assert (a["global_step"], b["global_step"], a["epoch"], b["epoch"]) == (8, 8, 1, 1)
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), k
        ma, mb = straight.metrics("stage1"), run.metrics("stage1")
        assert ma["test/L0/mcc"] == mb["test/L0/mcc"] and ma["test/L0/loss"] == mb["test/L0/loss"]
        assert mb["train/nonfinite_steps"] == 0


def preempted_stage1(tiny_config, tiny_run, tmp_path, *overrides) -> Run:
    """``python -m train task=stage1`` on a copy of the tiny run, in its own process group, sent SIGTERM after step 5:
    it must finish step 6, save last.ckpt there and exit with 128 + 15 and a message, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    copy = Run.open(shutil.copytree(tiny_run.path, tmp_path / "run"))
    shutil.rmtree(copy.path / "stage1")
    cfg = tiny_config()
    tests = Path(__file__).parent
    args = [f"run_dir={copy.path}", "task=stage1", f"paths.root_dir={cfg.paths.root_dir}",
            f"paths.data_dir={cfg.paths.data_dir}", "debug=tiny", "print_config=false", "callbacks.progress_bar=null",
            "trainer.enable_model_summary=false", *TINY_VIT, *overrides, "data.num_workers=1",
            "+callbacks.kill._target_=interrupt.SignalAtStep", "+callbacks.kill.step=5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    out = subprocess.run([sys.executable, "-m", "train", *args], env=env, capture_output=True, text=True,
                         start_new_session=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 128 + signal.SIGTERM, log
    assert "preempted by SIGTERM: training stopped at epoch 1, step 6" in " ".join(log.split()), log
    assert "Traceback" not in log
    last = torch.load(copy.path / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert copy.read()["tasks"]["stage1"] == tiny_run.read()["tasks"]["stage1"]  # nothing recorded
    return copy


def test_experiments_build_their_models():
    lora = instantiate(compose_config("+experiment=stage1_lora", "model.backbone.pretrained=false").model)
    trainable, total = count_parameters(lora.net)
    assert lora.hparams.img_size == 224 and 0 < trainable < 0.05 * total
    vit = compose_config("+experiment=stage1_vit_b16")
    assert vit.model.backbone.name == "vit_base_patch16_224" and vit.model.layer_decay == 0.75
    assert "ema" in vit.callbacks
    convnext = compose_config("+experiment=stage1_convnext")
    assert convnext.model.backbone.name == "convnext_tiny" and convnext.model.mixup.cutmix_alpha == 1.0


def test_tiny_vit_learns(tmp_path):
    """On scenes without look-alikes or bad weather, a few seconds of training beat chance clearly."""
    from conftest import QUIET
    easy = "{lookalike_rate:0,distractor_rate:0,night_rate:0,weather_rate:0,blur_rate:0,noise_rate:0}"
    cfg = compose_config(f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}", *QUIET,
                         "data.source.n_scenes=600", "data.source.image_size=96", "data.source.workers=2",
                         f"+data.source.knobs={easy}", "data.num_workers=0", "data.batch_size=32",
                         "data.test_levels=[0]", "model.img_size=48", "model.backbone.depth=2",
                         "model.backbone.embed_dim=64", "model.backbone.num_heads=2", "model.optimizer.lr=2e-3",
                         "model.backbone.pretrained=false",
                         "trainer.max_epochs=15", "model.bootstrap=200")
    run_task(cfg)
    (run,) = (tmp_path / "checkpoints").iterdir()
    metrics = Run.open(run).metrics("stage1")
    assert metrics["test/L0/mcc_low"] > 0.05 and metrics["test/L0/auroc"] > 0.7, metrics


def test_transformers_backbone_from_a_local_folder(tiny_config, tiny_run, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    folder = tmp_path / "tiny-hf-vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    copy = Run.open(shutil.copytree(tiny_run.path, tmp_path / "run"))
    shutil.rmtree(copy.path / "stage1")
    run_task(tiny_config(f"run_dir={copy.path}", "task=stage1", "model=hf", f"model.backbone.name={folder}",
                         "model.img_size=32", "model.finetune.mode=lora", "debug=fast_dev_run", "model.bootstrap=0"))
    shutil.rmtree(folder)  # the hand-off carries the architecture: the source folder is not needed
    model, config = load_classifier(copy.artifact("stage1", "model"))
    assert config["backbone"]["library"] == "transformers" and config["finetune"] == "lora"
    assert model.model.config.id2label == {0: "None", 1: "Roadwork"}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
