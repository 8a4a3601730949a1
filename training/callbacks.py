"""Callbacks of a training run: batch statistics, throughput, and the loss-curve plot."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class BatchStatistics(L.Callback):
    """Logs what the loader delivered: atoms/s (progress bar), atoms, graphs, fill, domain shares,
    oversize/bad counts, and the time the step waited for data.

    Per-batch figures come from the batch itself (``ptr``, ``domain``, ``num_graphs``) plus
    ``batch.stats`` when the loader attaches it, and the stream's cumulative per-domain counters
    (bad, oversize skipped/cropped, pass) from the datamodule; every ``every_n_steps`` steps they are logged.
    """

    def __init__(self, domains: list[str], max_atoms: int | None, every_n_steps: int = 10) -> None:
        self.domains = domains
        self.max_atoms = max_atoms
        self.every = every_n_steps
        self._t_end: float | None = None
        self._t_start = 0.0
        self._wait = 0.0
        self._atoms = 0
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t_end is not None:
            self._wait += now - self._t_end
        self._t_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._t_end = time.perf_counter()
        n_atoms = int(batch.ptr[-1]) if hasattr(batch, "ptr") else int(batch.num_nodes)
        self._atoms += n_atoms
        step = trainer.global_step
        if step % self.every != 0:
            return
        elapsed = max(self._t_end - self._t0, 1e-9)
        metrics = {
            "data/atoms_per_s": self._atoms / elapsed,
            "data/wait_fraction": self._wait / elapsed,
            "data/atoms": float(n_atoms),
            "data/graphs": float(batch.num_graphs),
        }
        if self.max_atoms:
            metrics["data/fill"] = n_atoms / self.max_atoms
        if batch.num_graphs:
            per_graph_atoms = (batch.ptr[1:] - batch.ptr[:-1]).float()
            by_domain = torch.zeros(len(self.domains)).index_add_(0, batch.domain.cpu(), per_graph_atoms.cpu())
            for i, d in enumerate(self.domains):
                metrics[f"data/atom_share/{d}"] = float(by_domain[i] / max(n_atoms, 1))
        stats = getattr(batch, "stats", None)
        if isinstance(stats, dict):
            for k, v in stats.items():
                if isinstance(v, int | float):
                    metrics[f"data/{k}"] = float(v)
                elif isinstance(v, dict):  # e.g. storage: requests, retries, bytes_fetched of this batch's reads
                    metrics.update({f"data/{k}/{kk}": float(vv) for kk, vv in v.items() if isinstance(vv, int | float)})
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "stats"):  # cumulative per-domain counters of the stream
            for name, counters in dm.stats().items():
                if name in self.domains:
                    for k in ("bad", "oversize_skipped", "oversize_cropped", "pass"):
                        metrics[f"data/{k}/{name}"] = float(counters.get(k, 0))
        pl_module.log("atoms_per_s", metrics.pop("data/atoms_per_s"), prog_bar=True, batch_size=1, rank_zero_only=True)
        pl_module.log_dict(metrics, batch_size=1, rank_zero_only=True)
        self._atoms, self._wait, self._t0 = 0, 0.0, self._t_end


class LossPlot(L.Callback):
    """At the end of fit, plot train/val loss from the CSV logger's metrics.csv to ``run_dir/loss.png``."""

    def __init__(self, metrics_csv: Path, out_png: Path) -> None:
        self.metrics_csv = metrics_csv
        self.out_png = out_png

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        for lg in trainer.loggers:
            lg.save()
        if not self.metrics_csv.exists():
            log.warning("no %s to plot the loss from", self.metrics_csv)
            return
        plot_losses(self.metrics_csv, self.out_png)


def plot_losses(metrics_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for key in ("train/loss", "val/loss"):
                v = row.get(key)
                if step and v not in (None, ""):
                    series.setdefault(key, ([], []))
                    series[key][0].append(float(step))
                    series[key][1].append(float(v))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, (x, y) in series.items():
        if key.startswith("val"):
            ax.plot(x, y, label=key, marker="o", markersize=4)
            continue
        ax.plot(x, y, label=f"{key} (per step)", alpha=0.3)
        ema, smooth = y[0], []
        for v in y:  # exponential moving average: batch-to-batch noise is large with mixed domains
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(x, smooth, label=f"{key} (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("pretraining loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def continue_metrics_csv(logger, resume_step: int | None) -> None:
    """Keep the rows of an earlier ``metrics.csv`` when a run resumes (Lightning's CSVLogger deletes the file).

    Rows logged before ``resume_step`` (the checkpoint's global step) stay; later rows belong to the part of the
    interrupted run after its last checkpoint, which the resumed run logs again. ``resume_step=None`` (a fresh
    run) leaves Lightning's behaviour alone.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if resume_step is None or not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < resume_step]
    writer = logger.experiment  # creating it deletes metrics.csv
    keys = sorted(header)  # the writer appends in its own (sorted) key order
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=keys)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = keys
