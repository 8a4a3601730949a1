"""Atom encoder: element and period embeddings, a Gaussian basis over neighbour distances, and
SE(3)-invariant per-atom geometry.

The encoder reads only the batch's input fields (:data:`pipeline.collate.INPUT_FIELDS`): the atom
types as the loader shows them (masked atoms already replaced by :data:`MASK_TOKEN`), the lengths of
the edges of ``edge_index`` on the input positions (masked atoms already noised, held-out pairs
already removed) and the degrees of ``bond_index`` (masked atoms' bonds already removed). No target
field reaches it. Everything it computes is a function of interatomic distances and graph degrees:
invariant to rotation, translation and atom permutation by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from pipeline.collate import MASK_TOKEN

NUM_ELEMENTS = 118
"""Atomic numbers 1..118 are valid elements."""
PAD_TOKEN = 0
"""Type index of padding (never produced for a real atom)."""
NUM_TYPES = MASK_TOKEN + 1
"""Size of the atom-type vocabulary: padding, 118 elements, mask."""
MASK_PERIOD = 8
"""Period index of a masked atom (real periods are 1..7, padding 0)."""

# first atomic number of periods 2..7; period(Z) = 1 + number of starts <= Z
_PERIOD_STARTS = torch.tensor([3, 11, 19, 37, 55, 87])

NUM_GEOMETRY_FEATURES = 5
"""bond count, close-neighbour count, cutoff-neighbour count, nearest distance, mean close distance."""


def period_of(z: Tensor) -> Tensor:
    """Row of the periodic table of each atomic number (1..7)."""
    return 1 + torch.bucketize(z, _PERIOD_STARTS.to(z.device), right=True)


def check_types(z: Tensor) -> None:
    """Raise ValueError when the input types hold anything but elements 1..118 and :data:`MASK_TOKEN`."""
    if z.numel() and (int(z.min()) < 1 or int(z.max()) > MASK_TOKEN):
        bad = z[(z < 1) | (z > MASK_TOKEN)][:5].tolist()
        raise ValueError(
            f"batch.z holds atom types {bad} outside 1..{NUM_ELEMENTS} (elements) and {MASK_TOKEN} (mask); "
            "the converter must drop or fix such atoms (dummy/unknown elements)"
        )


class GaussianLayer(nn.Module):
    """Graphormer-3D / Uni-Mol Gaussian basis: per pair-type affine ``mul·d + bias``, then K Gaussians
    with learned means and widths."""

    def __init__(self, num_gaussians: int, num_types: int, cutoff_A: float) -> None:
        super().__init__()
        self.num_types = num_types
        self.means = nn.Parameter(torch.linspace(0.0, cutoff_A, num_gaussians))
        self.stds = nn.Parameter(torch.full((num_gaussians,), 2.0 * cutoff_A / num_gaussians + 0.1))
        self.mul = nn.Embedding(num_types * num_types, 1)
        self.bias = nn.Embedding(num_types * num_types, 1)
        nn.init.ones_(self.mul.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, dist: Tensor, type_dst: Tensor, type_src: Tensor) -> Tensor:
        pair = type_dst * self.num_types + type_src  # [E]
        x = self.mul(pair) * dist.unsqueeze(-1) + self.bias(pair)  # [E, 1]
        std = self.stds.abs() + 1e-3
        return torch.exp(-0.5 * ((x - self.means) / std) ** 2) / (math.sqrt(2 * math.pi) * std)  # [E, K]


GAUSSIAN_CHUNK_ELEMENTS = 1 << 22
"""Edges × Gaussians evaluated at once when the basis is only summed per atom (4 M floats, 16 MB fp32)."""


def _chunk_gaussian_sum(
    layer: GaussianLayer, dist: Tensor, env: Tensor, type_dst: Tensor, type_src: Tensor, dst: Tensor, n: int
) -> Tensor:
    """Sum over one chunk of edges of their enveloped Gaussian features into their destination atoms, [N, K]."""
    g = layer(dist, type_dst, type_src) * env.unsqueeze(-1)  # [e, K]
    return torch.zeros(n, g.shape[1], device=g.device, dtype=g.dtype).index_add_(0, dst, g)


def gaussian_sum(
    layer: GaussianLayer, dist: Tensor, env: Tensor, type_dst: Tensor, type_src: Tensor, dst: Tensor, n: int,
    chunk_elements: int = GAUSSIAN_CHUNK_ELEMENTS,
) -> Tensor:
    """Per-atom sum [N, K] of the enveloped Gaussian features of its incoming edges without keeping [E, K]:
    edges go in chunks of ``chunk_elements // K``, each under activation checkpointing, so backward
    recomputes a chunk's basis instead of saving it (saved: O(E) inputs plus O(N·K) per chunk)."""
    k = layer.means.shape[0]
    step = max(1, chunk_elements // k)
    e = dist.shape[0]
    if e <= step:
        return _chunk_gaussian_sum(layer, dist, env, type_dst, type_src, dst, n)
    out = None
    for a in range(0, e, step):
        b = min(e, a + step)
        args = (layer, dist[a:b], env[a:b], type_dst[a:b], type_src[a:b], dst[a:b], n)
        part = checkpoint(_chunk_gaussian_sum, *args, use_reentrant=False) if torch.is_grad_enabled() else (
            _chunk_gaussian_sum(*args))
        out = part if out is None else out + part
    return out


def cosine_envelope(dist: Tensor, cutoff: float) -> Tensor:
    """Smooth weight 1 at d=0 falling to 0 at the cutoff (0 beyond)."""
    return torch.where(dist < cutoff, 0.5 * (torch.cos(dist * (math.pi / cutoff)) + 1.0), torch.zeros_like(dist))


def geometry_features(
    num_atoms: int, edge_index: Tensor, dist: Tensor, bond_index: Tensor, cutoff: float, close: float
) -> Tensor:
    """Invariant per-atom features [N, 5] from edge lengths and bond degrees (isolated atoms get
    the cutoff as their nearest and mean distance)."""
    dst = edge_index[1]
    dev, dt = dist.device, dist.dtype
    ones = torch.ones_like(dist)
    in_cut = dist <= cutoff
    in_close = dist <= close
    n_bond = torch.zeros(num_atoms, device=dev, dtype=dt).index_add_(
        0, bond_index[1], torch.ones(bond_index.shape[1], device=dev, dtype=dt)
    )
    n_cut = torch.zeros(num_atoms, device=dev, dtype=dt).index_add_(0, dst, ones * in_cut)
    n_close = torch.zeros(num_atoms, device=dev, dtype=dt).index_add_(0, dst, ones * in_close)
    nearest = torch.full((num_atoms,), cutoff, device=dev, dtype=dt).scatter_reduce(
        0, dst, torch.where(in_cut, dist, torch.full_like(dist, cutoff)), reduce="amin", include_self=True
    )
    close_sum = torch.zeros(num_atoms, device=dev, dtype=dt).index_add_(0, dst, dist * in_close)
    mean_close = torch.where(n_close > 0, close_sum / n_close.clamp(min=1), torch.full_like(close_sum, close))
    return torch.stack(
        [torch.log1p(n_bond), torch.log1p(n_close), torch.log1p(n_cut), nearest / close, mean_close / close], dim=-1
    )  # [N, 5]


@torch.no_grad()
def random_walk_pe(num_atoms: int, bond_index: Tensor, steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Return probabilities ``diag(P^k)``, k = 1..steps, of the random walk on the covalent-bond
    graph, [N, steps]; atoms without bonds get zeros. Sparse, so proteins stay cheap."""
    dev = bond_index.device
    src, dst = bond_index
    deg = torch.zeros(num_atoms, device=dev, dtype=dtype).index_add_(0, src, torch.ones(src.shape[0], device=dev, dtype=dtype))
    val = 1.0 / deg[src]
    p = torch.sparse_coo_tensor(
        torch.stack([src, dst]), val, (num_atoms, num_atoms), check_invariants=False
    ).coalesce()
    out = torch.zeros(num_atoms, steps, device=dev, dtype=dtype)
    m = p
    for k in range(steps):
        if k:
            m = torch.sparse.mm(m, p).coalesce()
        idx, v = m.indices(), m.values()
        on_diag = idx[0] == idx[1]
        out[idx[0][on_diag], k] = v[on_diag]
    return out


class AtomEncoder(nn.Module):
    """Initial atom embeddings [N, D] of a batch: element + period + geometry + Gaussian basis (+ RWPE)."""

    def __init__(self, cfg: ModelConfig, out_dim: int) -> None:
        super().__init__()
        self.cutoff = cfg.cutoff_A
        self.close = cfg.close_cutoff_A
        self.rwpe_steps = cfg.rwpe_steps
        self.type_embed = nn.Embedding(NUM_TYPES, out_dim, padding_idx=PAD_TOKEN)
        self.period_embed = nn.Embedding(MASK_PERIOD + 1, out_dim, padding_idx=0)
        self.gaussian = GaussianLayer(cfg.num_gaussians, NUM_TYPES, cfg.cutoff_A)
        self.gaussian_proj = nn.Sequential(
            nn.Linear(cfg.num_gaussians, cfg.num_gaussians), nn.GELU(), nn.Linear(cfg.num_gaussians, out_dim)
        )
        n_geo = NUM_GEOMETRY_FEATURES + cfg.rwpe_steps
        self.geometry_proj = nn.Sequential(nn.Linear(n_geo, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.keep_edge_features = cfg.distance_bias
        self.chunk_elements = GAUSSIAN_CHUNK_ELEMENTS

    def forward(self, z: Tensor, pos: Tensor, edge_index: Tensor, bond_index: Tensor) -> tuple[Tensor, Tensor | None]:
        """Atom embeddings [N, D] and, when the M blocks read a distance bias (``model.distance_bias``), the
        Gaussian features of every edge of ``edge_index`` [E, K]; otherwise ``None``, and the basis is
        summed per atom in checkpointed edge chunks, never held as [E, K] (the largest encoder tensor:
        0.5 GB at 25 000 atoms)."""
        n = z.shape[0]
        check_types(z)
        types = z  # [N]: the loader already replaced masked elements by MASK_TOKEN
        period = torch.where(z == MASK_TOKEN, torch.full_like(z, MASK_PERIOD), period_of(z))  # [N]
        src, dst = edge_index
        dist = (pos[dst] - pos[src]).norm(dim=-1)  # [E] Å
        feats = geometry_features(n, edge_index, dist, bond_index, self.cutoff, self.close)  # [N, 5]
        if self.rwpe_steps:
            feats = torch.cat([feats, random_walk_pe(n, bond_index, self.rwpe_steps, feats.dtype)], dim=-1)
        env = cosine_envelope(dist, self.cutoff)  # [E]
        if self.keep_edge_features:
            g = self.gaussian(dist, types[dst], types[src]) * env.unsqueeze(-1)  # [E, K]
            g_sum = torch.zeros(n, g.shape[1], device=g.device, dtype=g.dtype).index_add_(0, dst, g)  # [N, K]
        else:
            g = None
            g_sum = gaussian_sum(self.gaussian, dist, env, types[dst], types[src], dst, n, self.chunk_elements)
        env_sum = torch.zeros(n, device=dist.device, dtype=g_sum.dtype).index_add_(0, dst, env)  # [N]
        g_mean = g_sum / env_sum.clamp(min=1.0).unsqueeze(-1)  # [N, K]
        x = self.type_embed(types) + self.period_embed(period) + self.gaussian_proj(g_mean) + self.geometry_proj(feats)
        return x, g
