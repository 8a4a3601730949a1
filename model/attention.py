"""Multi-head attention over packed atoms, with interchangeable backends.

Three kinds of attention, all over a batch of ``N`` atoms packed back to back (``ptr`` delimits
the ``G`` molecules):

- ``M``: each atom attends to its graph neighbours (``edge_index``) and itself;
- ``S``: each atom attends to every atom of its own molecule;
- ``P``: ``k`` learned seeds attend to every atom of a molecule (pooling): output [G, k, D].

Backends (all take and return packed tensors; masks are never dropped):

- ``dense``: the reference. Pads every molecule to the longest one and applies explicit boolean
  masks with plain ``softmax(QKᵀ/√d)·V``; small and obviously correct, quadratic in the longest
  molecule times the number of molecules. Tests compare every other backend to it.
- ``sparse``: ``M`` is edge-wise (scores on the neighbour list, segment softmax, scatter-add) in one
  fused autograd function that keeps only [E, H] probabilities and [N, H, d] tensors for backward
  and works through the edges in cache-sized chunks: O(E·H + N·D) memory, never O(E·D) or O(N²).
  ``S`` and ``P`` group molecules of similar length into buckets (lengths
  within a factor 1.25) and call PyTorch SDPA on each bucket with a key-padding mask: padding waste
  is bounded and no cross-molecule score is ever computed.
- ``flash``: flash-attn's varlen kernel for ``S`` and ``P`` (packed atoms, ``cu_seqlens``, no
  padding; CUDA and fp16/bf16 only) and the edge-wise kernel for ``M`` (flash-attn has no
  arbitrary masks, and dropping the ``M`` mask is not an option).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

BUCKET_RATIO = 1.25
"""Molecules whose lengths are within this factor share an SDPA call in the sparse backend."""


@functools.cache
def _flash_varlen():
    """flash-attn's varlen function, imported once; ``None`` (with one log line naming the reason) when the
    package is absent or broken (an ABI-mismatched build raises ImportError/OSError/AttributeError on import)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ModuleNotFoundError as err:
        if err.name == "flash_attn":  # not installed: the normal case off GPU machines, nothing to say
            return None
        log.warning("flash-attn is installed but unusable (%s: %s); using the SDPA path", type(err).__name__, err)
        return None
    except (ImportError, OSError, AttributeError, RuntimeError) as err:
        log.warning("flash-attn is installed but unusable (%s: %s); using the SDPA path", type(err).__name__, err)
        return None
    if not callable(flash_attn_varlen_func):
        log.warning("flash-attn's flash_attn_varlen_func is %r, not a function; using the SDPA path", flash_attn_varlen_func)
        return None
    return flash_attn_varlen_func


