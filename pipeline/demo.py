"""The shipped configs point at ``data/demo/shards``: convert the vendored raw data there on first use,
so ``python -m training.run configs/demo.yaml`` and the dry run work from a fresh clone."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from pipeline import storage
from pipeline.schema import MANIFEST_NAME

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_RAW = REPO / "data" / "demo" / "raw"
DEMO_SHARDS = REPO / "data" / "demo" / "shards"


def ensure_demo_shards(root: str, demo_raw: Path = DEMO_RAW, demo_shards: Path = DEMO_SHARDS) -> None:
    """Convert ``demo_raw`` into ``root`` when ``root`` is the demo shards folder and has no manifest yet.

    Any other root is left alone. The converter runs as its own process (``shards_tools`` is an offline
    tool the loader never imports).
    """
    if storage.scheme_of(root) != "file":
        return
    path = Path(root) if Path(root).is_absolute() else Path.cwd() / root
    if path.resolve() != demo_shards.resolve() or (path / MANIFEST_NAME).exists():
        return
    log.warning("demo shards missing: converting %s -> %s (once)", demo_raw, path)
    done = subprocess.run([sys.executable, "-m", "shards_tools.convert", str(demo_raw), str(path), "--no-progress", "-q"],
                          cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"converting the demo data failed with exit code {done.returncode}; "
                         f"see {path / 'rejected.jsonl'}")
