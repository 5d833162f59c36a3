"""``task=pretrain``: FDSL learns fractal categories on the CPU, the saved backbone loads into Stage-1 exactly, a
resumed run equals an unbroken one, cards and shapes refuse another architecture, MAE beats the per-patch-mean
baseline on held-out images, and the shipped backbone matches its card."""
import json

import pytest
import torch
from conftest import QUIET, compose_config, copy_run
from safetensors.torch import load_file

from train.__main__ import run_task
from train.errors import ConfigError
from train.models import create_backbone
from train.runs import Run
from train.utils.faults import Preempted
from train.utils.files import sha256_file
from train.weights import SHIPPED

SMALL_VIT = ["model.img_size=32", "model.backbone.patch_size=8", "model.backbone.depth=2",
             "model.backbone.embed_dim=64", "model.backbone.num_heads=2", "model.backbone.pretrained=false"]
# grayscale on black: a ViT tells 10 categories apart within a few CPU steps (random colours take it far longer)
FDSL = ["task=pretrain", "pretrain.fdsl.classes=10", "pretrain.batch_size=64", "pretrain.held_out=320",
        "pretrain.fdsl.mixup=null", "pretrain.optimizer.lr=1e-3", "pretrain.fdsl.render.colour=false",
        "pretrain.fdsl.render.background=black", "trainer.limit_train_batches=null"]


def pretrain(root, data_dir, *overrides: str) -> Run:
    """``python -m train task=pretrain`` with a small ViT; returns its run."""
    run_task(compose_config(f"paths.root_dir={root}", f"paths.data_dir={data_dir}", *QUIET, *SMALL_VIT, *FDSL,
                            *overrides))
    (path,) = (root / "checkpoints").iterdir()
    return Run.open(path)


@pytest.fixture(scope="module")
def fdsl_run(tmp_path_factory, data_dir, one_thread):
    """FDSL on 10 categories, 2 epochs of 60 steps on the CPU."""
    return pretrain(tmp_path_factory.mktemp("fdsl"), data_dir, "pretrain.epochs=2", "pretrain.steps_per_epoch=60")


def test_fdsl_learns_the_categories(fdsl_run):
    metrics = fdsl_run.metrics("pretrain")
    assert metrics["val/acc"] >= 0.5  # 5x chance (10 categories) on held-out instances
    assert metrics["images_seen"] == 2 * 60 * 64
    card = json.loads(fdsl_run.artifact("pretrain", "card").read_text())
    assert card["sha256"] == sha256_file(fdsl_run.artifact("pretrain", "backbone"))
    assert card["architecture"] == {"library": "timm", "name": "vit_tiny_patch16_224", "patch_size": 8, "depth": 2,
                                    "embed_dim": 64, "num_heads": 2}
    assert card["method"] == "fdsl" and card["held_out"]["val/acc"] == metrics["val/acc"]


def test_the_pretrained_backbone_loads_into_stage1_exactly(fdsl_run, tiny_config):
    """Every tensor of the file, position embeddings included, is in the Stage-1 model; only the head is new."""
    saved = load_file(str(fdsl_run.artifact("pretrain", "backbone")))
    for pretrained in (str(fdsl_run.artifact("pretrain", "backbone")), str(fdsl_run.path)):  # the file, or the run
        model = create_backbone(**{**dict(tiny_config(*SMALL_VIT).model.backbone), "pretrained": pretrained})
        state = model.state_dict()
        assert set(state) - set(saved) == {"head.weight", "head.bias"} and not set(saved) - set(state)
        assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_a_pretraining_stopped_by_a_signal_resumes_to_the_unbroken_result(fdsl_run, tmp_path, data_dir, one_thread):
    """SIGINT inside the first epoch (what a time limit sends), then ``ckpt_path=last``: the same backbone as the
    unbroken run, since every image is drawn from the global step."""
    common = ("pretrain.epochs=2", "pretrain.steps_per_epoch=60")
    with pytest.raises(Preempted):
        pretrain(tmp_path, data_dir, *common, "+callbacks.stop._target_=interrupt.SignalAtStep",
                 "+callbacks.stop.step=45", "+callbacks.stop.signum=2")
    (path,) = (tmp_path / "checkpoints").iterdir()
    run = pretrain(tmp_path, data_dir, *common, f"run_dir={path}", "ckpt_path=last")
    resumed = load_file(str(run.artifact("pretrain", "backbone")))
    unbroken = load_file(str(fdsl_run.artifact("pretrain", "backbone")))
    assert all(torch.equal(resumed[k], v) for k, v in unbroken.items())


def test_pretraining_with_a_fused_optimizer_bf16_and_clipping_trains(tmp_path, data_dir, one_thread):
    """What a GPU run gets (fused AdamW under bf16-mixed, clipped at norm 1), which Lightning alone refuses."""
    run = pretrain(tmp_path, data_dir, "pretrain.epochs=1", "pretrain.steps_per_epoch=3", "pretrain.held_out=64",
                   "pretrain.optimizer.fused=true", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0")
    assert run.is_complete("pretrain") and run.metrics("pretrain")["images_seen"] == 3 * 64


@pytest.mark.parametrize("key, value, named", [("depth", 3, "misses tensor 'blocks.2."),
                                                   ("embed_dim", 32, r"\(64,\) in the file, \(32,\) in the model")])
def test_another_architecture_is_refused_with_the_key_named(fdsl_run, tmp_path, tiny_config, key, value, named):
    """By the card (the config key), and without a card by the tensors (the missing or resized one)."""
    backbone = {**dict(tiny_config(*SMALL_VIT).model.backbone), key: value}
    if key == "embed_dim":
        backbone["num_heads"] = 2
    weights = fdsl_run.artifact("pretrain", "backbone")
    with pytest.raises(ConfigError, match=f"model.backbone.{key}={value} .* {key}=(2|64)"):
        create_backbone(**{**backbone, "pretrained": str(weights)})
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(weights.read_bytes())  # no card beside it
    with pytest.raises(ConfigError, match=named):
        create_backbone(**{**backbone, "pretrained": str(bare)})


def test_mae_reconstructs_held_out_images_better_than_patch_means(tiny_run, tmp_path, data_dir, one_thread):
    """MAE on the shared run's images (labels ignored): the val split's masked patches beat predicting each patch's
    mean, which the untrained decoder does not."""
    run = copy_run(tiny_run, tmp_path)
    run_task(compose_config(f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
                            *SMALL_VIT, f"run_dir={run.path}", "task=pretrain", "pretrain.method=mae",
                            "pretrain.epochs=15", "pretrain.batch_size=32", "trainer.limit_train_batches=null",
                            "pretrain.optimizer.lr=2e-3"))
    metrics = run.metrics("pretrain")
    assert metrics["val/loss"] < 0.9 * metrics["val/baseline"]
    assert json.loads(run.artifact("pretrain", "card").read_text())["method"] == "mae"


@pytest.mark.parametrize("name", ["vit_tiny_fdsl"])
def test_the_shipped_backbone_matches_its_card_and_loads(name):
    weights = SHIPPED[name]
    card = json.loads(weights.with_suffix(".json").read_text())
    assert sha256_file(weights) == card["sha256"]
    model = create_backbone(**card["architecture"], img_size=card["input"]["img_size"], pretrained=name)
    saved = load_file(str(weights))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
