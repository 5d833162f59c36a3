"""APT: entropy patch selection against a plain reference, the multi-scale ViT wrapper (zero-init, packing,
single-image graph), unsupported backbones, the task=apt retrofit run and the paired bootstrap of MCC."""
import functools
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import QUIET, compose_config
from PIL import Image
from sklearn.metrics import matthews_corrcoef

from train.__main__ import run_task
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.metrics import paired_bootstrap_mcc
from train.models import create_backbone
from train.models.apt import (APTViT, Packing, TokenPlan, flat_selection, grayscale_255, packed_attention,
                              patch_entropy, select_patches, token_counts)
from train.models.saving import load_classifier
from train.predictions import read_predictions
from train.runs import Run
from train.tiers.apt import APTModule
from train.tiers.training import build_datamodule

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD


pytestmark = pytest.mark.usefixtures("one_thread")


# --- plain references -----------------------------------------------------------------------------

def ref_gray(pixel_values: torch.Tensor) -> np.ndarray:
    """Un-normalise to 0-255 RGB (clipped) and take 0.2989 R + 0.587 G + 0.114 B, in float64."""
    x = pixel_values.double().numpy()
    rgb = np.clip((x * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]) * 255, 0, 255)
    return 0.2989 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def ref_entropy(gray: np.ndarray, size: int) -> np.ndarray:
    """Base-2 entropy of the 512-bin histogram on [0, 256) of every whole ``size`` x ``size`` patch, by loops."""
    b, h, w = gray.shape
    out = np.zeros((b, h // size, w // size))
    for n in range(b):
        for i in range(h // size):
            for j in range(w // size):
                patch = gray[n, i * size:(i + 1) * size, j * size:(j + 1) * size]
                counts, _ = np.histogram(patch, bins=512, range=(0, 256))
                p = counts[counts > 0] / patch.size
                out[n, i, j] = -(p * np.log2(p)).sum()
    return out


def ref_select(entropies: dict[int, np.ndarray], thresholds, base_grid) -> list[np.ndarray]:
    """Quadtree, largest patches first: a patch is chosen if its entropy is below its threshold and none
    of the base cells beneath it is taken yet; base cells nobody took stay base."""
    b = next(iter(entropies.values())).shape[0]
    covered = np.zeros((b, *base_grid), dtype=bool)
    masks = {}
    for k in range(len(thresholds), 0, -1):
        f = 1 << k
        mask = np.zeros(entropies[k].shape, dtype=bool)
        for n, i, j in np.ndindex(*mask.shape):
            cells = covered[n, i * f:(i + 1) * f, j * f:(j + 1) * f]
            if entropies[k][n, i, j] < thresholds[k - 1] and not cells.any():
                mask[n, i, j] = True
                cells[:] = True
        masks[k] = mask
    masks[0] = ~covered
    return [masks[k] for k in range(len(thresholds) + 1)]


def coverage(masks, base_grid) -> np.ndarray:
    """How many chosen patches cover each base cell."""
    total = np.zeros((masks[0].shape[0], *base_grid), dtype=int)
    for k, m in enumerate(masks):
        up = np.kron(np.asarray(m, dtype=int), np.ones((1, 1 << k, 1 << k), dtype=int))
        total[:, :up.shape[1], :up.shape[2]] += up
    return total


def between(values: np.ndarray, frac: float) -> float:
    """A threshold halfway between two distinct values near the ``frac`` quantile (no ties at the boundary)."""
    u = np.unique(np.round(values.ravel(), 5))
    i = min(max(int(frac * (len(u) - 1)), 0), len(u) - 2)
    return float((u[i] + u[i + 1]) / 2)


def structured_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Normalised images of noise with flat, few-colour and smooth regions (some aligned to 4p, most not)."""
    rng = np.random.default_rng(seed)
    out = rng.random((n, 3, h, w))
    for img in out:
        img[:, :32, :32] = rng.random((3, 1, 1)) if rng.random() < 0.6 else img[:, :32, :32]
        for _ in range(int(rng.integers(2, 7))):
            size = int(rng.choice([8, 12, 16, 24, 32, 40]))
            y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
            region = img[:, y:y + size, x:x + size]
            kind = rng.integers(3)
            if kind == 0:  # flat
                region[:] = rng.random((3, 1, 1))
            elif kind == 1:  # a few colours
                colours = rng.random((3, int(rng.integers(2, 5))))
                region[:] = colours[:, rng.integers(colours.shape[1], size=region.shape[1:])]
            else:  # a gentle gradient
                ramp = np.linspace(0, 0.1, region.shape[2])[None, None, :]
                region[:] = rng.random((3, 1, 1)) * 0.8 + ramp
    out[0, :, :32, :32] = rng.random((3, 1, 1))  # at least one flat 4p patch
    return torch.from_numpy((out - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]).float()


# --- 1. selection ----------------------------------------------------------------------------------

def test_grayscale_matches_the_luma_formula():
    images = structured_images(3, 24, 16, seed=1)
    images[0, :, 0, 0] = torch.tensor([9.0, -9.0, 9.0])  # outside the pixel range: clipped per channel
    gray = grayscale_255(images, MEAN, STD)
    assert gray.shape == (3, 24, 16) and gray.dtype == torch.float32
    np.testing.assert_allclose(gray.numpy(), ref_gray(images), atol=1e-3)
    assert gray[0, 0, 0].item() == pytest.approx(0.2989 * 255 + 0.114 * 255, abs=1e-3)


@pytest.mark.parametrize("h,w,n_thresholds", [(56, 40, 2), (72, 64, 3)])
def test_selection_matches_a_per_patch_reference(h, w, n_thresholds):
    patch = 8
    images = structured_images(6, h, w, seed=h)
    gray = grayscale_255(images, MEAN, STD)
    g = gray.double().numpy()
    entropies = {k: ref_entropy(g, patch << k) for k in range(n_thresholds + 1)}
    for k, ref in entropies.items():
        got = patch_entropy(gray, patch << k)
        assert got.shape == ref.shape == (6, h // (patch << k), w // (patch << k))
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)
    # content spans flat (0 bits) to noisy patches at every scale
    assert (entropies[1] < 1e-6).any() and (entropies[1] > 6).any() and (entropies[2] < 1e-6).any()

    base_grid = (h // patch, w // patch)
    mid = [between(entropies[k], 0.5) for k in range(1, n_thresholds + 1)]
    for thresholds in (mid, [between(entropies[k], 0.8) for k in range(1, n_thresholds + 1)],
                       [-1.0] * n_thresholds, [100.0] * n_thresholds, [100.0] + [-1.0] * (n_thresholds - 1)):
        masks = select_patches(gray, patch, thresholds)
        expected = ref_select(entropies, thresholds, base_grid)
        assert len(masks) == n_thresholds + 1
        for k, (m, e) in enumerate(zip(masks, expected)):
            assert m.dtype == torch.bool and m.shape == e.shape, k
            assert np.array_equal(m.numpy(), e), (thresholds, k)
        assert (coverage([m.numpy() for m in masks], base_grid) == 1).all()  # a quadtree: each base cell once
        counts = token_counts(masks)
        assert counts.tolist() == [int(sum(e[n].sum() for e in expected)) for n in range(6)]
        table = flat_selection(masks)
        assert table.shape == (6, sum(int(np.prod(e.shape[1:])) for e in expected))
        assert table.sum(1).tolist() == counts.tolist()
        if thresholds is mid:  # the reference thresholds choose some larger patches, not all
            assert expected[1].any() and not expected[1].all() and expected[2].any()
    # partial 2p / 4p patches at the right and bottom edges stay base; by hand for "everything chosen":
    masks = select_patches(gray, patch, [100.0] * n_thresholds)
    if (h, w) == (56, 40):  # 4p over base rows/cols 0-3, 2p over rows 4-5 cols 0-3, row 6 and col 4 base
        assert masks[0][:, 6, :].all() and masks[0][:, :, 4].all()
        assert token_counts(masks).tolist() == [1 + 2 + 11] * 6
    else:  # one 8p patch over the 8x8 base cells, the 9th base row stays
        assert token_counts(masks).tolist() == [1 + 8] * 6
    assert token_counts(select_patches(gray, patch, [-1.0] * n_thresholds)).tolist() == [base_grid[0] * base_grid[1]] * 6


# --- model helpers ---------------------------------------------------------------------------------

VARIANTS = {"cls": {}, "reg_tokens": {"reg_tokens": 2, "no_embed_class": True},
            "avg_pool": {"global_pool": "avg", "class_token": False},
            "avg_pool_prefix": {"global_pool": "avg", "reg_tokens": 2}}  # the mean leaves class/register tokens out


def tiny_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    """A stock timm ViT (64 px, patch 8), its weights moved away from timm's near-zero init so that the class
    and register tokens, position embeddings and head all shape the logits."""
    torch.manual_seed(seed)
    vit = create_backbone("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, embed_dim=64, num_heads=4,
                          **kwargs)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit.eval()


def randomise_new_layers(apt: APTViT, seed: int = 1) -> None:
    """As if trained: the zero-initialised layers non-zero, so the larger patches' sub-patch path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in apt.embed.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def model_images(seed: int = 0, n: int = 5) -> torch.Tensor:
    images = structured_images(n, 64, 64, seed=seed)
    images[-1] = ((torch.full((3, 1, 1), 0.3) - torch.tensor(MEAN)[:, None, None])
                  / torch.tensor(STD)[:, None, None]).expand(3, 64, 64)  # one flat image
    return images


def median_thresholds(images: torch.Tensor, patch: int = 8) -> list[float]:
    gray = grayscale_255(images, MEAN, STD)
    return [float(patch_entropy(gray, patch << k).median()) + 1e-3 for k in (1, 2)]


def make_apt(variant: str, images: torch.Tensor, **kwargs) -> APTViT:
    apt = APTViT(tiny_vit(**VARIANTS[variant]), median_thresholds(images), MEAN, STD, **kwargs).eval()
    masks = apt.select(images)
    assert masks[1].any() and masks[2].any(), "the test images must choose some 2p and 4p patches"
    assert len(set(token_counts(masks).tolist())) > 1, "the test images must differ in token counts"
    return apt


# --- 2. zero-init -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_base_only_is_the_wrapped_vit_and_new_layers_start_at_zero(variant):
    images = model_images()
    apt = make_apt(variant, images)
    with torch.no_grad():
        expected = apt.vit(images).softmax(-1)
        with apt.base_only():
            masks = apt.select(images)
            base = apt(images).softmax(-1)
        assert token_counts(masks).tolist() == [64] * len(images) and not masks[1].any() and not masks[2].any()
        assert expected[:, 1].std() > 0.05  # a real spread of scores: the tolerance below means something
        assert (base - expected).abs().max() <= 1e-5
        selected = apt(images)
        assert (selected.softmax(-1) - expected).abs().max() > 1e-3  # fewer tokens: a different function
        assert apt.thresholds == median_thresholds(images)  # base_only restores the thresholds

        # before training the sub-patch path (aggregate convolutions) contributes nothing: zero_linear is zero
        assert len(apt.embed.zero_linear) == len(apt.embed.aggregate) == 2
        assert all(not lin.weight.any() and not lin.bias.any() for lin in apt.embed.zero_linear)
        for conv in apt.embed.aggregate:
            assert conv.kernel_size == (2, 2) and conv.stride == (2, 2)
            conv.weight.add_(torch.randn_like(conv.weight))
            conv.bias.add_(1.0)
        assert torch.equal(apt(images), selected)
        apt.embed.zero_linear[0].weight.normal_()  # ... and the path does reach the output once it is not
        assert (apt(images) - selected).abs().max() > 1e-4

        # a flat patch downsampled is the same flat patch: at init its 2p / 4p token is the mean of the base
        # tokens beneath it (same pixel embedding, position embedding averaged over the covered cells)
        apt.embed.zero_linear[0].weight.zero_()
        table = apt.embed(apt.vit, images[-1:])[0]
        base_rows = table[:64].reshape(8, 8, -1)
        two = table[64:80].reshape(4, 4, -1)
        four = table[80:84].reshape(2, 2, -1)
        assert table.shape[0] == 64 + 16 + 4
        torch.testing.assert_close(two, base_rows.reshape(4, 2, 4, 2, -1).mean((1, 3)), atol=1e-5, rtol=0)
        torch.testing.assert_close(four, base_rows.reshape(2, 4, 2, 4, -1).mean((1, 3)), atol=1e-5, rtol=0)


# --- 3. packing -------------------------------------------------------------------------------------

def trained_looking_apt(variant: str, seed: int):
    """(images, an APT model with non-zero new layers, its masks for those images)."""
    images = model_images(seed=seed)
    apt = make_apt(variant, images)
    randomise_new_layers(apt)
    return images, apt, apt.select(images)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_batch_equals_one_image_at_a_time(variant):
    images, apt, masks = trained_looking_apt(variant, seed=3)
    with torch.no_grad():
        single = torch.cat([apt(images[i:i + 1], [m[i:i + 1] for m in masks]) for i in range(len(images))])
        for backend in ("padded", "jagged", "flex", "auto"):
            apt.attention = backend
            packed = apt(images, masks)
            assert (packed - single).abs().max() <= 1e-5, backend
        assert single[:, 1].std() > 0.1  # distinct logits per image: a mix-up between images would show


def test_a_plan_made_per_sample_in_loader_workers_gives_the_same_logits():
    images, apt, masks = trained_looking_apt("reg_tokens", seed=4)
    selector = pickle.loads(pickle.dumps(apt.selector()))  # what a loader worker receives
    keep = torch.stack([selector(image)["apt_keep"] for image in images])  # one sample at a time, then collated
    assert torch.equal(keep, flat_selection(masks))
    plan = apt.plan(keep=keep)
    assert torch.equal(plan.patch_tokens, token_counts(masks)) and plan.patch_tokens.unique().numel() > 1
    # the packed order: image by image, its prefix rows, then its chosen table rows in table order
    n_table, prefix = keep.shape[1], apt.num_prefix_tokens
    expected = torch.cat([torch.cat([i * prefix + torch.arange(prefix), len(images) * prefix + i * n_table
                                     + keep[i].nonzero().squeeze(1)]) for i in range(len(images))])
    assert torch.equal(plan.order, expected)
    with torch.no_grad():
        assert torch.equal(apt(images, plan=plan), apt(images, masks))
        with apt.base_only():  # a plan made with the thresholds does not apply: the wrapped model's function
            assert (apt(images, plan=plan) - apt.vit(images)).abs().max() <= 1e-5


def test_packing_moves_with_the_sizes_it_already_knows():
    plan = TokenPlan.from_keep(torch.tensor([[True, False, True], [False, False, True]]), n_prefix=1)
    assert plan.order.tolist() == [0, 2, 4, 1, 7] and plan.packing.lengths.tolist() == [3, 2]
    moved = plan.to("meta")  # any other device: the host-side sizes travel as ints, nothing is re-read
    assert moved.order.device.type == "meta" and moved.packing.cu_seqlens.device.type == "meta"
    assert (moved.packing.total, moved.packing.max_length, moved.packing.min_length) == (5, 3, 2)


def test_packed_attention_is_per_sequence_sdpa():
    torch.manual_seed(0)
    lengths = torch.tensor([5, 17, 1, 9, 40])
    packing = Packing.from_lengths(lengths)
    assert packing.offsets.tolist() == [0, 5, 22, 23, 32, 72] and packing.total == 72
    q, k, v = (torch.randn(72, 4, 8) for _ in range(3))
    assert torch.equal(packing.unpad(packing.pad(q)), q)

    def reference(q, k, v):
        out = []
        for s, e in zip(packing.offsets[:-1].tolist(), packing.offsets[1:].tolist()):
            one = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)))
            out.append(one.transpose(0, 1))
        return torch.cat(out)

    expected = reference(q, k, v)
    for backend in ("padded", "jagged", "flex", "auto"):
        out = packed_attention(q, k, v, packing, backend)
        assert out.shape == q.shape and (out - expected).abs().max() <= 1e-5, backend
    with pytest.raises(ValueError, match="attention backend"):
        packed_attention(q, k, v, packing, "nope")

    weight = torch.randn(72, 4, 8)
    grads = {}
    for name in ("reference", "padded", "jagged"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = reference(*leaves) if name == "reference" else packed_attention(*leaves, packing, name)
        (out * weight).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for name in ("padded", "jagged"):
        for got, want in zip(grads[name], grads["reference"]):
            assert (got - want).abs().max() <= 1e-5, name
    assert all(g.abs().max() > 1e-3 for g in grads["reference"])


# --- 4. the single-image graph --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_tokens_equals_the_batched_forward(variant):
    images, apt, masks = trained_looking_apt(variant, seed=5)
    keep = flat_selection(masks)
    with torch.no_grad():
        batched = apt(images, masks)
        for i in range(len(images)):
            index = keep[i].nonzero().squeeze(1)
            one = apt.forward_tokens(images[i:i + 1], index)
            assert one.shape == (1, 2) and (one[0] - batched[i]).abs().max() <= 1e-5, i
        # the table index matters: base-only rows of the same image give the base-only function
        with apt.base_only():
            base = apt(images[:1])
        assert (apt.forward_tokens(images[:1], torch.arange(64)) - base).abs().max() <= 1e-5
        assert (base - batched[:1]).abs().max() > 1e-4


# --- 5. unsupported backbones ---------------------------------------------------------------------

def test_unsupported_backbones_raise_clearly():
    from transformers import ViTConfig

    with pytest.raises(ValueError, match="APT wraps timm VisionTransformer models; got ConvNeXt"):
        APTViT(create_backbone("convnext_atto"))
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    with pytest.raises(ValueError, match="got HFImageClassifier .*transformers"):
        APTViT(create_backbone("tiny-vit", library="transformers", hf_config=config.to_dict()))
    small = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    with pytest.raises(ValueError, match=r"global_pool='map'"):
        APTViT(create_backbone("vit_tiny_patch16_224", global_pool="map", **small))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        APTViT(create_backbone("vit_tiny_patch16_224", dynamic_img_size=True, **small))


# --- 6. the retrofit run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def apt_run(tiny_run, data_dir, tmp_path_factory):
    """``task=apt`` once on a copy of the tiny run; returns (run, cfg)."""
    root = tmp_path_factory.mktemp("apt_run")
    run = Run.open(shutil.copytree(tiny_run.path, root / "run"))
    cfg = compose_config(f"paths.root_dir={root}", f"paths.data_dir={data_dir}", "debug=tiny", *QUIET,
                         "task=apt", f"run_dir={run.path}", "apt.bootstrap=200", "apt.grid_samples=4",
                         "apt.quantiles=[0.5,0.4]", "apt.module.train=all")  # (the default job's sizes: new)
    run_task(cfg)
    return run, cfg


def split_images(cfg, run, split: str, level: int) -> tuple[torch.Tensor, np.ndarray]:
    _, config = load_classifier(run.artifact("stage1", "model"))
    datamodule = build_datamodule(cfg, run, config["input"])
    batches = list(datamodule.loader(datamodule.dataset(split, level)))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["index"] for b in batches]).numpy()


