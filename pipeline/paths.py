"""Relative paths in a config file resolve against the file's folder, not the current directory.

One rule for every YAML the tools read (``training.run``, ``pipeline.dryrun``): a relative local path written in
``/a/b/c.yaml`` means ``/a/b/<path>``; URLs (``s3://``, ``http(s)://``, ``file://``) and absolute paths stay as
written, ``~`` is expanded and ``..`` folded (``os.path.normpath``). Paths given as command-line overrides resolve against the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_PATH_KEYS = (("root",), ("storage", "cache_dir"))
"""Local-path fields of a ``data`` section (plus each ``domains[i].root``)."""


def _is_local(value) -> bool:
    return isinstance(value, str) and value != "" and "://" not in value


def resolve_paths(doc: dict, base: Path, keys: tuple[tuple[str, ...], ...], prefix: str = "") -> dict[str, tuple[str, str]]:
    """Make the relative local paths at ``keys`` of mapping ``doc`` absolute against ``base``, in place.

    Returns ``{dotted key: (as written, as resolved)}`` so errors can name both.
    """
    seen: dict[str, tuple[str, str]] = {}

    def fix(node, key, dotted):
        if isinstance(node, dict) and _is_local(node.get(key)):
            written = node[key]
            p = Path(written).expanduser()
            node[key] = os.path.normpath(p if p.is_absolute() else Path(base) / p)
            seen[dotted] = (written, node[key])

    for path in keys:
        node = doc
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        fix(node, path[-1], prefix + ".".join(path))
    return seen


def resolve_data_paths(section: dict, base: Path, prefix: str = "data.") -> dict[str, tuple[str, str]]:
    """:func:`resolve_paths` for a ``data`` section: root, storage.cache_dir and every domain's root."""
    seen = resolve_paths(section, base, DATA_PATH_KEYS, prefix)
    domains = section.get("domains") if isinstance(section, dict) else None
    for i, d in enumerate(domains if isinstance(domains, list) else []):
        seen.update(resolve_paths(d, base, (("root",),), f"{prefix}domains[{i}]."))
    return seen
