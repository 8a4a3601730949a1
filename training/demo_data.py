"""Convert the vendored demo structures on first use, so the README's demo command works on a fresh clone."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.schema import MANIFEST_NAME

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEMO_RAW = REPO / "data" / "demo" / "raw"
DEMO_SHARDS = REPO / "data" / "demo" / "shards"


def ensure_demo_shards(cfg: DataConfig) -> None:
    """If ``cfg.root`` is the demo shards folder and it has no manifest yet, convert ``data/demo/raw`` into it."""
    if storage.scheme_of(cfg.root) != "file":
        return
    root = Path(cfg.root)
    if not root.is_absolute():
        root = (Path.cwd() / root).resolve()
    if root != DEMO_SHARDS.resolve() or (root / MANIFEST_NAME).exists():
        return
    from shards_tools.convert import main as convert

    log.info("demo shards missing: converting %s -> %s (once)", DEMO_RAW, root)
    code = convert([str(DEMO_RAW), str(root), "--no-progress", "-q"])
    if code != 0:
        raise SystemExit(f"converting the demo data failed with exit code {code}; see {root / 'rejected.jsonl'}")