def test_apt_run_thresholds_tokens_and_paired_report(apt_run, tiny_run):
    run, cfg = apt_run
    report = json.loads(run.artifact("apt", "report").read_text())
    assert report["patch_sizes"] == [8, 16, 32] and report["quantiles"] == [0.5, 0.4]

    # thresholds: the 50% / 40% quantiles of the val split's level-0 candidate 16 / 32 px patch entropies
    val, _ = split_images(cfg, run, "val", 0)
    gray = grayscale_255(val, MEAN, STD).double().numpy()
    val_entropy = {k: ref_entropy(gray, 8 << k) for k in (1, 2)}
    for k, q in ((1, 0.5), (2, 0.4)):
        assert report["thresholds"][k - 1] == pytest.approx(np.quantile(val_entropy[k], q), abs=1e-4)

    tokens = report["tokens"]
    assert {"test/L0", "test/L1", "val/L0", "natural_photos"} <= set(tokens)
    for name, summary in tokens.items():
        assert summary["base_tokens"] == 64 and 0 < summary["mean_tokens"] < 64, name
        assert 0 < summary["reduction"] < 1, name
        assert summary["reduction"] == pytest.approx(1 - summary["mean_tokens"] / 64, abs=1e-6)
        assert sum(summary["histogram"]["counts"]) == summary["n"] and summary["min"] <= summary["max"] <= 64
    assert len(tokens["natural_photos"]["per_photo"]) == tokens["natural_photos"]["n"] >= 5

    # test/L0 token counts: the reference selection at the reported thresholds (near-ties bound the difference)
    test, _ = split_images(cfg, run, "test", 0)
    g = grayscale_255(test, MEAN, STD).double().numpy()
    entropies = {k: ref_entropy(g, 8 << k) for k in (1, 2)}
    masks = ref_select(entropies, report["thresholds"], (8, 8))
    ties = sum(((np.abs(entropies[k] - report["thresholds"][k - 1]) < 1e-4).sum()) * (4 ** k - 1) for k in (1, 2))
    assert tokens["test/L0"]["n"] == len(test)
    assert abs(np.mean(sum(m.sum((1, 2)) for m in masks)) - tokens["test/L0"]["mean_tokens"]) <= ties / len(test) + 1e-6

    # paired test MCC: "a" is Stage-1 itself (base patches only), "b" the retrofitted model
    stage1 = tiny_run.metrics("stage1")
    paired = report["paired_test_mcc"]
    assert set(paired) == {"L0", "L1", "all"}
    for level in (0, 1):
        p = paired[f"L{level}"]
        assert p["mcc_a"] == pytest.approx(stage1[f"test/L{level}/mcc"], abs=1e-6)
        assert p["mcc_a"] == pytest.approx(report["test"]["original"][f"test/L{level}/mcc"], abs=1e-6)
        assert p["mcc_b"] == pytest.approx(report["test"]["after"][f"test/L{level}/mcc"], abs=1e-6)
        assert p["delta"] == pytest.approx(p["mcc_b"] - p["mcc_a"], abs=1e-9) and p["low"] <= p["high"]
    assert set(report["val"]) == {"original", "zero_shot", "after"}


