"""Masked-autoencoder pretraining (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") of a timm ViT.

The encoder sees only the visible patches (plus its class / register tokens); a small decoder fills in mask tokens
and predicts the pixels of every patch; the loss counts the masked patches only.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from train.models.backbones import sincos_2d

ENCODER_PARTS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "norm_pre", "blocks", "norm")
PIXEL_EPS = 1e-6  # keeps flat patches finite under per-patch normalisation


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)``, patches in row-major order, pixels as ``(row, col, channel)``."""
    b, c, h, w = images.shape
    p = patch_size
    patches = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", patches).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify` for a ``grid_size`` = ``(rows, cols)`` grid of patches."""
    (b, _, d), (gh, gw), p = patches.shape, grid_size, patch_size
    c = d // (p * p)
    images = torch.einsum("nhwpqc->nchpwq", patches.reshape(b, gh, gw, p, p, c))
    return images.reshape(b, c, gh * p, gw * p)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the patches where ``mask`` is 1."""
    return (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()


def random_masking(batch: int, n_patches: int, n_masked: int, device: torch.device,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffle by argsort of uniform noise: ``(kept ids, mask with 1 = masked, ids undoing the shuffle)``."""
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, n_patches, generator=generator, device=noise_device).to(device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    n_keep = n_patches - n_masked
    return shuffle[:, :n_keep], (restore >= n_keep).float(), restore


class MaskedAutoencoder(nn.Module):
    """MAE around a timm ViT ``encoder`` (its own patch embedding, position embeddings, blocks and norm are used
    and trained; its head is unused)."""

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, norm_pix_loss: bool = True):
        super().__init__()
        missing = [name for name in ENCODER_PARTS if not hasattr(encoder, name)]
        if missing:
            raise ValueError(f"MaskedAutoencoder needs a timm VisionTransformer; {type(encoder).__name__} "
                             f"has no {', '.join(missing)}")
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid_size = tuple(encoder.patch_embed.grid_size)
        n_patches = self.grid_size[0] * self.grid_size[1]
        self.n_masked = round(n_patches * mask_ratio)
        if not 0 < self.n_masked < n_patches:
            raise ValueError(f"mask_ratio={mask_ratio} masks {self.n_masked} of {n_patches} patches; "
                             "it must leave at least one patch masked and one visible")
        self.norm_pix_loss = norm_pix_loss
        proj = encoder.patch_embed.proj
        pixels = self.patch_size ** 2 * proj.in_channels

        self.decoder_embed = nn.Linear(proj.out_channels, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, *self.grid_size)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, pixels)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's start: xavier-uniform Linear weights, zero biases, unit LayerNorms, mask token ~ N(0, 0.02)."""
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder features of the ``keep`` patches (position-embedded), prefix tokens dropped: ``(B, n_keep, D)``."""
        enc = self.encoder
        x = enc.patch_embed(images).flatten(1, -2)  # (B, N, D) also when the patch embedding keeps the grid
        n_patches = x.shape[1]
        if enc.pos_embed is not None:
            x = x + enc.pos_embed[:, -n_patches:]
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        tokens = [token for token in (enc.cls_token, enc.reg_token) if token is not None]
        if tokens:
            prefix = torch.cat(tokens, dim=1)
            if enc.pos_embed is not None and enc.pos_embed.shape[1] > n_patches:  # prefix rows unless no_embed_class
                prefix = prefix + enc.pos_embed[:, :-n_patches]
            x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(x)))
        return x[:, x.shape[1] - keep.shape[1]:]

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch, ``(B, N, p*p*C)``, from the visible patches' features and mask tokens."""
        x = self.decoder_embed(latent)
        masks = self.mask_token.expand(x.shape[0], self.n_masked, -1)
        x = torch.cat([x, masks], dim=1)
        x = torch.gather(x, 1, restore[..., None].expand(-1, -1, x.shape[-1])) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))

    def pixel_target(self, images: torch.Tensor) -> torch.Tensor:
        """Patchified images, each patch normalised to zero mean and unit variance when ``norm_pix_loss``."""
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True, correction=0)
            target = (target - mean) / (var + PIXEL_EPS) ** 0.5
        return target

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Mask, encode, decode; ``loss`` and ``baseline`` (each masked patch predicted as its own mean) are MSEs
        over the masked patches. ``generator`` fixes the masks (for a deterministic held-out evaluation)."""
        n_patches = self.grid_size[0] * self.grid_size[1]
        keep, mask, restore = random_masking(images.shape[0], n_patches, self.n_masked, images.device, generator)
        pred = self.decode(self.encode(images, keep), restore)
        target = self.pixel_target(images)
        with torch.no_grad():
            baseline = masked_mse(target.mean(dim=-1, keepdim=True).expand_as(target), target, mask)
        return {"loss": masked_mse(pred, target, mask), "pred": pred, "mask": mask, "target": target,
                "baseline": baseline}
