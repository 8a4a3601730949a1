"""Readers for every input format, each yielding :class:`Structure` or :class:`Rejection` records.

- seed ``.pt`` chunks: PyG ``InMemoryDataset`` ``(data, slices)`` tuples (old layout: a ``Data``;
  current layout: ``(dict, slices, sizes, Data)``) and plain lists of ``Data``; loaded with
  ``torch.load(weights_only=True)`` and PyG's storage classes as the only extra safe globals.
- ``.pdb``, ``.cif``/``.mmcif``, ``.bcif`` (biotite; model 1; bonds from the CCD residue templates and
  CONECT records; a PDB whose atom serials restart or overflow, as in any structure over 99,999 atoms,
  falls back to the templates alone),
- ``.sdf``/``.mol`` (RDKit; bonds and orders from the file),
- ``.xyz`` multi-record (bonds perceived by RDKit: orders when ``DetermineBonds`` succeeds, else
  connectivity from covalent radii),
and their ``.gz`` versions.

Files of the first three kinds are read whole, up to a decompressed-size cap. Multi-record SDF and XYZ
files are streamed: :func:`split_records` cuts them into raw records (bytes) without parsing, and
:func:`parse_record` turns one raw record into a structure, so records can be parsed in parallel and in
any grouping with identical results. No reason text ever quotes the input's bytes (see :func:`describe_error`).
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import pickle
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.schema import BOND_AROMATIC, BOND_UNKNOWN, atom_names_to_array
from shards_tools.structure import Rejection, Structure

log = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = {".pdb", ".ent", ".cif", ".mmcif", ".bcif", ".sdf", ".mol", ".xyz"}
PT_SUFFIXES = {".pt", ".pth"}
STREAMED_FORMATS = frozenset({"sdf", "xyz"})
"""Multi-record formats that are streamed record by record (and split across workers)."""

Record = Structure | Rejection


class UntrustedPickleError(ValueError):
    """A ``.pt`` file needs arbitrary unpickling, which is refused unless ``--trust-pickle``."""


class InputRejected(ValueError):
    """An input refused for a reason written by us (never containing the file's bytes)."""


@functools.cache
def parse_errors() -> tuple[type[BaseException], ...]:
    """What the parsing libraries raise on bad input: such an error rejects one file or record.

    Anything else escaping a reader is a bug of the converter and ends the run with its own exit code.
    """
    from biotite import InvalidFileError
    from biotite.structure import BadStructureError

    return (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, ArithmeticError,
            EOFError, OSError, MemoryError, zlib.error, pickle.UnpicklingError, InvalidFileError, BadStructureError)


def format_of(path: Path) -> str | None:
    """The input format of ``path`` from its suffixes (``.gz`` looked through), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    last = suffixes[-1]
    if last in PT_SUFFIXES:
        return "pt"
    if last in STRUCTURE_SUFFIXES:
        return {".ent": "pdb", ".mmcif": "cif", ".mol": "sdf"}.get(last, last[1:])
    return None


# ---------------------------------------------------------------- bounded input

def open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, underlying file) of ``path``; the second one's ``tell()`` is progress in bytes."""
    raw = open(path, "rb")  # noqa: SIM115 - the caller closes both
    if path.suffix.lower() == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The (decompressed) bytes of ``path``, refusing past ``max_bytes`` without reading further.

    A ``.gz`` is inflated incrementally, so a small file that inflates to gigabytes costs at most
    ``max_bytes`` of memory before it is refused.
    """
    too_big = InputRejected(f"larger than {max_bytes / 1e6:g} MB after decompression (--max-input-mb); not read further")
    if path.suffix.lower() != ".gz" and path.stat().st_size > max_bytes:
        raise too_big
    f, raw = open_binary(path)
    with raw, f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_big
    return data


_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")


def describe_error(e: BaseException, data: bytes | None) -> str:
    """``Type: message`` of a library error, with every piece of the message that occurs in the input's
    bytes replaced by ``…``: a reason names what went wrong, never what the (possibly secret) file holds.
    Without ``data`` (an error while streaming), every quoted literal is hidden."""
    msg = " ".join(str(e).split())[:300]
    if data is None:
        msg = _QUOTED.sub("'…'", msg)
    else:
        def hide(text: str) -> bool:
            return bool(text) and text.encode("utf-8", "replace") in data

        msg = _QUOTED.sub(lambda m: "'…'" if hide(m.group(1) or m.group(2) or "") else m.group(0), msg)
        msg = " ".join("…" if len(w.strip(".,;:()[]{}")) >= 6 and hide(w.strip(".,;:()[]{}")) else w
                       for w in msg.split(" "))
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


_ALIASES = {"D": 1, "T": 1}
"""Hydrogen isotopes (deuterium in neutron structures, tritium): stored as hydrogen, Z = 1."""


def element_numbers(symbols) -> np.ndarray:
    """Element symbols (any case) to atomic numbers; D and T are hydrogen; unknown symbols become 0
    (rejected by validation)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    table = Chem.GetPeriodicTable()
    cache: dict[str, int] = {}
    out = np.zeros(len(symbols), np.int64)
    for i, sym in enumerate(symbols):
        key = str(sym).strip()
        if key not in cache:
            name = key[:1].upper() + key[1:].lower()
            if name in _ALIASES:
                cache[key] = _ALIASES[name]
            else:
                try:
                    cache[key] = int(table.GetAtomicNumber(name)) if name else 0
                except RuntimeError:  # RDKit: "Element 'Xx' not found"
                    cache[key] = 0
        out[i] = cache[key]
    return out


# ---------------------------------------------------------------- PDB / mmCIF / BinaryCIF (biotite)

# biotite BondType -> our bond order code
_BIOTITE_ORDER = np.array([BOND_UNKNOWN, 1, 2, 3, BOND_UNKNOWN, BOND_AROMATIC, BOND_AROMATIC, BOND_AROMATIC,
                           BOND_UNKNOWN, BOND_AROMATIC], np.uint8)


def _from_atom_array(atoms, mol_id: str) -> Structure:
    z = element_numbers(atoms.element)
    bonds = atoms.bonds.as_array() if atoms.bonds is not None else np.zeros((0, 3), np.int64)
    pairs = np.sort(bonds[:, :2].astype(np.int64), axis=1)
    kinds = bonds[:, 2].astype(np.int64)
    order = _BIOTITE_ORDER[np.clip(kinds, 0, len(_BIOTITE_ORDER) - 1)]
    chains, chain_idx = np.unique(np.asarray(atoms.chain_id, dtype=str), return_inverse=True)
    return Structure(
        record=0,
        mol_id=mol_id,
        z=z,
        pos=np.asarray(atoms.coord, np.float64),
        bonds=pairs,
        bond_order=order,
        res_index=np.asarray(atoms.res_id, np.int32),
        chain=chain_idx.astype(np.uint16),
        chains=[str(c) for c in chains],
        atom_name=atom_names_to_array(list(atoms.atom_name)),
    )


def _atom_records(data: bytes) -> int:
    """ATOM/HETATM lines of a PDB or mmCIF text (all models), counted before any parsing."""
    return (data.count(b"\nATOM") + data.count(b"\nHETATM")
            + int(data.startswith((b"ATOM", b"HETATM"))))


def read_pdbx(data: bytes, fmt: str, mol_id: str, max_file_atoms: int) -> Iterator[Record]:
    """Model 1 of a PDB, mmCIF or BinaryCIF file given as bytes."""
    import warnings

    import biotite.structure as struc
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx
    from biotite import InvalidFileError

    too_many = "{n} atom records, more than --max-file-atoms {cap}; not parsed"
    if fmt in ("pdb", "cif") and (n := _atom_records(data)) > max_file_atoms:
        raise InputRejected(too_many.format(n=n, cap=max_file_atoms))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # biotite warns about guessed elements; we validate them
        if fmt == "pdb":
            f = pdb.PDBFile.read(io.StringIO(data.decode("utf-8", "replace")))
            try:
                atoms = pdb.get_structure(f, model=1, include_bonds=True)
            except (IndexError, ValueError, KeyError, InvalidFileError):
                # CONECT records address atoms by serial; serials that restart or pass 99,999 make them
                # ambiguous. The residue templates still give every standard bond.
                atoms = pdb.get_structure(f, model=1, include_bonds=False)
                atoms.bonds = struc.connect_via_residue_names(atoms)
                log.info("%s: atom serials are not unique; bonds from residue templates only (CONECT ignored)", mol_id)
        else:
            f = pdbx.CIFFile.read(io.StringIO(data.decode("utf-8", "replace"))) if fmt == "cif" \
                else pdbx.BinaryCIFFile.read(io.BytesIO(data))
            block = f.block
            if "atom_site" not in block:
                raise InputRejected(f"{fmt} file has no atom_site category (no coordinates)")
            if fmt == "bcif" and (n := block["atom_site"].row_count) > max_file_atoms:
                raise InputRejected(too_many.format(n=n, cap=max_file_atoms))
            atoms = pdbx.get_structure(f, model=1, include_bonds=True)
    yield _from_atom_array(atoms, mol_id)


# ---------------------------------------------------------------- multi-record SDF / XYZ

@dataclass
class RawRecord:
    """One record of a multi-record file, cut out but not parsed."""

    record: int
    """0-based record number inside its file."""
    line: int
    """1-based line of the file where the record starts."""
    data: bytes | None
    """The record's bytes; None when it was refused while cutting (see ``reason``)."""
    reason: str | None = None
    last: bool = False
    """True for the file's last record (an XYZ record short of atom lines is then 'truncated')."""
    end_pos: int = 0
    """Bytes of the file on disk (compressed, for .gz) consumed once this record was cut: progress."""


_LONG = None  # marks a line longer than the record cap


def _lines(f: BinaryIO, cap: int) -> Iterator[bytes | None]:
    """Lines of ``f`` (with their newline); a line longer than ``cap`` is yielded as ``None`` after
    being skipped in bounded pieces, so no line ever costs more than ``cap`` bytes of memory."""
    while True:
        line = f.readline(cap + 1)
        if not line:
            return
        if len(line) > cap and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield _LONG
            continue
        yield line


class _Cutter:
    """Collects the lines of the current record, refusing it (but still finding its end) past ``cap``."""

    def __init__(self, cap: int, tell: Callable[[], int]):
        self.cap, self.tell, self.k = cap, tell, 0
        self.parts: list[bytes] = []
        self.size, self.start, self.over = 0, 0, False

    def begin(self, line_no: int) -> None:
        self.parts, self.size, self.start, self.over = [], 0, line_no, False

    def add(self, line: bytes | None) -> None:
        if line is None or self.size + len(line) > self.cap:
            self.over, self.parts = True, []
            return
        if not self.over:
            self.parts.append(line)
            self.size += len(line)

    def cut(self, last: bool = False) -> RawRecord:
        if self.over:
            rec = RawRecord(self.k, self.start, None, f"record at line {self.start} is larger than "
                            f"{self.cap / 1e6:g} MB (--max-input-mb); skipped", last)
        else:
            rec = RawRecord(self.k, self.start, b"".join(self.parts), None, last)
        rec.end_pos = self.tell()
        self.k += 1
        self.parts, self.size = [], 0
        return rec


def _is_count(s: bytes) -> bool:
    return s.lstrip(b"+-").isdigit() and len(s) < 20


def split_xyz(f: BinaryIO, cap: int, tell: Callable[[], int]) -> Iterator[RawRecord]:
    """Cut a multi-record XYZ stream into records: a record starts at a line holding only an integer
    (its atom count), takes the next line as its comment, and runs to the next such line. The cut does
    not trust the count, so a count that disagrees with the atom lines rejects only its own record.
    Lines before the first count line form one record too (rejected when parsed)."""
    c = _Cutter(cap, tell)
    pending, want_comment = False, False
    for no, line in enumerate(_lines(f, cap), start=1):
        if want_comment:
            c.add(line)
            want_comment = False
            continue
        s = line.strip() if line is not None else b"x"
        if _is_count(s):
            if pending:
                yield c.cut()
            c.begin(no)
            c.add(line)
            pending, want_comment = True, True
            continue
        if not s:
            continue
        if not pending:
            c.begin(no)
            pending = True
        c.add(line)
    if pending:
        yield c.cut(last=True)


def split_sdf(f: BinaryIO, cap: int, tell: Callable[[], int]) -> Iterator[RawRecord]:
    """Cut an SDF stream into records at its ``$$$$`` lines (as RDKit's supplier does); a trailing
    record without ``$$$$`` counts unless it is blank."""
    c = _Cutter(cap, tell)
    pending, blank = False, True
    for no, line in enumerate(_lines(f, cap), start=1):
        if not pending:
            c.begin(no)
            pending, blank = True, True
        c.add(line)
        if line is not None and line.strip():
            blank = False
        if line is not None and line.startswith(b"$$$$") and not line[4:].strip():
            yield c.cut()
            pending = False
    if pending and not blank:
        yield c.cut(last=True)


def split_records(path: Path, fmt: str, max_record_bytes: int) -> Iterator[RawRecord]:
    """The raw records of a multi-record SDF or XYZ file (``.gz`` streamed), in file order."""
    f, raw = open_binary(path)
    with raw, f:
        yield from (split_sdf if fmt == "sdf" else split_xyz)(f, max_record_bytes, raw.tell)


def _rdkit_bonds(mol) -> tuple[np.ndarray, np.ndarray]:
    from rdkit import Chem

    order_of = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3,
                Chem.BondType.AROMATIC: BOND_AROMATIC}
    pairs, orders = [], []
    for b in map(mol.GetBondWithIdx, range(mol.GetNumBonds())):  # ~1.5x faster than GetBonds()
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        pairs.append((min(i, j), max(i, j)))
        orders.append(order_of.get(b.GetBondType(), BOND_UNKNOWN))
    return np.array(pairs, np.int64).reshape(-1, 2), np.array(orders, np.uint8)


