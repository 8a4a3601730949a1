"""ESA backbone in node mode: a string of blocks such as ``M S M S M S P``.

Every block is pre-LN: ``x + attn(LN(x))`` then ``x + MLP(LN(x))``. ``M`` and ``S`` blocks update
the atoms; a final ``P`` block pools each molecule with learned seeds into one graph embedding.
Without a ``P`` block, the graph embedding is the mean of the node embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.attention import Attention, AttentionLayout
from model.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AtomBlock(nn.Module):
    """An ``M`` (neighbours + self) or ``S`` (whole molecule) self-attention block over atoms."""

    def __init__(self, kind: str, in_dim: int, dim: int, heads: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = kind
        self.proj_in = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        # M with distance_bias: per-head logit bias of each edge from its Gaussian distance features
        self.edge_bias = nn.Linear(cfg.num_gaussians, heads) if kind == "M" and cfg.distance_bias else None
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, cfg.attn_dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_hidden, cfg.dropout)

    def forward(self, x: Tensor, layout: AttentionLayout, backend: str, edge_feats: Tensor | None) -> Tensor:
        x = self.proj_in(x)  # [N, D]
        bias = self.edge_bias(edge_feats) if self.edge_bias is not None else None  # [E, H]
        x = x + self.drop(self.attn(self.norm_attn(x), self.kind, layout, backend, bias))
        return x + self.mlp(self.norm_mlp(x))


class PoolingBlock(nn.Module):
    """``P``: pooling by multi-head attention; learned seeds attend to a molecule's atoms -> [G, D]."""

    def __init__(self, in_dim: int, dim: int, heads: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.seeds = nn.Parameter(torch.randn(cfg.num_seeds, dim) * dim**-0.5)
        self.norm_seeds = nn.LayerNorm(dim)
        self.norm_atoms = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, cfg.attn_dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, cfg.mlp_hidden, cfg.dropout)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: Tensor, layout: AttentionLayout, backend: str) -> Tensor:
        x = self.norm_atoms(self.proj_in(x))  # [N, D]
        s = self.seeds.to(x.dtype)  # [S, D]
        y = s + self.drop(self.attn.pool(self.norm_seeds(s), x, layout, backend))  # [G, S, D]
        y = y + self.mlp(self.norm_mlp(y))  # [G, S, D]
        return self.norm_out(y).mean(dim=1)  # [G, D]


class ESA(nn.Module):
    """The backbone: atom blocks, a final norm, and pooling. Returns ``(node [N, D], graph [G, Dg])``.

    ``edge_feats`` [E, K]: the encoder's Gaussian features of every edge, read by M blocks with a distance bias
    (``None`` when ``model.distance_bias`` is off: the encoder then never materialises them).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        letters, dims, heads = cfg.layer_letters, cfg.block_dims, cfg.block_heads
        self.blocks = nn.ModuleList()
        in_dim = dims[0]
        for kind, dim, h in zip(letters, dims, heads, strict=True):
            if kind == "P":
                continue
            self.blocks.append(AtomBlock(kind, in_dim, dim, h, cfg))
            in_dim = dim
        self.node_dim = in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.pool = PoolingBlock(in_dim, dims[-1], heads[-1], cfg) if letters[-1] == "P" else None
        self.graph_dim = dims[-1] if self.pool is not None else in_dim

    def forward(self, x: Tensor, layout: AttentionLayout, backend: str, edge_feats: Tensor | None) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            x = block(x, layout, backend, edge_feats)  # [N, D]
        node = self.norm(x)  # [N, D]
        if self.pool is not None:
            graph = self.pool(node, layout, backend)  # [G, Dg]
        else:
            sums = node.new_zeros(layout.num_graphs, node.shape[1]).index_add_(0, layout.batch, node)
            graph = sums / layout.counts.clamp(min=1).unsqueeze(1).to(node.dtype)  # [G, D]
        return node, graph
