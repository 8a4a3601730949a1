"""The embedded demo: where its raw structures are, and converting them to shards once on first use.

The vendored structures live in ``data/demo/raw/`` of the source tree; a wheel carries the same files as
package data (``pipeline/_demo_raw/``, mapped in ``pyproject.toml``). :data:`DEMO_RAW` is whichever exists.
``configs/demo.yaml`` points at the source tree's ``data/demo/shards``; ``python -m training.run --demo``
points at ``./data/demo/shards`` under the current directory. Either way the first run converts the raw
structures there, once: concurrent starts (several ranks under torchrun/srun) take a file lock, one
converts and the others wait for its manifest.
"""

from __future__ import annotations

import fcntl
import logging
import subprocess
import sys
from pathlib import Path

from pipeline import storage

log = logging.getLogger(__name__)

_PACKAGED_RAW = Path(__file__).resolve().parent / "_demo_raw"
_SOURCE_TREE = Path(__file__).resolve().parents[1]
DEMO_RAW = _PACKAGED_RAW if _PACKAGED_RAW.is_dir() else _SOURCE_TREE / "data" / "demo" / "raw"
"""The vendored demo structures (wheel: package data; source tree or editable install: data/demo/raw)."""
DEMO_SHARDS = _SOURCE_TREE / "data" / "demo" / "shards"
"""Where ``configs/demo.yaml`` (read from the source tree) keeps the converted demo."""


class DemoConversionError(RuntimeError):
    """Converting the vendored demo structures failed."""


def ensure_demo_shards(root: str, demo_raw: Path = DEMO_RAW, demo_shards: Path = DEMO_SHARDS) -> bool:
    """Convert ``demo_raw`` into ``root`` when ``root`` is ``demo_shards`` and has no manifest yet.

    Returns True when ``root`` is the demo folder (converted now or before). Any other root is left alone.
    The converter runs as its own process (``shards_tools`` is an offline tool the loader never imports);
    a lock file beside the folder (``<root>.lock``) makes concurrent callers convert once.
    """
    from pipeline.schema import MANIFEST_NAME  # numpy: not at import, so --help stays fast

    if storage.scheme_of(root) != "file":
        return False
    path = Path(root).expanduser().absolute()
    if path.resolve() != Path(demo_shards).expanduser().absolute().resolve():
        return False
    if (path / MANIFEST_NAME).exists():
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first caller converts; the others block here until it is done
        try:
            if (path / MANIFEST_NAME).exists():
                return True
            log.warning("demo shards missing: converting %s -> %s (once, about a minute)", demo_raw, path)
            done = subprocess.run([sys.executable, "-m", "shards_tools.convert", str(demo_raw), str(path),
                                   "--no-progress", "-q"], check=False)
            if done.returncode != 0:
                raise DemoConversionError(f"converting the demo data {demo_raw} -> {path} failed with exit code "
                                          f"{done.returncode}; see {path / 'rejected.jsonl'}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return True