def _parse_sdf(rec: RawRecord, source: str, stem: str) -> Record:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mols = list(Chem.ForwardSDMolSupplier(io.BytesIO(rec.data), removeHs=False, sanitize=False))
    mol = mols[0] if mols else None
    if mol is None:
        return Rejection(source, rec.record, f"record at line {rec.line}: unparseable SDF record "
                         "(RDKit could not read its atom/bond block)")
    if mol.GetNumConformers() == 0:
        return Rejection(source, rec.record, f"record at line {rec.line}: SDF record has no coordinates")
    z = np.array([mol.GetAtomWithIdx(i).GetAtomicNum() for i in range(mol.GetNumAtoms())], np.int64)
    pos = mol.GetConformer().GetPositions() if mol.GetNumAtoms() else np.zeros((0, 3))
    bonds, order = _rdkit_bonds(mol)
    name = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
    return Structure(record=rec.record, mol_id=name or f"{stem}_{rec.record}", z=z, pos=pos, bonds=bonds, bond_order=order)


def _parse_xyz(rec: RawRecord, source: str, stem: str) -> Record:
    lines = rec.data.split(b"\n")
    head = lines[0].strip()
    if not _is_count(head):
        return Rejection(source, rec.record, f"line {rec.line}: expected an atom count; "
                         "skipped to the next line holding only an integer")
    n = int(head)
    if n < 0:
        return Rejection(source, rec.record, f"line {rec.line}: negative atom count {n}")
    comment = lines[1].decode("utf-8", "replace") if len(lines) > 1 else ""
    body = [ln for ln in lines[2:] if ln.strip()]
    if len(body) != n:
        what = ("truncated: the file ends after" if rec.last and len(body) < n else "count mismatch:")
        return Rejection(source, rec.record, f"{what} record at line {rec.line} declares {n} atoms, "
                         f"{len(body)} atom lines follow")
    fields = [ln.split() for ln in body]
    try:
        symbols = [f[0].decode("ascii") for f in fields]
        pos = np.array([[float(x) for x in f[1:4]] for f in fields], np.float64).reshape(n, 3)
    except (IndexError, ValueError, UnicodeDecodeError):
        return Rejection(source, rec.record, f"record at line {rec.line}: malformed atom line "
                         "(expected: element x y z)")
    words = comment.split()
    return Structure(record=rec.record, mol_id=words[0] if words else f"{stem}_{rec.record}",
                     z=element_numbers(symbols), pos=pos, bonds=None)