def flash_attn_available() -> bool:
    """True when flash-attn and its varlen kernel import (decided once per process)."""
    return _flash_varlen() is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend and check that the asked-for one can run here."""
    if name == "auto":
        return "flash" if device.type == "cuda" and flash_attn_available() else "sparse"
    if name == "flash":
        if device.type != "cuda":
            raise ValueError(f"model.backend='flash' needs a CUDA device, the model is on {device}; use 'auto' or 'sparse'")
        if not flash_attn_available():
            raise ValueError("model.backend='flash' needs flash-attn: `pip install .[gpu]`, or use 'auto' or 'sparse'")
    return name


@dataclass
class Bucket:
    """Molecules padded together to length ``length`` for one SDPA call."""

    graphs: Tensor  # long [b]: graph ids
    index: Tensor  # long [b, L]: packed atom index, N (a zero row) at padding
    gather: Tensor  # long [b, L]: packed atom index, the molecule's first atom at padding
    valid: Tensor  # bool [b, L]
    length: int


@dataclass
class AttentionLayout:
    """Everything the attention kernels need about one batch, computed once and shared by all blocks."""

    num_atoms: int
    num_graphs: int
    ptr: Tensor  # long [G+1]
    batch: Tensor  # long [N]
    counts: Tensor  # long [G]
    max_count: int
    nbr_src: Tensor  # long [E+N]: key atom of each (neighbour or self) pair
    nbr_dst: Tensor  # long [E+N]: query atom
    local: Tensor  # long [N]: position of each atom inside its molecule
    buckets: list[Bucket]
    cu_seqlens: Tensor  # int32 [G+1]

    @staticmethod
    def build(ptr: Tensor, batch: Tensor, edge_index: Tensor) -> AttentionLayout:
        n = int(batch.shape[0])
        g = int(ptr.shape[0]) - 1
        counts = ptr[1:] - ptr[:-1]
        if n and (edge_index.numel() and bool((batch[edge_index[0]] != batch[edge_index[1]]).any())):
            raise ValueError("batch.edge_index links atoms of different molecules; the radius graph must stay within one")
        self_loop = torch.arange(n, device=batch.device)
        edge_index = edge_index[:, edge_index[0] != edge_index[1]]  # self is added exactly once below
        nbr_src = torch.cat([edge_index[0], self_loop])
        nbr_dst = torch.cat([edge_index[1], self_loop])
        local = self_loop - ptr[batch] if n else self_loop
        counts_list = counts.tolist()
        return AttentionLayout(
            num_atoms=n,
            num_graphs=g,
            ptr=ptr,
            batch=batch,
            counts=counts,
            max_count=max(counts_list, default=0),
            nbr_src=nbr_src,
            nbr_dst=nbr_dst,
            local=local,
            buckets=_make_buckets(counts_list, ptr, n),
            cu_seqlens=ptr.to(torch.int32),
        )


def _make_buckets(counts: list[int], ptr: Tensor, n: int) -> list[Bucket]:
    dev = ptr.device
    order = sorted((c, i) for i, c in enumerate(counts) if c > 0)
    groups: list[list[int]] = []
    start_len = None
    for c, i in order:
        if start_len is None or c > start_len * BUCKET_RATIO:
            groups.append([])
            start_len = c
        groups[-1].append(i)
    buckets = []
    for grp in groups:
        gid = torch.tensor(grp, device=dev, dtype=torch.long)
        length = max(counts[i] for i in grp)
        ar = torch.arange(length, device=dev)  # [L]
        cnt = (ptr[gid + 1] - ptr[gid]).unsqueeze(1)  # [b, 1]
        valid = ar.unsqueeze(0) < cnt  # [b, L]
        index = torch.where(valid, ptr[gid].unsqueeze(1) + ar, torch.full_like(valid, n, dtype=torch.long))
        gather = torch.where(valid, index, ptr[gid].unsqueeze(1))
        buckets.append(Bucket(graphs=gid, index=index, gather=gather, valid=valid, length=length))
    return buckets


# ---------------------------------------------------------------------------------------------
# dense reference


def _to_padded(x: Tensor, layout: AttentionLayout) -> Tensor:
    """[N, H, d] -> [G, H, Lmax, d] (zeros at padding)."""
    out = x.new_zeros(layout.num_graphs, layout.max_count, *x.shape[1:])  # [G, L, H, d]
    out[layout.batch, layout.local] = x
    return out.transpose(1, 2)  # [G, H, L, d]


def _dense_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float, bias: Tensor | None = None
) -> Tensor:
    """Explicit ``softmax(QKᵀ/√d + bias + mask)·V``; q [B, H, Lq, d], k/v [B, H, Lk, d], mask bool [B, 1|H, Lq, Lk],
    optional additive bias [B, H, Lq, Lk]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    probs = F.dropout(probs, dropout_p)
    return probs @ v  # [B, H, Lq, d]


def dense_atoms(
    q: Tensor, k: Tensor, v: Tensor, kind: str, layout: AttentionLayout, dropout_p: float, nbr_bias: Tensor | None = None
) -> Tensor:
    """``nbr_bias`` [E+N, H] (M only): additive logit of each (neighbour or self) pair of the layout."""
    g, lmax = layout.num_graphs, layout.max_count
    dev = q.device
    ar = torch.arange(lmax, device=dev)
    valid = ar.unsqueeze(0) < layout.counts.unsqueeze(1)  # [G, L]
    if kind == "S":
        mask = valid.unsqueeze(1).expand(g, lmax, lmax).clone()  # [G, Lq, Lk]: every key of the molecule
    else:  # M
        mask = torch.zeros(g, lmax, lmax, dtype=torch.bool, device=dev)
        gid = layout.batch[layout.nbr_dst]
        mask[gid, layout.local[layout.nbr_dst], layout.local[layout.nbr_src]] = True
    bias = None
    if kind == "M" and nbr_bias is not None:
        bias = q.new_zeros(g, lmax, lmax, q.shape[1])  # [G, Lq, Lk, H]
        bias[gid, layout.local[layout.nbr_dst], layout.local[layout.nbr_src]] = nbr_bias.to(q.dtype)
        bias = bias.permute(0, 3, 1, 2)  # [G, H, Lq, Lk]
    mask |= torch.eye(lmax, dtype=torch.bool, device=dev).unsqueeze(0) & ~valid.unsqueeze(2)  # padded queries: self
    out = _dense_attention(
        _to_padded(q, layout), _to_padded(k, layout), _to_padded(v, layout), mask.unsqueeze(1), dropout_p, bias
    )  # [G, H, L, d]
    return out.transpose(1, 2)[layout.batch, layout.local]  # [N, H, d]