def test_apt_run_artifacts_reload_and_reproduce_predictions(apt_run, tiny_run):
    run, cfg = apt_run
    entry = run.read()["tasks"]["apt"]
    assert entry["status"] == "complete"
    assert {"model", "model_config", "test_predictions", "report", "patch_grid"} <= set(entry["artifacts"])
    for name in ("model", "model_config", "test_predictions", "report", "patch_grid"):
        assert run.artifact("apt", name).parent == run.path / "apt"  # exists, sha256 as recorded
    png = run.artifact("apt", "patch_grid")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    report = json.loads(run.artifact("apt", "report").read_text())
    config = json.loads(run.artifact("apt", "model_config").read_text())
    assert config["apt"]["thresholds"] == report["thresholds"]

    model, loaded_config = load_classifier(run.artifact("apt", "model"))
    assert isinstance(model, APTViT) and model.thresholds == report["thresholds"]
    predictions = read_predictions(run.artifact("apt", "test_predictions"))
    assert set(predictions) == {0, 1}
    stage1_predictions = read_predictions(tiny_run.artifact("stage1", "test_predictions"))
    for level, cols in predictions.items():
        images, index = split_images(cfg, run, "test", level)
        images, index = images[:12], index[:12]
        row = np.searchsorted(cols["index"], index)
        assert np.array_equal(cols["index"][row], index)
        with torch.no_grad():
            logits = model(images).numpy()
        np.testing.assert_allclose(logits, cols["logits"][row], atol=1e-4)
        assert np.abs(cols["logits"] - stage1_predictions[level]["logits"]).max() > 1e-3  # not Stage-1's outputs

    # the epoch trained the new layers (zero-initialised) and, with apt.module.train=all, the ViT too
    for layer in model.embed.zero_linear:
        assert layer.weight.abs().max() > 0
    stage1, _ = load_classifier(tiny_run.artifact("stage1", "model"))
    assert not torch.equal(stage1.blocks[0].attn.qkv.weight, model.vit.blocks[0].attn.qkv.weight)


