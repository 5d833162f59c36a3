"""Masked-autoencoder pretraining of a tiny timm ViT: patches, masking, the masked loss, and that it learns."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from train.models.mae import MaskedAutoencoder, masked_mse, patchify, unpatchify

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 0}
N_PATCHES = 16


def tiny_mae(norm_pix_loss: bool = True, **vit_kwargs) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", **TINY_VIT, **vit_kwargs)
    return MaskedAutoencoder(encoder, decoder_dim=64, decoder_depth=1, norm_pix_loss=norm_pix_loss)


def smooth_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Random colour ramps plus one Gaussian blob each, standardised like normalised photos."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    angle = torch.rand(n, 1, 1, 1, generator=generator) * 2 * math.pi
    centre = torch.rand(n, 2, 1, 1, generator=generator) * 2 - 1
    blob = torch.exp(-((x - centre[:, :1]) ** 2 + (y - centre[:, 1:]) ** 2) / 0.2)
    colours = torch.randn(n, 2, 3, 1, 1, generator=generator)
    images = colours[:, 0] * (angle.cos() * x + angle.sin() * y) + colours[:, 1] * blob
    return (images - images.mean()) / images.std()


def test_patchify_round_trip():
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, 8)
    assert patches.shape == (2, 4 * 6, 8 * 8 * 3)
    assert torch.equal(patches[0, 1], images[0, :, :8, 8:16].permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, 8, (4, 6)), images)


VIT_VARIANTS = {"cls": ({}, 0.75), "no-cls": ({"class_token": False, "global_pool": "avg"}, 0.5),
                "reg-no-embed-class": ({"reg_tokens": 2, "no_embed_class": True}, 0.75)}


@pytest.mark.parametrize(("vit_kwargs", "mask_ratio"), VIT_VARIANTS.values(), ids=VIT_VARIANTS.keys())
def test_outputs_and_mask(vit_kwargs, mask_ratio):
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", **TINY_VIT, **vit_kwargs)
    mae = MaskedAutoencoder(encoder, mask_ratio=mask_ratio, decoder_dim=32, decoder_depth=1)
    images = torch.randn(3, 3, 32, 32)
    every_patch = torch.arange(N_PATCHES).expand(3, -1)  # encoding them all must match timm's own forward
    features = encoder.forward_features(images)[:, encoder.num_prefix_tokens:]
    assert torch.allclose(mae.encode(images, every_patch), features, atol=1e-5)
    out = mae(images)
    assert out["pred"].shape == out["target"].shape == (3, N_PATCHES, 8 * 8 * 3)
    assert out["mask"].shape == (3, N_PATCHES)
    assert out["mask"].sum(dim=1).tolist() == [round(N_PATCHES * mask_ratio)] * 3
    assert not torch.equal(out["mask"][0], out["mask"][1])  # masks are drawn per sample
    assert torch.allclose(out["loss"], masked_mse(out["pred"], out["target"], out["mask"]))
    assert out["baseline"] == pytest.approx(1.0, abs=1e-3)  # normalised patches: each one's variance is 1
    out["loss"].backward()
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert encoder.pos_embed.grad.abs().sum() > 0


def test_generator_fixes_masks():
    mae, images = tiny_mae(), torch.randn(2, 3, 32, 32)
    first, second = (mae(images, torch.Generator().manual_seed(3))["mask"] for _ in range(2))
    assert torch.equal(first, second)


def test_loss_counts_masked_patches_only():
    pred, target = torch.randn(2, N_PATCHES, 12), torch.randn(2, N_PATCHES, 12)
    mask = (torch.rand(2, N_PATCHES, generator=torch.Generator().manual_seed(0)) < 0.75).float()
    changed = pred + 5 * (1 - mask)[..., None]  # moves the visible patches only
    assert torch.equal(masked_mse(changed, target, mask), masked_mse(pred, target, mask))
    assert masked_mse(pred + 5 * mask[..., None], target, mask) > masked_mse(pred, target, mask) + 1


def test_raw_pixel_baseline_is_patch_variance():
    mae, images = tiny_mae(norm_pix_loss=False), torch.randn(2, 3, 32, 32)
    out = mae(images, torch.Generator().manual_seed(0))
    variance = patchify(images, 8).var(dim=-1, correction=0)
    expected = (variance * out["mask"]).sum() / out["mask"].sum()
    assert torch.allclose(out["baseline"], expected) and torch.equal(out["target"], patchify(images, 8))


def test_learns_to_reconstruct_held_out_patches():
    data = torch.Generator().manual_seed(0)
    train_images, held_out = smooth_images(64, data), smooth_images(32, data)
    mae = tiny_mae()

    def held_out_loss() -> tuple[float, float]:
        mae.eval()
        with torch.no_grad():
            out = mae(held_out, torch.Generator().manual_seed(1))
        mae.train()
        return out["loss"].item(), out["baseline"].item()

    before, baseline = held_out_loss()
    optimizer = torch.optim.Adam(mae.parameters(), lr=1e-3)
    for step in range(150):  # alternate halves of the training set, 32 images a step
        optimizer.zero_grad()
        mae(train_images[step % 2 * 32:][:32])["loss"].backward()
        optimizer.step()
    after, _ = held_out_loss()
    print(f"held-out masked MSE {before:.3f} -> {after:.3f}, baseline {baseline:.3f}")
    assert before > 0.8 * baseline
    assert after < 0.6 * baseline


def test_refuses_a_non_vit():
    with pytest.raises(ValueError, match="patch_embed.*pos_embed"):
        MaskedAutoencoder(timm.create_model("resnet10t", num_classes=0))


def test_refuses_a_mask_ratio_that_masks_nothing():
    encoder = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedAutoencoder(encoder, mask_ratio=0.01)
