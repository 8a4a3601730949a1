"""Options of the streaming loader: one frozen dataclass, nested by the training config tree.

Every field has a one-line docstring with its unit. YAML is turned into it by the one strict loader,
``pipeline.strict_config.build`` (unknown keys fail with a did-you-mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.storage import CREDENTIALS_FIX, StorageOptions, has_credentials, redact_url

LR_STRATA_A = (5.0, 6.2, 7.6, 9.4, 11.7, 14.4, 17.9, 22.1, 27.3, 33.8, 41.8, 51.7, 64.0)
"""Default long-range strata boundaries, Å: log-spaced from the radius cutoff to 64 Å."""

MIX_MODES = ("samples", "atoms", "temperature")
OVERSIZE_POLICIES = ("raise", "skip", "crop")
BAD_SAMPLE_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class DomainConfig:
    """One domain of the mix."""

    name: str
    """Domain name as written by the converter (protein, small_molecule, metabolite, rna, or your own)."""
    weight: float = 1.0
    """Relative mixing weight (normalised over domains); meaning set by ``DataConfig.mix_by``."""
    root: str | None = None
    """Shards root (folder, file://, http(s)://, s3://) holding this domain; None uses ``DataConfig.root``."""


@dataclass(frozen=True)
class DataConfig:
    """Streaming loader options (train / val / test)."""

    root: str = "data/demo/shards"
    """Shards root written by ``python -m shards_tools.convert`` (folder or URL) with manifest.json."""
    domains: tuple[DomainConfig, ...] = ()
    """Domains to mix with their weights; empty = every domain of the manifest in its natural proportion."""
    mix_by: str = "samples"
    """How weights are read: 'samples' (share of samples), 'atoms' (share of atoms) or 'temperature'."""
    temperature: float = 1.0
    """mix_by='temperature': sample share of domain d is proportional to weight_d * samples_d ** (1 / temperature)."""
    seed: int = 0
    """Base seed; every random stream derives from (seed, domain, pass, rank, worker) integers."""
    max_atoms: int | None = 25_000
    """Atom budget per batch, atoms; None only together with batch_size (fixed-size batches)."""
    max_graphs: int | None = None
    """Optional cap on molecules per batch, graphs."""
    max_edges: int | None = None
    """Optional cap on directed radius edges per batch (+ 2 per held-out short-range pair), edges: batches are packed
    by the stored pair counts; masked atoms' pairs rebuilt on noised positions that would pass it drop, farthest first."""
    batch_size: int | None = None
    """Fixed-size mode: exactly this many molecules per batch, ignoring max_atoms (the seed's batch_size=32)."""
    cross_domain_batches: bool = True
    """False: every batch holds one domain only (the seed's enable_cross_modal_batches=False)."""
    oversize_policy: str = "raise"
    """A sample over max_atoms or max_edges: 'raise', 'skip' or 'crop' (spatial ball around a random atom, also in
    val/test); counted."""
    bad_sample_policy: str = "raise"
    """A block or sample that fails to decode or validate (pipeline.read.decode_members): 'raise' or 'skip' (counted once per
    sample per domain as 'bad')."""
    verify_crc32: bool = True
    """Check every block member against the index's crc32; a mismatch makes the block's samples bad."""
    pool_budget_multiple: float = 3.0
    """Packing pool holds at least this many batch budgets of atoms before a batch is chosen, budgets."""
    fifo_fraction: float = 0.5
    """Share of each budget filled first with the oldest pooled samples in arrival order (bounds waiting); rest best fit."""
    pool_max_samples: int = 8192
    """Upper bound on samples held in the packing pool, samples."""
    shuffle_buffer_bytes: int = 16 * 2**20
    """Per-domain, per-worker shuffle buffer bound, bytes of decoded sample arrays; a buffer starts at 1/32 of it
    and doubles at every draw (webdataset's ``initial``), so the first batch does not wait for a full buffer."""
    read_block_bytes: int = 4 * 2**20
    """Shards are split into blocks of about this size for planning and reading, bytes."""
    train_batches_per_epoch: int | None = None
    """Training batches per epoch on every rank; None = one pass of all training atoms over the world's budget."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 streams in the main process."""
    worker_start_method: str | None = None
    """DataLoader worker start method ('fork', 'forkserver', 'spawn'); None = the process default (spawn is slow to start)."""
    prefetch_factor: int = 4
    """Batches prefetched per worker, batches."""
    radius_A: float = 5.0
    """Radius-graph cutoff, Å; must not exceed the converter's --radius."""
    max_neighbors: int = 64
    """Radius neighbours kept per atom, neighbours; must not exceed the converter's --max-neighbors."""
    mask_fraction: float = 0.15
    """Fraction of each molecule's atoms masked for element prediction (at least one per molecule of >= 2 atoms)."""
    mask_noise_A: float = 1.0
    """Uniform noise on masked atoms' coordinates, ±Å per axis, applied before any input distance (0 = none)."""
    mask_random_fraction: float = 0.0
    """Share of masked atoms shown as a random element of the batch instead of the mask token (BERT: 0.1)."""
    mask_keep_fraction: float = 0.0
    """Share of masked atoms shown as their own element (BERT: 0.1); still noised, still targets."""
    sr_fraction: float = 0.1
    """Fraction of radius pairs between unmasked atoms held out of every input graph for short-range prediction."""
    lr_pairs_per_atom: float = 0.5
    """Same-molecule non-edge pairs per atom for long-range distance prediction, pairs/atom."""
    lr_strata_A: tuple[float, ...] = LR_STRATA_A
    """Distance strata boundaries of the long-range pair sampling, Å (each stratum a molecule has is drawn about equally)."""
    pad_eval_batches: bool = True
    """Val/test: pad ranks that have fewer planned batches with empty batches (num_graphs == 0) so all ranks step equally."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """Remote reads (endpoint_url, timeouts, retries, cache_dir, ...; pipeline.storage.StorageOptions), used by the main
    process and every DataLoader worker; credentials never go here (environment / AWS chain only)."""

    def __post_init__(self) -> None:
        doms = tuple(d if isinstance(d, DomainConfig) else DomainConfig(**d) for d in self.domains)
        object.__setattr__(self, "domains", doms)
        if isinstance(self.storage, dict):
            object.__setattr__(self, "storage", StorageOptions(**self.storage))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the fix."""
        if self.mix_by not in MIX_MODES:
            raise ValueError(f"data.mix_by={self.mix_by!r}: use one of {MIX_MODES}")
        if self.oversize_policy not in OVERSIZE_POLICIES:
            raise ValueError(f"data.oversize_policy={self.oversize_policy!r}: use one of {OVERSIZE_POLICIES}")
        if self.bad_sample_policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"data.bad_sample_policy={self.bad_sample_policy!r}: use one of {BAD_SAMPLE_POLICIES}")
        if self.batch_size is None and (self.max_atoms is None or self.max_atoms < 1):
            raise ValueError(f"data.max_atoms={self.max_atoms!r}: set a positive atom budget, or set data.batch_size")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size!r}: must be >= 1 (or null for atom-budget batches)")
        for name in ("max_graphs", "max_edges", "train_batches_per_epoch"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"data.{name}={v!r}: must be >= 1 or null")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"data.temperature={self.temperature!r}: must be a positive number")
        if self.pool_budget_multiple < 1:
            raise ValueError(f"data.pool_budget_multiple={self.pool_budget_multiple!r}: must be >= 1")
        if not 0 <= self.fifo_fraction <= 1:
            raise ValueError(f"data.fifo_fraction={self.fifo_fraction!r}: must be in [0, 1]")
        if self.worker_start_method not in (None, "fork", "forkserver", "spawn"):
            raise ValueError(
                f"data.worker_start_method={self.worker_start_method!r}: use 'fork', 'forkserver', 'spawn' or null"
            )
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers!r}: must be >= 0")
        for f_ in ("mask_fraction", "sr_fraction", "mask_random_fraction", "mask_keep_fraction"):
            v = getattr(self, f_)
            if not 0 <= v < 1:
                raise ValueError(f"data.{f_}={v!r}: must be in [0, 1)")
        for where, root in (("data.root", self.root), *((f"data.domains[{d.name}].root", d.root) for d in self.domains)):
            if root is not None and has_credentials(root):  # refused here, before the config is saved anywhere
                raise ValueError(f"{where}={redact_url(root)!r} carries credentials (user:password@); {CREDENTIALS_FIX}")
        if self.mask_random_fraction + self.mask_keep_fraction > 1:
            raise ValueError(
                f"data.mask_random_fraction={self.mask_random_fraction} + data.mask_keep_fraction="
                f"{self.mask_keep_fraction} exceeds 1; the rest of the masked atoms show the mask token"
            )
        if not 0 <= self.mask_noise_A < self.radius_A:
            raise ValueError(f"data.mask_noise_A={self.mask_noise_A!r}: must be in [0, radius_A={self.radius_A}) Å")
        st = tuple(self.lr_strata_A)
        if any(b <= a for a, b in zip(st, st[1:], strict=False)) or any(x <= 0 for x in st):
            raise ValueError(f"data.lr_strata_A={list(st)!r}: boundaries must be positive and strictly increasing")
        seen = set()
        for d in self.domains:
            if d.name in seen:
                raise ValueError(f"data.domains lists {d.name!r} twice; list each domain once")
            seen.add(d.name)
            if not (d.weight >= 0 and math.isfinite(d.weight)):
                raise ValueError(f"data.domains[{d.name}].weight={d.weight!r}: must be a finite number >= 0")
        if self.domains and not any(d.weight > 0 for d in self.domains):
            raise ValueError("data.domains: every weight is 0; give at least one domain a positive weight")