def test_train_new_updates_only_the_new_layers(apt_run, tiny_run):
    run, cfg = apt_run
    stage1_path = tiny_run.artifact("stage1", "model")
    thresholds = json.loads(run.artifact("apt", "report").read_text())["thresholds"]
    with pytest.raises(ValueError, match="apt.module.train='some'"):
        APTModule(str(stage1_path), thresholds, train="some")
    module = APTModule(str(stage1_path), thresholds, train="new", layer_decay=0.75, bootstrap=0,
                       optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.05))
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("embed.") for n in trainable)
    assert {f"embed.zero_linear.{i}.weight" for i in range(2)} <= trainable
    optimizer = module.configure_optimizers()
    vit_before = {k: v.clone() for k, v in module.net.vit.state_dict().items()}
    embed_before = {k: v.clone() for k, v in module.net.embed.state_dict().items()}

    _, config = load_classifier(stage1_path)
    datamodule = build_datamodule(cfg, run, config["input"])
    batch = next(iter(datamodule.loader(datamodule.dataset("train"), batch_size=16)))
    module.train()
    for _ in range(2):
        loss = module.criterion(module(batch["image"]), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, module.net.vit.state_dict()[k]) for k, v in vit_before.items())
    changed = {k for k, v in module.net.embed.state_dict().items() if not torch.equal(v, embed_before[k])}
    assert {"zero_linear.0.weight", "zero_linear.1.weight", "aggregate.0.weight", "aggregate.1.weight"} <= changed


