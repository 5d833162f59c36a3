"""Backbone factory (timm + transformers), sin-cos position init and fine-tuning modes, on tiny local models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train import LABELS
from train.models import (FINETUNE_MODES, HFImageClassifier, apply_finetune, count_parameters, create_backbone,
                          merge_finetune)

TINY_VIT = dict(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(**TINY_VIT, **kwargs)


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny transformers ViT saved with ``save_pretrained``; ``num_labels`` picks its head size."""
    from transformers import ViTConfig, ViTForImageClassification

    def make(num_labels: int = 2):
        torch.manual_seed(1)
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, num_labels=num_labels)
        folder = tmp_path / f"hf_vit_{num_labels}"
        ViTForImageClassification(config).save_pretrained(folder)
        return folder
    return make


def train_steps(model: torch.nn.Module, steps: int = 1, lr: float = 0.1) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if steps > 1 else torch.optim.SGD(params, lr=lr)
    labels = torch.tensor([0, 1, 0, 1])
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(IMAGES), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# --- create_backbone -------------------------------------------------------------------------------------------

def mae_sincos(dim: int, grid: int) -> np.ndarray:
    """Reference table written from the MAE recipe: x channels then y channels, sin then cos."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    ys, xs = np.divmod(np.arange(grid * grid), grid)
    parts = [f(np.outer(pos, omega)) for pos in (xs, ys) for f in (np.sin, np.cos)]
    return np.concatenate(parts, axis=1)


def test_sincos_pos_embed_init():
    plain, model = tiny_vit(), tiny_vit(pos_embed_init="sincos")
    pos = model.pos_embed.detach()[0]
    assert model.pos_embed.requires_grad
    torch.testing.assert_close(pos[0], plain.pos_embed.detach()[0, 0])  # class-token row untouched
    expected = torch.from_numpy(0.5 * mae_sincos(64, 4)).float()
    torch.testing.assert_close(pos[1:], expected)
    assert model.backbone_args["pos_embed_init"] == "sincos" and "pos_embed_init" not in plain.backbone_args
    rebuilt = create_backbone(**model.backbone_args)
    torch.testing.assert_close(rebuilt.pos_embed.detach()[0, 1:], expected)


def test_pos_embed_init_errors(hf_folder):
    with pytest.raises(ValueError, match="pos_embed_init"):
        tiny_vit(pos_embed_init="learned")
    with pytest.raises(ValueError, match="timm ViT"):
        create_backbone("convnext_atto", dims=(8, 16, 32, 64), pos_embed_init="sincos")
    with pytest.raises(ValueError, match="timm ViT"):
        create_backbone(str(hf_folder()), library="transformers", pos_embed_init="sincos")


WEIGHTS_FILES = {"vit": (TINY_VIT, "head."), "convnext": (dict(name="convnext_atto", dims=(8, 16, 32, 64)), "head.fc."),
                 "resnet": (dict(name="resnet10t"), "fc.")}  # (architecture, the classifier's keys)


@pytest.mark.parametrize("arch", list(WEIGHTS_FILES))
@pytest.mark.parametrize("head_classes,suffix", [(1000, ".safetensors"), (2, ".safetensors"), (2, ".pth")])
def test_pretrained_weights_file_loads_every_tensor(arch, head_classes, suffix, tmp_path):
    """``model.backbone.pretrained=<file>``: every backbone tensor comes from the file (the ViT's position embeddings
    too, although the config asks for a sin-cos start); a 2-class head loads, an ImageNet head is left out."""
    from safetensors.torch import save_file

    kwargs, head = WEIGHTS_FILES[arch]
    torch.manual_seed(5)
    source = create_backbone(**kwargs, num_classes=head_classes).state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source, path)
    else:
        torch.save({"state_dict": source}, path)  # a training checkpoint's layout
    extra = {"pos_embed_init": "sincos"} if arch == "vit" else {}
    torch.manual_seed(6)
    loaded = create_backbone(**kwargs, pretrained=str(path), **extra).state_dict()
    assert loaded.keys() == source.keys()
    for key, value in source.items():
        if key.startswith(head) and head_classes == 1000:  # the model's own 2-class start
            assert loaded[key].shape[0] == 2 and value.shape[0] == 1000, key
        else:
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_create_backbone_errors(tmp_path):
    with pytest.raises(ValueError, match="not a timm model"):
        create_backbone("vit_nonexistent_model")
    with pytest.raises(FileNotFoundError, match="not a weights file, a run folder or one of the shipped"):
        create_backbone(TINY_VIT["name"], pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        create_backbone(str(tmp_path / "missing_folder"), library="transformers")
    with pytest.raises(ValueError, match="library"):
        create_backbone(TINY_VIT["name"], library="keras")


def test_backbone_args_rebuild_timm():
    model = tiny_vit()
    assert model.backbone_args == {"library": "timm", **TINY_VIT}
    assert model(IMAGES).shape == (4, 2)
    create_backbone(**model.backbone_args).load_state_dict(model.state_dict(), strict=True)


def test_transformers_from_config(hf_folder):
    folder = str(hf_folder())
    model = create_backbone(folder, library="transformers", hidden_dropout_prob=0.1)
    assert isinstance(model, HFImageClassifier)
    assert model.backbone_args == {"library": "transformers", "name": folder, "hidden_dropout_prob": 0.1}
    assert model.model.config.hidden_dropout_prob == 0.1
    assert model.model.config.id2label == LABELS
    assert model.model.config.label2id == {"None": 0, "Roadwork": 1}
    assert model(IMAGES).shape == (4, 2)
    with pytest.raises(ValueError, match="no attribute"):
        create_backbone(folder, library="transformers", not_a_config_key=1)


@pytest.mark.parametrize("num_labels", [2, 3])
def test_transformers_pretrained(hf_folder, num_labels):
    from transformers import ViTForImageClassification

    folder = hf_folder(num_labels)
    saved = ViTForImageClassification.from_pretrained(folder).state_dict()
    model = create_backbone(str(folder), pretrained=True, library="transformers")
    assert model.model.config.id2label == LABELS
    loaded = model.model.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in loaded.items():
        if key.startswith("classifier.") and num_labels != 2:
            assert value.shape[0] == 2  # mismatched head: re-initialised for our two labels
        else:
            torch.testing.assert_close(value, saved[key], msg=key)
    assert model(IMAGES).shape == (4, 2)


def test_transformers_grad_checkpointing(hf_folder):
    model = create_backbone(str(hf_folder()), library="transformers")
    name = "is_activation_checkpointing" if hasattr(model.model, "activation_checkpointing_enable") else (
        "is_gradient_checkpointing")  # transformers 5 / 4
    is_on = lambda: getattr(model.model, name)  # noqa: E731
    assert not is_on()
    model.set_grad_checkpointing()
    assert is_on()
    train_steps(apply_finetune(model, "lora", r=2))  # checkpointed blocks still pass gradients to LoRA
    model.set_grad_checkpointing(False)
    assert not is_on()


# --- apply_finetune / merge_finetune ---------------------------------------------------------------------------

def test_unknown_mode():
    with pytest.raises(ValueError, match="linear_probe"):
        apply_finetune(tiny_vit(), "qlora")


def test_linear_probe_trains_only_head():
    model = apply_finetune(tiny_vit(), "linear_probe")
    head = sum(p.numel() for p in model.head.parameters())
    assert count_parameters(model) == (head, sum(p.numel() for p in model.parameters()))
    convnext = apply_finetune(create_backbone("convnext_atto", dims=(8, 16, 32, 64)), "linear_probe")
    assert count_parameters(convnext)[0] == sum(p.numel() for p in convnext.head.fc.parameters())


def test_lora_parameter_counts():
    head = sum(p.numel() for p in tiny_vit().head.parameters())
    counts = {mode: count_parameters(apply_finetune(tiny_vit(), mode, r=2)) for mode in ("lora", "dora", "rslora")}
    trainable, total = counts["lora"]
    assert head < trainable < 0.05 * total
    assert counts["dora"][0] > trainable  # + a magnitude vector per adapted layer
    assert counts["rslora"] == counts["lora"]


def test_lora_targets_and_scaling():
    scalings = {}
    for mode in ("lora", "rslora"):
        model = apply_finetune(tiny_vit(), mode, r=4, alpha=16)
        adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
        assert adapted == {f"blocks.{i}.{layer}" for i in range(2)
                           for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}  # not patch_embed.proj
        scalings[mode] = model.base_model.model.blocks[0].attn.qkv.scaling["default"]
    assert scalings == {"lora": 16 / 4, "rslora": 16 / math.sqrt(4)}


@pytest.mark.parametrize("mode", FINETUNE_MODES)
def test_training_step_changes_only_trainable(mode):
    model = apply_finetune(tiny_vit(), mode, r=2)
    assert model(IMAGES).shape == (4, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any("head" in n for n in changed)
    if mode != "full":
        assert "patch_embed.proj.weight" in {n.removeprefix("base_model.model.") for n in before} - trainable


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_merge_matches_wrapped_and_reloads(mode):
    model = apply_finetune(tiny_vit(), mode, r=2)
    train_steps(model, steps=3, lr=1e-2)
    assert model.base_model.model.blocks[0].attn.qkv.lora_B["default"].weight.abs().sum() > 0
    with torch.no_grad():
        wrapped = model(IMAGES)
        merged = merge_finetune(model)
        torch.testing.assert_close(merged(IMAGES), wrapped, atol=1e-5, rtol=0)
    fresh = create_backbone(**merged.backbone_args)
    assert fresh.state_dict().keys() == merged.state_dict().keys()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(IMAGES), merged(IMAGES), atol=0, rtol=0)


def test_merge_is_noop_without_adapters():
    model = apply_finetune(tiny_vit(), "linear_probe")
    assert merge_finetune(model) is model


def test_transformers_lora_merge(hf_folder):
    model = apply_finetune(create_backbone(str(hf_folder()), library="transformers"), "lora", r=2)
    trainable, total = count_parameters(model)
    assert sum(p.numel() for p in model.base_model.model.model.classifier.parameters()) < trainable < total
    assert model(IMAGES).shape == (4, 2)
    train_steps(model, steps=3, lr=1e-2)
    with torch.no_grad():
        wrapped = model(IMAGES)
        merged = merge_finetune(model)
        torch.testing.assert_close(merged(IMAGES), wrapped, atol=1e-5, rtol=0)
    fresh = create_backbone(**merged.backbone_args)
    fresh.load_state_dict(merged.state_dict(), strict=True)
