"""Real processes: 2 ranks x 2 DataLoader workers under torch.distributed (gloo, CPU)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.loader import TrainLoader, eval_loader, resolve
from tests.pipeline.helpers import config

WORLD, BATCHES = 2, 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, root: str, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # ranks are spawned; their DataLoader workers fork (as under torchrun), spawn would add ~10 s each
        cfg = config(Path(root), max_atoms=10_000, num_workers=2, train_batches_per_epoch=BATCHES,
                     oversize_policy="crop", worker_start_method="fork")
        res = resolve(cfg)
        seen, n = [], 0
        loader = TrainLoader(res, rank, WORLD)
        for b in loader:
            n += 1
            seen += [[res.names[d], p, k] for d, p, k in zip(b.domain.tolist(), b.pass_index.tolist(), b["keys"],
                                                              strict=True)]
        held = []  # samples read but not yet batched: in shuffle buffers and packing pools
        for w in loader.state_dict()["workers"]:
            for d, buf in enumerate(w["buffers"]):
                held += [[res.names[d], p, res.train[d].keys[i]] for p, i in buf["ids"]]
            held += [[res.names[d], p, res.train[d].keys[i]] for d, p, i in w["packer"]["pool"]]
        val_loader = eval_loader(res, "val", rank, WORLD)
        val = [k for b in val_loader for k in b["keys"]]
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, {"batches": n, "seen": seen, "held": held, "val": val,
                                          "val_batches": len(val_loader)})
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_two_workers_exact_passes_equal_batches(small_shards, tmp_path):
    out = tmp_path / "result.json"
    ctx = mp.start_processes(_rank_main, args=(str(small_shards), _free_port(), str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline_s = 240
    import time

    t0 = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - t0 > deadline_s:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {deadline_s} s (a hang)")
    ranks = json.loads(out.read_text())
    assert [r["batches"] for r in ranks] == [BATCHES] * WORLD  # equal work per rank
    seen = [tuple(x) for r in ranks for x in r["seen"]]
    held = [tuple(x) for r in ranks for x in r["held"]]
    assert len(seen) == len(set(seen)), "a sample appeared twice within one pass"
    assert not set(seen) & set(held) and len(held) == len(set(held))
    res = resolve(config(small_shards, max_atoms=10_000, oversize_policy="crop"))
    for name, ix in zip(res.names, res.train, strict=True):
        pass0 = sorted(k for d, p, k in seen + held if d == name and p == 0)
        assert pass0 == sorted(ix.keys.tolist()), f"{name}: pass 0 is not exactly every sample once"
        assert max(p for d, p, _ in seen if d == name) >= 1  # every domain moved on to a fresh pass
    val = [k for r in ranks for k in r["val"]]
    assert sorted(val) == sorted(k for ix in res.val for k in ix.keys.tolist())
    assert len({r["val_batches"] for r in ranks}) == 1
