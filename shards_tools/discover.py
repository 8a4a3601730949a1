"""Which files under RAW a conversion reads: listing, symlink policy, byte-identical duplicates, parts.

Pure bookkeeping, no parsing. Every problem met while listing (a folder that cannot be read, a
symbolic link leaving RAW, a file identical to another) becomes a rejection line, never a silent gap.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shards_tools.readers import format_of


@dataclass(frozen=True)
class Input:
    """One input file."""

    path: Path
    rel: str
    """Path relative to RAW, POSIX style: the file's name in keys, indexes and reports."""
    size: int
    """Bytes on disk."""


@dataclass
class Listing:
    inputs: list[Input] = field(default_factory=list)
    """Files of a known format, byte-identical copies removed, sorted by ``rel``."""
    skipped: list[str] = field(default_factory=list)
    """Files of unknown type (``.pdb1``, ``.cif.bz2``, ...), not read."""
    links: list[str] = field(default_factory=list)
    """Symbolic links inside RAW that were not followed (their targets are listed on their own)."""
    rejected: list[dict] = field(default_factory=list)
    """Rejection lines: unreadable folders, links leaving RAW, duplicates."""


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def list_inputs(raw: Path, out: Path | None, follow_symlinks: bool = False) -> Listing:
    """Walk RAW in sorted order. Symbolic links are not followed unless ``follow_symlinks``; one that
    points outside RAW is reported (links inside RAW are skipped: their targets are found anyway)."""
    lst = Listing()
    root = raw.resolve()
    out_resolved = out.resolve() if out is not None else None
    seen_dirs: set[Path] = set()

    def reject(rel: str, reason: str) -> None:
        lst.rejected.append({"file": rel, "record": -1, "reason": reason})

    def walk(folder: Path, prefix: str) -> None:
        real = folder.resolve()
        if real in seen_dirs:  # a followed link back into a folder already listed
            return
        seen_dirs.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            reject(prefix.rstrip("/") or ".", f"cannot list this folder ({type(e).__name__}: {e.strerror or e}); "
                   "the files in it were not converted: fix its permissions and rerun")
            return
        for e in entries:
            rel = prefix + e.name
            p = Path(e.path)
            try:
                if e.is_symlink():
                    target = p.resolve()
                    if not follow_symlinks:
                        if _inside(target, root):
                            lst.links.append(rel)
                        else:
                            reject(rel, "symbolic link to a path outside RAW: not followed "
                                   "(pass --follow-symlinks to convert what it points to)")
                        continue
                    if not target.exists():
                        reject(rel, "broken symbolic link")
                        continue
                if e.is_dir(follow_symlinks=follow_symlinks):
                    if out_resolved is None or p.resolve() != out_resolved:  # OUT inside RAW is not input
                        walk(p, rel + "/")
                elif e.is_file(follow_symlinks=follow_symlinks):
                    if format_of(p):
                        lst.inputs.append(Input(p, rel, e.stat(follow_symlinks=follow_symlinks).st_size))
                    else:
                        lst.skipped.append(rel)
            except OSError as err:
                reject(rel, f"cannot read this entry ({type(err).__name__}: {err.strerror or err})")

    walk(raw, "")
    lst.inputs.sort(key=lambda i: i.rel)
    _drop_duplicates(lst)
    return lst


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _drop_duplicates(lst: Listing) -> None:
    """Keep the first (by name) of each set of byte-identical inputs; report the others. Only files
    sharing a size are hashed."""
    by_size: dict[int, list[Input]] = defaultdict(list)
    for i in lst.inputs:
        by_size[i.size].append(i)
    dropped: set[str] = set()
    for group in by_size.values():
        if len(group) < 2:
            continue
        first_of: dict[str, Input] = {}
        for i in group:  # group is in rel order
            try:
                h = content_hash(i.path)
            except OSError as e:
                lst.rejected.append({"file": i.rel, "record": -1,
                                     "reason": f"cannot read this file ({type(e).__name__}: {e.strerror or e})"})
                dropped.add(i.rel)
                continue
            if h in first_of:
                lst.rejected.append({"file": i.rel, "record": -1, "reason": (
                    f"byte-identical to {first_of[h].rel} (sha256 {h[:16]}…): converted once, as that file")})
                dropped.add(i.rel)
            else:
                first_of[h] = i
    lst.inputs = [i for i in lst.inputs if i.rel not in dropped]


def parse_part(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N; ValueError with the value seen otherwise."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must look like K/N (e.g. 3/16), got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--part K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def select_part(inputs: list[Input], k: int, n: int) -> list[Input]:
    """The inputs of part ``k`` of ``n``: a deterministic split balanced by bytes (largest file first,
    each to the lightest part, ties to the lowest part). Every part computes the same split from the
    same RAW, so the parts together hold every input exactly once."""
    load = [0] * n
    mine = []
    for i in sorted(inputs, key=lambda i: (-i.size, i.rel)):
        j = min(range(n), key=lambda p: (load[p], p))
        load[j] += max(i.size, 1)
        if j == k - 1:
            mine.append(i)
    return sorted(mine, key=lambda i: i.rel)


def part_folder(k: int, n: int) -> str:
    """Sub-folder of OUT that part ``k`` of ``n`` writes (zero-padded so names sort)."""
    w = len(str(n))
    return f"part-{k:0{w}d}-of-{n}"
