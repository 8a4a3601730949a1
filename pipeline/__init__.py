"""molstream's streaming loader. Importing any of molstream's four top-level packages first checks that
all four come from one installation (see :func:`check_installation`)."""

from __future__ import annotations

import importlib.util
import os

PACKAGES = ("pipeline", "model", "training", "shards_tools")


def _location(spec) -> str:
    if spec.origin and spec.origin != "namespace":
        return spec.origin
    return ", ".join(spec.submodule_search_locations or []) or "?"


def check_installation() -> None:
    """Raise ImportError naming the culprit when one of the four top-level names resolves outside the
    folder that holds this ``pipeline`` package (a user's ``model.py``, another distribution's ``pipeline``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        expected = os.path.join(root, name, "__init__.py")
        if spec is not None and spec.origin and os.path.abspath(spec.origin) == expected:
            continue
        where = "nothing" if spec is None else _location(spec)
        raise ImportError(
            f"molstream: '{name}' resolves to {where}, not to molstream's {expected}: a file or package named "
            f"'{name}' earlier on sys.path (or another installed distribution) shadows molstream's. Rename or "
            f"move it (a script's own folder comes first on sys.path), or uninstall the other distribution.")


check_installation()
