"""Variable-length token sequences packed into one, with block-diagonal (per-image) attention.

``Packing`` describes how images share the packed ``(T, ...)`` token axis; :func:`packed_attention`
computes attention that never crosses images, by one of three kernels:

- ``varlen``: FlashAttention's variable-length kernel on the packed tokens (``torch.nn.attention.varlen``,
  CUDA, bf16/fp16; no padding, no mask);
- ``jagged``: SDPA over a nested jagged tensor (the same idea through nested tensors; any dtype);
- ``flex``: ``flex_attention`` with a document mask (compiled; no padding, fully masked blocks skipped);
- ``padded``: masked SDPA on the sequences padded to the longest (any device, forward and backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "varlen", "jagged", "flex", "padded")


@dataclass
class Packing:
    """Images' sequences laid end to end: ``lengths[i]`` tokens for image ``i``, starting at ``offsets[i]``."""

    lengths: torch.Tensor  # (B,) int64

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor) -> Packing:
        """The packing of sequences of ``lengths`` tokens (taken as int64)."""
        return cls(lengths.long())

    @cached_property
    def offsets(self) -> torch.Tensor:
        """``(B + 1,)`` start of each image, then the total."""
        return F.pad(self.lengths.cumsum(0), (1, 0))

    @cached_property
    def total(self) -> int:
        """``T``: the tokens of all images together."""
        return int(self.offsets[-1])

    @cached_property
    def max_length(self) -> int:
        """The longest image's token count."""
        return int(self.lengths.max())

    @cached_property
    def min_length(self) -> int:
        """The shortest image's token count."""
        return int(self.lengths.min())

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """:attr:`offsets` as int32, what the FlashAttention kernels take."""
        return self.offsets.to(torch.int32)

    @cached_property
    def document(self) -> torch.Tensor:
        """``(T,)`` image number of every packed token."""
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=self.lengths.device), self.lengths,
                                       output_size=self.total)

    @cached_property
    def position(self) -> torch.Tensor:
        """``(T,)`` position of every packed token inside its image's sequence."""
        return torch.arange(self.total, device=self.lengths.device) - self.offsets[:-1][self.document]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packing:
        """This packing on ``device``, with the sizes already known on the host kept (no device sync to re-read them)."""
        device = torch.device(device)
        if self.lengths.device == device:
            return self
        moved = Packing(_to(self.lengths, device, non_blocking))
        for name, value in self.__dict__.items():  # the cached properties computed so far
            if isinstance(value, int):
                moved.__dict__[name] = value
            elif isinstance(value, torch.Tensor) and name != "lengths":
                moved.__dict__[name] = _to(value, device, non_blocking)
        return moved

    def prepare(self, backend: str) -> Packing:
        """Compute what ``backend`` reads (host-side ints included) now, outside any compiled region."""
        _ = self.offsets, self.total, self.max_length, self.min_length, self.cu_seqlens
        if backend in ("padded", "flex") or self.lengths.device.type != "cuda":
            _ = self.document, self.position, self.key_mask
        if backend == "flex":
            _ = self.flex_block_mask
        return self

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """``(T, ...)`` -> ``(B, max_length, ...)`` with zeros after each sequence."""
        out = packed.new_zeros(len(self.lengths), self.max_length, *packed.shape[1:])
        return out.index_put((self.document, self.position), packed)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pad`."""
        return padded[self.document, self.position]

    @cached_property
    def key_mask(self) -> torch.Tensor:
        """``(B, 1, 1, max_length)`` True where a padded position holds a real token."""
        valid = torch.arange(self.max_length, device=self.lengths.device) < self.lengths.unsqueeze(1)
        return valid[:, None, None, :]

    @cached_property
    def flex_block_mask(self):
        """``flex_attention``'s block mask: a token attends only to tokens of its own image."""
        from torch.nn.attention.flex_attention import create_block_mask

        document = self.document

        def same_image(b, h, q, k):
            return document[q] == document[k]

        return create_block_mask(same_image, None, None, self.total, self.total, device=document.device,
                                 _compile=document.device.type == "cuda")


def _to(tensor: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """A host-to-device copy that does not wait for the device (pinned first when asked not to block)."""
    if non_blocking and device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=non_blocking)


@dataclass
class TokenPlan:
    """Which rows of each image's token table form the packed sequence, in order, and how they are packed.

    ``order[t]`` is the row of ``cat([prefix rows of every image, table rows of every image])`` at packed
    position ``t``: each image's ``n_prefix`` prefix tokens, then its chosen table rows in table order.
    Made on the CPU (in a data loader, say), a plan moves to the GPU without any device sync.
    """

    order: torch.Tensor  # (T,) int64
    packing: Packing
    n_prefix: int

    @classmethod
    def from_keep(cls, keep: torch.Tensor, n_prefix: int) -> TokenPlan:
        """From ``keep``, ``(B, N_table)`` bool: the table rows each image uses."""
        batch, n_table = keep.shape
        packing = Packing.from_lengths(keep.sum(1) + n_prefix)
        _ = packing.offsets, packing.total, packing.max_length, packing.min_length, packing.cu_seqlens
        starts = packing.offsets[:-1]
        order = torch.empty(packing.total, dtype=torch.long, device=keep.device)
        order[(starts[:, None] + torch.arange(n_prefix, device=keep.device)).flatten()] = torch.arange(
            batch * n_prefix, device=keep.device)
        rank = keep.cumsum(1) - 1  # position of each chosen row among its image's chosen rows
        order[(starts[:, None] + n_prefix + rank)[keep]] = batch * n_prefix + keep.flatten().nonzero().squeeze(1)
        return cls(order, packing, n_prefix)

    @property
    def patch_tokens(self) -> torch.Tensor:
        """``(B,)`` table rows (patch tokens) per image."""
        return self.packing.lengths - self.n_prefix

    def gather(self, prefix: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``prefix (B, n_prefix, dim)`` and ``table (B, N_table, dim)`` -> the packed ``(T, dim)`` tokens."""
        dim = table.shape[-1]
        return torch.cat([prefix.reshape(-1, dim), table.reshape(-1, dim)]).index_select(0, self.order)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenPlan:
        """This plan on ``device``, its packing moved as :meth:`Packing.to` moves it (no device sync)."""
        device = torch.device(device)
        return TokenPlan(_to(self.order, device, non_blocking), self.packing.to(device, non_blocking), self.n_prefix)


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # PyTorch < 2.9
    varlen_attn = None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``auto``: ``varlen`` on CUDA in bf16/fp16, ``jagged`` on CUDA otherwise, ``padded`` elsewhere
    (flex_attention has no CPU backward)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}; allowed: {list(BACKENDS)}")
    if backend == "auto":
        if device.type != "cuda":
            return "padded"
        return "varlen" if dtype in (torch.float16, torch.bfloat16) and varlen_attn is not None else "jagged"
    return backend


_compiled_flex = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type != "cuda":  # eager reference implementation (forward only on CPU)
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, backend: str = "auto",
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Per-image softmax attention over packed ``(T, heads, head_dim)`` q, k, v; returns ``(T, heads, head_dim)``."""
    backend = resolve_backend(backend, q.device, q.dtype)
    if len(packing.lengths) == 1:  # one sequence: plain SDPA, nothing to mask (the exported graph's path)
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), dropout_p=dropout_p)
        return out[0].transpose(0, 1)
    if backend == "varlen":
        if varlen_attn is None or q.device.type != "cuda" or dropout_p:
            raise ValueError("attention=varlen needs PyTorch >= 2.9, a CUDA device and no attention dropout")
        cu, longest = packing.cu_seqlens, packing.max_length
        return varlen_attn(q, k, v, cu, cu, longest, longest)
    if backend == "jagged":
        offsets, longest, shortest = packing.offsets, packing.max_length, packing.min_length
        nested = [torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=shortest, max_seqlen=longest)
                  .transpose(1, 2) for t in (q, k, v)]
        if q.device.type == "cuda":
            out = F.scaled_dot_product_attention(*nested, dropout_p=dropout_p)
        else:  # the CPU has only the math kernel (and CUDA builds without a driver fail probing the others)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(*nested, dropout_p=dropout_p)
        return out.transpose(1, 2).values()
    if backend == "flex":
        if dropout_p:
            raise ValueError("the flex attention path has no attention dropout; use attention=jagged or padded")
        out = _flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), packing.flex_block_mask)
        return out[0].transpose(0, 1)
    padded = [packing.pad(t).transpose(1, 2) for t in (q, k, v)]  # (B, heads, L, head_dim)
    out = F.scaled_dot_product_attention(*padded, attn_mask=packing.key_mask, dropout_p=dropout_p)
    return packing.unpad(out.transpose(1, 2))
