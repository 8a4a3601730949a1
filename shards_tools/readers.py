"""Readers for every input format, each yielding :class:`Structure` or :class:`Rejection` records.

- seed ``.pt`` chunks: PyG ``InMemoryDataset`` ``(data, slices)`` tuples (old layout: a ``Data``;
  current layout: ``(dict, slices, sizes, Data)``) and plain lists of ``Data``; loaded with
  ``torch.load(weights_only=True)`` and PyG's storage classes as the only extra safe globals.
- ``.pdb``, ``.cif``/``.mmcif``, ``.bcif`` (biotite; model 1; bonds from the CCD residue templates),
- ``.sdf``/``.mol`` (RDKit; bonds and orders from the file),
- ``.xyz`` multi-record (bonds perceived by RDKit: orders when ``DetermineBonds`` succeeds, else
  connectivity from covalent radii),
and their ``.gz`` versions.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.schema import BOND_AROMATIC, BOND_UNKNOWN, atom_names_to_array
from shards_tools.structure import Rejection, Structure

log = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = {".pdb", ".ent", ".cif", ".mmcif", ".bcif", ".sdf", ".mol", ".xyz"}
PT_SUFFIXES = {".pt", ".pth"}

Record = Structure | Rejection


class UntrustedPickleError(ValueError):
    """A ``.pt`` file needs arbitrary unpickling, which is refused unless ``--trust-pickle``."""


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


def _open_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        data = gzip.decompress(data)
    return data


def _element_numbers(symbols) -> np.ndarray:
    """Element symbols (any case) to atomic numbers; unknown symbols become 0 (rejected later)."""
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    cache: dict[str, int] = {}
    out = np.zeros(len(symbols), np.int64)
    for i, sym in enumerate(symbols):
        key = str(sym).strip()
        if key not in cache:
            name = key[:1].upper() + key[1:].lower()
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
    z = _element_numbers(atoms.element)
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


def read_pdbx(path: Path, fmt: str, mol_id: str) -> Iterator[Record]:
    import warnings

    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    data = _open_bytes(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # biotite warns about guessed elements; we validate them
        if fmt == "pdb":
            f = pdb.PDBFile.read(io.StringIO(data.decode("utf-8", "replace")))
            atoms = pdb.get_structure(f, model=1, include_bonds=True)
        elif fmt == "cif":
            f = pdbx.CIFFile.read(io.StringIO(data.decode("utf-8", "replace")))
            atoms = pdbx.get_structure(f, model=1, include_bonds=True)
        else:
            f = pdbx.BinaryCIFFile.read(io.BytesIO(data))
            atoms = pdbx.get_structure(f, model=1, include_bonds=True)
    yield _from_atom_array(atoms, mol_id)


# ---------------------------------------------------------------- SDF (RDKit)

def _rdkit_bonds(mol) -> tuple[np.ndarray, np.ndarray]:
    from rdkit import Chem

    order_of = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3,
                Chem.BondType.AROMATIC: BOND_AROMATIC}
    pairs, orders = [], []
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        pairs.append((min(i, j), max(i, j)))
        orders.append(order_of.get(b.GetBondType(), BOND_UNKNOWN))
    return np.array(pairs, np.int64).reshape(-1, 2), np.array(orders, np.uint8)


def read_sdf(path: Path, stem: str) -> Iterator[Record]:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    data = _open_bytes(path)
    supplier = Chem.ForwardSDMolSupplier(io.BytesIO(data), removeHs=False, sanitize=False)
    for k, mol in enumerate(supplier):
        if mol is None:
            yield Rejection(str(path), k, "unparseable SDF record (RDKit could not read its atom/bond block)")
            continue
        if mol.GetNumConformers() == 0:
            yield Rejection(str(path), k, "SDF record has no coordinates")
            continue
        z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], np.int64)
        pos = mol.GetConformer().GetPositions() if mol.GetNumAtoms() else np.zeros((0, 3))
        bonds, order = _rdkit_bonds(mol)
        name = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
        yield Structure(record=k, mol_id=name or f"{stem}_{k}", z=z, pos=pos, bonds=bonds, bond_order=order)


# ---------------------------------------------------------------- XYZ

def perceive_bonds(z: np.ndarray, pos: np.ndarray, with_orders: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bonds from geometry (RDKit): orders when ``with_orders`` and perception succeeds, else connectivity
    from covalent radii with unknown orders."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.RWMol()
    for zi in z:
        mol.AddAtom(Chem.Atom(int(zi)))
    conf = Chem.Conformer(len(z))
    for i, p in enumerate(np.asarray(pos, float)):
        conf.SetAtomPosition(i, p.tolist())
    mol.AddConformer(conf, assignId=True)
    if with_orders:
        trial = Chem.RWMol(mol)
        try:
            rdDetermineBonds.DetermineBonds(trial, charge=0)
            return _rdkit_bonds(trial)
        except (ValueError, RuntimeError):
            pass  # charge/valence assignment failed: keep connectivity only
    rdDetermineBonds.DetermineConnectivity(mol)
    pairs, _ = _rdkit_bonds(mol)
    return pairs, np.zeros(len(pairs), np.uint8)


def read_xyz(path: Path, stem: str) -> Iterator[Record]:
    lines = _open_bytes(path).decode("utf-8", "replace").splitlines()
    i, k = 0, 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        head = lines[i].strip()
        try:
            n = int(head)
        except ValueError:
            yield Rejection(str(path), k, f"line {i + 1}: expected an atom count, got {head[:40]!r}; rest of file skipped")
            return
        if n < 0:
            yield Rejection(str(path), k, f"line {i + 1}: negative atom count {n}; rest of file skipped")
            return
        comment = lines[i + 1] if i + 1 < len(lines) else ""
        body = lines[i + 2 : i + 2 + n]
        start = i + 1
        i += 2 + n
        if len(body) < n:
            yield Rejection(str(path), k, f"truncated: record at line {start} declares {n} atoms, file has {len(body)}")
            return
        try:
            fields = [ln.split() for ln in body]
            symbols = [f[0] for f in fields]
            pos = np.array([[float(x) for x in f[1:4]] for f in fields], np.float64).reshape(-1, 3)
        except (IndexError, ValueError) as e:
            yield Rejection(str(path), k, f"record at line {start}: malformed atom line ({e})")
            k += 1
            continue
        z = _element_numbers(symbols)
        name = comment.split()[0] if comment.split() else f"{stem}_{k}"
        yield Structure(record=k, mol_id=name, z=z, pos=pos, bonds=None)
        k += 1


# ---------------------------------------------------------------- seed .pt chunks (PyG)

def _pyg_safe_globals() -> list:
    from torch_geometric.data import Data, HeteroData
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import BaseStorage, EdgeStorage, GlobalStorage, NodeStorage

    return [Data, HeteroData, DataEdgeAttr, DataTensorAttr, BaseStorage, EdgeStorage, GlobalStorage, NodeStorage]


def load_pt(path: Path, trust_pickle: bool):
    """``torch.load`` with only tensors and PyG containers allowed, unless ``trust_pickle``."""
    import torch

    data = _open_bytes(path)
    if trust_pickle:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_pyg_safe_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
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


def read_pt(path: Path, trust_pickle: bool) -> Iterator[Record]:
    obj = load_pt(path, trust_pickle)
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


def read_file(path: Path, trust_pickle: bool = False) -> Iterator[Record]:
    """All records of one input file; parse failures become a single file-level :class:`Rejection`."""
    fmt = format_of(path)
    stem = path.name.split(".")[0]
    try:
        if fmt == "pt":
            yield from read_pt(path, trust_pickle)
        elif fmt in ("pdb", "cif", "bcif"):
            yield from read_pdbx(path, fmt, stem)
        elif fmt == "sdf":
            yield from read_sdf(path, stem)
        elif fmt == "xyz":
            yield from read_xyz(path, stem)
        else:
            yield Rejection(str(path), -1, f"unknown file type {''.join(path.suffixes)!r}")
    except UntrustedPickleError as e:
        yield Rejection(str(path), -1, str(e))
    except (OSError, EOFError, ValueError, KeyError, IndexError, RuntimeError, UnicodeDecodeError,
            pickle.UnpicklingError, gzip.BadGzipFile) as e:
        # biotite, RDKit and torch raise a mix of these on truncated or garbage input
        yield Rejection(str(path), -1, f"unreadable {fmt} file: {type(e).__name__}: {str(e)[:300]}")