# --- 7. paired bootstrap of MCC -----------------------------------------------------------------------

def test_paired_bootstrap_mcc():
    rng = np.random.default_rng(0)
    n = 200
    target = rng.integers(0, 2, n)
    probs_a = np.where(rng.random(n) < 0.7, target, 1 - target) * 0.6 + 0.2  # 70% right: 0.8 / 0.2
    same = paired_bootstrap_mcc(torch.tensor(probs_a), torch.tensor(probs_a), torch.tensor(target),
                                num_bootstraps=300)
    mcc_a = matthews_corrcoef(target, probs_a > 0.5)
    assert same["mcc_a"] == same["mcc_b"] == pytest.approx(mcc_a, abs=1e-6)
    assert same["delta"] == 0 and same["low"] == 0 and same["high"] == 0

    wrong = np.flatnonzero((probs_a > 0.5) != target)
    fixed = rng.choice(wrong, size=len(wrong) * 2 // 3, replace=False)
    probs_b = probs_a.copy()
    probs_b[fixed] = np.where(target[fixed] == 1, 0.9, 0.1)  # b fixes two thirds of a's errors, adds none
    args = torch.tensor(probs_a), torch.tensor(probs_b), torch.tensor(target)
    out = paired_bootstrap_mcc(*args, num_bootstraps=2000)
    delta = matthews_corrcoef(target, probs_b > 0.5) - mcc_a
    assert delta > 0.2 and out["delta"] == pytest.approx(delta, abs=1e-6)
    assert out["mcc_b"] == pytest.approx(matthews_corrcoef(target, probs_b > 0.5), abs=1e-6)
    assert 0 < out["low"] <= out["delta"] <= out["high"] < 1

    # the same percentile interval from an independent paired bootstrap (other random draws)
    def mcc(y, pred):  # vectorised over resamples: (R, n) each
        tp, tn = (pred & (y == 1)).sum(1), (~pred & (y == 0)).sum(1)
        fp, fn = (pred & (y == 0)).sum(1), (~pred & (y == 1)).sum(1)
        den = np.sqrt(((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).astype(float))
        return np.where(den > 0, (tp * tn - fp * fn) / np.maximum(den, 1), 0.0)

    draws = rng.integers(0, n, (4000, n))
    ref = mcc(target[draws], probs_b[draws] > 0.5) - mcc(target[draws], probs_a[draws] > 0.5)
    assert mcc(target[None], probs_b[None] > 0.5)[0] == pytest.approx(out["mcc_b"], abs=1e-6)
    assert out["low"] == pytest.approx(np.quantile(ref, 0.025), abs=0.03)

    # strata (validator levels): the MCC within each stratum, averaged; a pair of rows per group moves together
    strata, groups = np.arange(n) % 2, np.arange(n) // 2
    levels = paired_bootstrap_mcc(*args, groups=torch.tensor(groups), strata=torch.tensor(strata),
                                  num_bootstraps=500)
    for key, probs in (("mcc_a", probs_a), ("mcc_b", probs_b)):
        per_stratum = [matthews_corrcoef(target[strata == s], probs[strata == s] > 0.5) for s in (0, 1)]
        assert levels[key] == pytest.approx(np.mean(per_stratum), abs=1e-6)
    assert 0 < levels["low"] <= levels["delta"] <= levels["high"] < 1
    assert out["high"] == pytest.approx(np.quantile(ref, 0.975), abs=0.03)
    assert paired_bootstrap_mcc(*args, num_bootstraps=2000) == out  # seeded
    assert paired_bootstrap_mcc(*args, num_bootstraps=2000, seed=1)["low"] != out["low"]

    # groups are resampled whole: every sample twice, grouped, is the single sample set resampled
    twice = [torch.tensor(np.repeat(x, 2)) for x in (probs_a, probs_b, target)]
    grouped = paired_bootstrap_mcc(*twice, groups=torch.tensor(np.repeat(np.arange(n) + 1000, 2)),
                                   num_bootstraps=2000)
    assert grouped["delta"] == pytest.approx(out["delta"], abs=1e-6)
    assert grouped["low"] == pytest.approx(out["low"], abs=1e-6)
    assert grouped["high"] == pytest.approx(out["high"], abs=1e-6)
    ungrouped = paired_bootstrap_mcc(*twice, num_bootstraps=2000)  # duplicates taken as independent: too narrow
    assert ungrouped["high"] - ungrouped["low"] < 0.85 * (grouped["high"] - grouped["low"])


# --- 8. calibration and the bundle -------------------------------------------------------------------

def test_cascade_full_experiment_orders_every_stage_after_what_it_reads():
    cfg = compose_config("+experiment=cascade_full")
    stages = list(cfg.pipeline.stages)
    assert stages == ["data", "prepare", "stage1", "apt", "calibrate", "draft", "difficulty", "prm", "features",
                      "fusion", "thresholds", "export", "evaluate"]
    assert "apt" in cfg.calibrate.tiers and "apt" in cfg.export.models and cfg.export.hf_model == "stage1"
    # the draft learns from the calibrated Stage-1; the router from the draft's and Stage-1's outcomes
    assert cfg.draft.teacher in cfg.calibrate.tiers and stages.index("calibrate") < stages.index("draft")
    assert stages.index("draft") < stages.index("difficulty") < stages.index("export")
    # the PRM reads the calibrated Stage-1; the feature store the calibrated tiers; fusion the store
    assert cfg.prm.views_model in cfg.calibrate.tiers and stages.index("calibrate") < stages.index("prm")
    assert stages.index("draft") < stages.index("features") < stages.index("fusion") < stages.index("export")
    assert list(cfg.export.models) == ["difficulty", "draft", "stage1", "apt", "prm", "fusion"]
    # the thresholds stage reads every tier of the cascade, and the export writes them into the manifest
    assert stages.index("fusion") < stages.index("thresholds") < stages.index("export")
    assert set(cfg.cascade.tiers) <= set(cfg.export.models)


def test_apt_is_calibrated_exported_and_served_from_the_bundle(apt_run, tmp_path):
    from train.export import Bundle

    run, cfg = apt_run
    run = Run.open(shutil.copytree(run.path, tmp_path / "run"))
    overrides = [f"paths.root_dir={tmp_path}", f"paths.data_dir={cfg.paths.data_dir}", "debug=tiny", *QUIET,
                 f"run_dir={run.path}", "pipeline.stages=[calibrate,export]", "calibrate.tiers=[stage1,apt]",
                 "export.models=[stage1,apt]", "calibrate.levels=[0]", "pipeline.force=true"]
    run_task(compose_config(*overrides))
    bundle = Bundle(run.path / "export")
    entry = bundle.manifest.models["apt"]
    assert (run.path / "export" / "apt.onnx").is_file() and not (run.path / "export" / "apt_hf").exists()
    assert entry.apt is not None and entry.apt.patch_sizes == [8, 16, 32]
    report = json.loads(run.artifact("apt", "report").read_text())
    assert entry.apt.thresholds == report["thresholds"] and entry.onnx.parity_max_abs_diff <= 1e-4
    assert set(entry.onnx.inputs) == {"pixel_values", "token_index"}
    assert entry.apt.tokens["test/L0"]["reduction"] == pytest.approx(report["tokens"]["test/L0"]["reduction"])

    # the bundle reader picks the tokens itself and agrees with the calibrated PyTorch model
    model, config = load_classifier(run.artifact("calibrate", "apt_model"))
    images, _ = split_images(cfg, run, "test", 1)
    images = images[:12]
    with torch.no_grad():
        expected = model(images).softmax(-1)[:, 1].numpy()
    got = bundle.classifier("apt").probs(images.numpy())
    assert np.abs(got - expected).max() <= 1e-4
    assert config["calibration"]["method"] == "temperature" and config["calibration"]["folded"]