def dense_pool(seeds: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
    """seeds [S, H, d] attend to the atoms of each molecule -> [G, S, H, d]."""
    g, lmax = layout.num_graphs, layout.max_count
    valid = torch.arange(lmax, device=k.device).unsqueeze(0) < layout.counts.unsqueeze(1)  # [G, L]
    q = seeds.transpose(0, 1).unsqueeze(0).expand(g, -1, -1, -1)  # [G, H, S, d]
    mask = valid[:, None, None, :]  # [G, 1, 1, L]
    out = _dense_attention(q, _to_padded(k, layout), _to_padded(v, layout), mask, dropout_p)  # [G, H, S, d]
    return out.transpose(1, 2)  # [G, S, H, d]


# ---------------------------------------------------------------------------------------------
# sparse: edge-wise M, length-bucketed SDPA for S and P


EDGE_CHUNK_ELEMENTS = 1 << 20
"""Edge rows per chunk of the M kernel are chosen so one [chunk, H, d] gathered tensor holds about this
many elements (4 MiB in fp32): the gathers stay in cache and no [E, D] tensor is ever materialised."""


def _edge_chunks(num_edges: int, features: int) -> list[tuple[int, int]]:
    step = max(1, EDGE_CHUNK_ELEMENTS // max(1, features))
    return [(a, min(a + step, num_edges)) for a in range(0, num_edges, step)]


class _EdgeAttention(torch.autograd.Function):
    """Fused neighbour attention: scores on the pair list, segment softmax per query, probabilities × V.

    Saves only q, k, v (inputs, [N, H, d]), the output [N, H, d] (fp32) and the probabilities [E, H]
    (fp32); every [E, H, d] gather is recomputed chunk by chunk in backward. Accumulation is fp32
    whatever the input dtype (bf16 under autocast), and the result is cast once at the end.
    Backward uses ``Δ_i = Σ_j p_ij dp_ij = dout_i · out_i`` (also true with dropout), so one pass over
    the edges gives dq, dk, dv and the bias gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, src, dst, bias, dropout_p):
        with torch.autocast(q.device.type, enabled=False):
            return _EdgeAttention._forward(ctx, q, k, v, src, dst, bias, dropout_p)

    @staticmethod
    def _forward(ctx, q, k, v, src, dst, bias, dropout_p):
        n, h, d = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32; fp64 stays fp64
        scale = 1.0 / math.sqrt(d)
        e_total = src.shape[0]
        chunks = _edge_chunks(e_total, h * d)
        scores = torch.empty(e_total, h, device=q.device, dtype=acc)  # [E, H]
        for a, b in chunks:
            s, t = src[a:b], dst[a:b]
            scores[a:b] = torch.einsum("ehd,ehd->eh", q[t].to(acc), k[s].to(acc))
        scores.mul_(scale)
        if bias is not None:
            scores.add_(bias.to(acc))
        smax = torch.full((n, h), float("-inf"), device=q.device, dtype=acc).scatter_reduce_(
            0, dst.unsqueeze(1).expand(-1, h), scores, reduce="amax", include_self=True
        )  # [N, H]; the shift cancels in the softmax
        probs = scores.sub_(smax[dst]).exp_()  # [E, H], in place of the scores
        denom = torch.zeros(n, h, device=q.device, dtype=acc).index_add_(0, dst, probs)  # [N, H]
        probs.div_(denom[dst])
        keep = None
        weights = probs
        if dropout_p > 0.0:
            keep = torch.rand(probs.shape, device=q.device, dtype=acc) >= dropout_p  # [E, H]
            weights = probs * keep / (1.0 - dropout_p)
        out = torch.zeros(n, h, d, device=q.device, dtype=acc)  # [N, H, d]
        for a, b in chunks:
            out.index_add_(0, dst[a:b], weights[a:b].unsqueeze(-1) * v[src[a:b]].to(acc))
        ctx.save_for_backward(q, k, v, src, dst, probs, out, keep)
        ctx.dropout_p = dropout_p
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _EdgeAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, src, dst, probs, out, keep = ctx.saved_tensors
        n, h, d = q.shape
        acc = probs.dtype
        scale = 1.0 / math.sqrt(d)
        go_all = grad_out.to(acc)  # [N, H, d]
        delta = (go_all * out).sum(-1)  # [N, H]: Σ_j p_ij dp_ij
        dq = torch.zeros(n, h, d, device=q.device, dtype=acc)
        dk = torch.zeros_like(dq)
        dv = torch.zeros_like(dq)
        dscores = torch.empty_like(probs) if ctx.has_bias else None  # [E, H]
        inv_keep = 1.0 / (1.0 - ctx.dropout_p)
        for a, b in _edge_chunks(src.shape[0], h * d):
            s, t = src[a:b], dst[a:b]
            go = go_all[t]  # [C, H, d]
            vs = v[s].to(acc)
            p = probs[a:b]  # [C, H]
            dp = torch.einsum("ehd,ehd->eh", go, vs)  # [C, H]
            w = p
            if keep is not None:
                mk = keep[a:b].to(acc) * inv_keep  # [C, H]
                w = p * mk
                dp = dp * mk
            dv.index_add_(0, s, w.unsqueeze(-1) * go)
            ds = p * (dp - delta[t])  # [C, H]
            if dscores is not None:
                dscores[a:b] = ds
            ds = (ds * scale).unsqueeze(-1)
            dq.index_add_(0, t, ds * k[s].to(acc))
            dk.index_add_(0, s, ds * q[t].to(acc))
        dbias = dscores.to(ctx.bias_dtype) if dscores is not None else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, dbias, None


def edge_attention(
    q: Tensor, k: Tensor, v: Tensor, src: Tensor, dst: Tensor, dropout_p: float, bias: Tensor | None = None
) -> Tensor:
    """Attention of each query atom ``dst`` over its listed keys ``src``; q/k/v [N, H, d] -> [N, H, d];
    optional additive logit ``bias`` [E, H] per listed pair. Memory O(E·H + N·D): see :class:`_EdgeAttention`."""
    return _EdgeAttention.apply(q, k, v, src, dst, bias, float(dropout_p))


def _gather_bucket(x: Tensor, b: Bucket) -> Tensor:
    """[N, H, d] -> [b, H, L, d]: one gather of the bucket's rows (no copy of the whole input), made contiguous
    in SDPA's layout (strided heads cost the CPU kernel 1.5×: 14.2 vs 9.5 s forward + backward for one
    13,434-atom molecule at 16 heads). Padding rows repeat a real atom; they are masked as keys and their query
    outputs are dropped."""
    return x[b.gather].transpose(1, 2).contiguous()  # [b, H, L, d]


def bucketed_atoms(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
    out = torch.zeros_like(q)  # [N, H, d]
    for b in layout.buckets:
        # single-length bucket needs no mask, which lets SDPA pick its fused kernel
        mask = None if bool(b.valid.all()) else b.valid[:, None, None, :]  # [b, 1, 1, L]
        o = F.scaled_dot_product_attention(
            _gather_bucket(q, b), _gather_bucket(k, b), _gather_bucket(v, b), attn_mask=mask, dropout_p=dropout_p
        )  # [b, H, L, d]
        out[b.index[b.valid]] = o.transpose(1, 2)[b.valid]
    return out


def bucketed_pool(seeds: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
    s, h, d = seeds.shape
    out = seeds.new_zeros(layout.num_graphs, s, h, d)  # [G, S, H, d]
    for b in layout.buckets:
        mask = None if bool(b.valid.all()) else b.valid[:, None, None, :]
        q = seeds.transpose(0, 1).unsqueeze(0).expand(b.graphs.shape[0], -1, -1, -1)  # [b, H, S, d]
        o = F.scaled_dot_product_attention(
            q, _gather_bucket(k, b), _gather_bucket(v, b), attn_mask=mask, dropout_p=dropout_p
        )  # [b, H, S, d]
        out[b.graphs] = o.transpose(1, 2)
    return out


# ---------------------------------------------------------------------------------------------
# flash-attn varlen (CUDA)


def _flash(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, p: float) -> Tensor:
    flash_attn_varlen_func = _flash_varlen()
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = flash_attn_varlen_func(
        q.to(dt), k.to(dt), v.to(dt), cu_q, cu_k, max_q, max_k, dropout_p=p, softmax_scale=1.0 / math.sqrt(q.shape[-1])
    )
    return out.to(q.dtype)


def flash_atoms(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
    cu, m = layout.cu_seqlens, layout.max_count
    return _flash(q, k, v, cu, cu, m, m, dropout_p)  # [N, H, d]


def flash_pool(seeds: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
    s, h, d = seeds.shape
    g = layout.num_graphs
    q = seeds.unsqueeze(0).expand(g, -1, -1, -1).reshape(g * s, h, d)  # [G*S, H, d]
    cu_q = torch.arange(g + 1, device=k.device, dtype=torch.int32) * s
    out = _flash(q, k, v, cu_q, layout.cu_seqlens, s, layout.max_count, dropout_p)  # [G*S, H, d]
    return out.view(g, s, h, d)


# ---------------------------------------------------------------------------------------------


def attend_atoms(
    q: Tensor, k: Tensor, v: Tensor, kind: str, layout: AttentionLayout, backend: str, p: float,
    edge_bias: Tensor | None = None,
) -> Tensor:
    """M or S attention of packed atoms; q/k/v [N, H, d] -> [N, H, d]. ``edge_bias`` [E, H] (M only): additive
    logit per column of the batch's ``edge_index`` (self pairs get 0)."""
    if layout.num_atoms == 0:
        return torch.zeros_like(q)
    nbr_bias = None
    if kind == "M" and edge_bias is not None:
        if edge_bias.shape[0] + layout.num_atoms != layout.nbr_src.shape[0]:
            raise ValueError(
                f"edge_bias has {edge_bias.shape[0]} rows but the layout has {layout.nbr_src.shape[0] - layout.num_atoms} "
                "edges; give one row per edge_index column (edge_index must hold no self loops)"
            )
        nbr_bias = torch.cat([edge_bias, edge_bias.new_zeros(layout.num_atoms, edge_bias.shape[1])])  # [E+N, H]
    if backend == "dense":
        return dense_atoms(q, k, v, kind, layout, p, nbr_bias)
    if kind == "M":
        return edge_attention(q, k, v, layout.nbr_src, layout.nbr_dst, p, nbr_bias)
    if backend == "flash":
        return flash_atoms(q, k, v, layout, p)
    return bucketed_atoms(q, k, v, layout, p)


def attend_pool(seeds: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, backend: str, p: float) -> Tensor:
    """Seeds [S, H, d] attend to each molecule's atoms (k/v [N, H, d]) -> [G, S, H, d]."""
    if layout.num_graphs == 0:
        return seeds.new_zeros(0, *seeds.shape)
    if backend == "dense":
        return dense_pool(seeds, k, v, layout, p)
    if backend == "flash":
        return flash_pool(seeds, k, v, layout, p)
    return bucketed_pool(seeds, k, v, layout, p)


class Attention(nn.Module):
    """Multi-head attention with separate Q, K, V projections (V is projected from the input, never
    from K) and an output projection."""

    def __init__(self, dim: int, num_heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)  # [..., D] -> [..., H, d]

    def forward(
        self, x: Tensor, kind: str, layout: AttentionLayout, backend: str, edge_bias: Tensor | None = None
    ) -> Tensor:
        """Self-attention of packed atoms x [N, D] -> [N, D]; ``edge_bias`` [E, H]: optional additive logit per
        edge (M only)."""
        p = self.attn_dropout if self.training else 0.0
        o = attend_atoms(
            self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x)), kind, layout, backend, p, edge_bias
        )  # [N, H, d]
        return self.out(o.reshape(x.shape[0], self.num_heads * self.head_dim))  # [N, D] (N may be 0: an empty padding batch)

    def pool(self, seeds: Tensor, x: Tensor, layout: AttentionLayout, backend: str) -> Tensor:
        """Seeds [S, D] attend to each molecule of x [N, D] -> [G, S, D]."""
        p = self.attn_dropout if self.training else 0.0
        o = attend_pool(self._heads(self.q(seeds)), self._heads(self.k(x)), self._heads(self.v(x)), layout, backend, p)
        return self.out(o.reshape(*o.shape[:2], self.num_heads * self.head_dim))  # [G, S, H, d] -> [G, S, D]