def parse_record(rec: RawRecord, fmt: str, source: str, stem: str) -> Record:
    """One raw SDF/XYZ record as a structure, or why not; a parser error rejects this record only."""
    if rec.data is None:
        return Rejection(source, rec.record, rec.reason or "record refused")
    try:
        return (_parse_sdf if fmt == "sdf" else _parse_xyz)(rec, source, stem)
    except parse_errors() as e:
        return Rejection(source, rec.record, f"record at line {rec.line}: {describe_error(e, rec.data)}")


def perceive_bonds(z: np.ndarray, pos: np.ndarray, with_orders: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bonds from geometry (RDKit): orders when ``with_orders`` and perception succeeds, else connectivity
    from covalent radii with unknown orders."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.RWMol()
    for zi in np.asarray(z).tolist():
        mol.AddAtom(Chem.Atom(zi))
    conf = Chem.Conformer(len(z))
    conf.SetPositions(np.asarray(pos, np.float64).reshape(-1, 3))
    mol.AddConformer(conf, assignId=True)
    if with_orders:
        trial = Chem.RWMol(mol)
        try:
            rdDetermineBonds.DetermineBonds(trial, charge=0)
            return _perceived(trial)
        except (ValueError, RuntimeError):
            pass  # charge/valence assignment failed: keep connectivity only
    rdDetermineBonds.DetermineConnectivity(mol)
    pairs, _ = _perceived(mol)
    return pairs, np.zeros(len(pairs), np.uint8)


def _perceived(mol) -> tuple[np.ndarray, np.ndarray]:
    """Bonds of a molecule whose bonds RDKit perceived (single, double, triple or aromatic only), read in
    one call from the bond-order adjacency matrix instead of a Python loop over bonds."""
    from rdkit import Chem

    adj = Chem.GetAdjacencyMatrix(mol, useBO=True)
    i, j = np.nonzero(np.triu(adj, k=1))
    w = adj[i, j]
    order = np.select([w == 1, w == 2, w == 3, w == 1.5], [1, 2, 3, BOND_AROMATIC], BOND_UNKNOWN).astype(np.uint8)
    return np.stack([i, j], axis=1).astype(np.int64), order


# ---------------------------------------------------------------- seed .pt chunks (PyG)

def _pyg_safe_globals() -> list:
    from torch_geometric.data import Data, HeteroData
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import BaseStorage, EdgeStorage, GlobalStorage, NodeStorage

    return [Data, HeteroData, DataEdgeAttr, DataTensorAttr, BaseStorage, EdgeStorage, GlobalStorage, NodeStorage]


def load_pt(path: Path, trust_pickle: bool, max_bytes: int):
    """``torch.load`` with only tensors and PyG containers allowed, unless ``trust_pickle``."""
    import torch

    data = read_capped(path, max_bytes)
    if trust_pickle:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_pyg_safe_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        first = describe_error(pickle.UnpicklingError(lines[-1] if lines else ""), data)
        raise UntrustedPickleError(
            f"refused to unpickle {path}: it needs objects beyond tensors and PyG data containers ({first}). "
            "Loading it could run arbitrary code. If you trust its origin, rerun with --trust-pickle"
        ) from None


def _pt_data_list(obj) -> list:
    """Normalise the supported chunk layouts to a list of PyG ``Data``."""
    from torch_geometric.data import Data
    from torch_geometric.data.separate import separate

    if isinstance(obj, Data):
        return [obj]
    if isinstance(obj, list | tuple) and obj and all(isinstance(d, Data) for d in obj):
        return list(obj)
    if isinstance(obj, tuple) and len(obj) in (2, 3, 4) and (isinstance(obj[1], dict) or obj[1] is None):
        data, slices = obj[0], obj[1]
        if isinstance(data, dict):  # current PyG layout: (data.to_dict(), slices, sizes, data_cls)
            cls = obj[3] if len(obj) == 4 and isinstance(obj[3], type) else Data
            data = cls.from_dict(data)
        if not isinstance(data, Data):
            raise ValueError(f"unsupported .pt layout: first tuple element is {type(data).__name__}")
        if slices is None:  # InMemoryDataset.collate of a single graph
            return [data]
        first = next(iter(slices.values()))
        n = len(first) - 1
        return [separate(cls=data.__class__, batch=data, idx=i, slice_dict=slices, decrement=False) for i in range(n)]
    raise ValueError(
        f"unsupported .pt content {type(obj).__name__}: expected an InMemoryDataset (data, slices) tuple "
        "or a list of torch_geometric Data"
    )


def read_pt(path: Path, trust_pickle: bool, max_bytes: int) -> Iterator[Record]:
    obj = load_pt(path, trust_pickle, max_bytes)
    for k, d in enumerate(_pt_data_list(obj)):
        z = d.z if "z" in d else getattr(d, "x", None)
        if z is None or "pos" not in d:
            yield Rejection(str(path), k, "sample has no z/pos fields")
            continue
        z = z.reshape(-1).numpy() if z.dim() > 1 and z.shape[-1] == 1 else z.numpy()
        mol_id = getattr(d, "mol_id", None)
        dtype = getattr(d, "dataset_type", None)
        mol_id = mol_id[0] if isinstance(mol_id, list | tuple) else mol_id
        dtype = dtype[0] if isinstance(dtype, list | tuple) else dtype
        yield Structure(
            record=k,
            mol_id=str(mol_id) if mol_id is not None else f"{path.stem}_{k}",
            z=np.asarray(z).astype(np.int64),
            pos=d.pos.numpy().astype(np.float64),
            bonds=None,
            domain=str(dtype) if dtype is not None else None,
        )


# ---------------------------------------------------------------- dispatch

_CHUNK_DIR = re.compile(r"^(?P<name>.+)_chunk_\d+$")


def domain_from_path(rel: Path) -> str | None:
    """``protein_chunk_0/processed/x.pt`` -> protein; ``rna/1abc.pdb`` -> rna; a top-level file -> None."""
    for part in rel.parts[:-1]:
        m = _CHUNK_DIR.match(part)
        if m:
            return m.group("name")
    return rel.parts[0] if len(rel.parts) > 1 else None


@dataclass(frozen=True)
class ReadLimits:
    """Caps that bound a reader's memory whatever a file claims."""

    max_input_bytes: int = 512 * 10**6
    """Decompressed bytes of a file read whole (PDB, mmCIF, BCIF, .pt), and of one SDF/XYZ record."""
    max_file_atoms: int = 2_000_000
    """ATOM/HETATM records of one PDB/mmCIF/BCIF file (all models), counted before parsing."""


def read_file(path: Path, source: str, trust_pickle: bool = False, limits: ReadLimits = ReadLimits()) -> Iterator[Record]:
    """All records of one input file. A parse failure becomes a :class:`Rejection` of the file (record -1)
    or, for SDF/XYZ, of the one record it hit; reasons never quote the file's bytes."""
    fmt = format_of(path)
    stem = path.name.split(".")[0]
    if fmt in STREAMED_FORMATS:
        try:
            for rec in split_records(path, fmt, limits.max_input_bytes):
                yield parse_record(rec, fmt, source, stem)
        except parse_errors() as e:  # e.g. a corrupt .gz stream: the records before it are kept
            yield Rejection(source, -1, f"unreadable {fmt} file: {describe_error(e, None)}")
        return
    data = None
    try:
        if fmt == "pt":
            yield from read_pt(path, trust_pickle, limits.max_input_bytes)
        elif fmt in ("pdb", "cif", "bcif"):
            data = read_capped(path, limits.max_input_bytes)
            yield from read_pdbx(data, fmt, stem, limits.max_file_atoms)
        else:
            yield Rejection(source, -1, "unknown file type")
    except (UntrustedPickleError, InputRejected) as e:
        yield Rejection(source, -1, str(e))
    except parse_errors() as e:
        # biotite, RDKit and torch raise a mix of these on truncated or garbage input
        yield Rejection(source, -1, f"unreadable {fmt} file: {describe_error(e, data)}")
