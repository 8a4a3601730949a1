"""Pretrained backbones without Lightning: export to safetensors + config, load back, embed a batch.

An export is a folder with ``backbone.safetensors`` (the encoder and ESA weights of
:class:`~model.network.MolecularESA`, no task heads) and ``model_config.json`` (the
:class:`~model.config.ModelConfig` fields, plus the format marker). Both are pickle-free: loading one
never runs code from the file.

    python -m model.pretrained CHECKPOINT.ckpt OUT_DIR      # export a training.run checkpoint

    from model.pretrained import load_pretrained
    net = load_pretrained("OUT_DIR")                        # MolecularESA (tasks=None), eval mode
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.network import MolecularESA

WEIGHTS_NAME = "backbone.safetensors"
CONFIG_NAME = "model_config.json"
EXPORT_FORMAT = "molstream-backbone-1"
BACKBONE_PREFIXES = ("encoder.", "backbone.")


def backbone_state(net: MolecularESA) -> dict[str, torch.Tensor]:
    """The encoder + backbone tensors of ``net`` (task heads left out), contiguous, on CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}


def export_backbone(net: MolecularESA, out_dir: str | Path) -> Path:
    """Write ``out_dir/backbone.safetensors`` and ``out_dir/model_config.json``; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(backbone_state(net), str(out / WEIGHTS_NAME), metadata={"format": EXPORT_FORMAT})
    cfg = {"format": EXPORT_FORMAT, "model": asdict(net.cfg)}
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    return out


def _model_config(d: dict, where: str) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: model config has fields {unknown} this version does not know; "
                         "export it again with this version, or install the release that wrote it")
    return ModelConfig(**d)


def read_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and backbone tensors from a training.run ``.ckpt``, loaded with ``weights_only=True``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # foreign or broken files
        raise ValueError(f"{path}: not a readable training.run checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{path}: checkpoint has no model hyper-parameters / state_dict; is it from training.run?")
    cfg = _model_config(dict(hp["model"]), str(path))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items()
             if k.startswith("net.") and k[len("net."):].startswith(BACKBONE_PREFIXES)}
    return cfg, state


def read_export(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and tensors of an export folder (or its ``backbone.safetensors``)."""
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / WEIGHTS_NAME
    cfg_path = folder / CONFIG_NAME
    if not weights.exists() or not cfg_path.exists():
        raise FileNotFoundError(f"{path}: expected {WEIGHTS_NAME} and {CONFIG_NAME} side by side "
                                "(written by `python -m model.pretrained CKPT OUT_DIR`)")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, this version reads {EXPORT_FORMAT!r}")
    return _model_config(meta["model"], str(cfg_path)), load_file(str(weights))


def read_pretrained(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and backbone tensors from a ``.ckpt``, an export folder or its ``.safetensors``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint or exported backbone at {p}")
    if p.is_file() and p.suffix == ".ckpt":
        return read_checkpoint(p)
    return read_export(p)


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> MolecularESA:
    """The backbone (encoder + ESA, no task heads) of a ``.ckpt`` or an export, in eval mode; no Lightning."""
    cfg, state = read_pretrained(path)
    net = MolecularESA(cfg, tasks=None)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(BACKBONE_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.to(map_location).eval()


def embed_batch(net: MolecularESA, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(node [N, D], graph [G, Dg]) embeddings of the molecules of ``batch``.

    Reads only the input fields (z, pos, batch, ptr, edge_index, bond_index; see ``pipeline.collate``). The
    batch must show the clean molecules: one built for pretraining (masked atoms, whose types and
    positions the loader has already replaced) is refused, since its inputs are no longer the molecule.
    """
    mask = getattr(batch, "mlm_mask", None)
    if mask is not None and bool(mask.any()):
        raise ValueError(
            f"embed_batch got a pretraining batch ({int(mask.sum())} masked atoms: their types and positions are "
            "replaced in the inputs); build inference batches with data.mask_fraction=0 (training.embed does)"
        )
    out = net(batch, with_tasks=False)
    return out.node_embeddings, out.graph_embeddings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.pretrained",
                                description="Export the backbone of a training.run checkpoint as safetensors + model_config.json.")
    p.add_argument("checkpoint", type=Path, help="a .ckpt written by training.run (or training.finetune)")
    p.add_argument("out_dir", type=Path, help="output folder")
    a = p.parse_args(argv)
    try:
        net = load_pretrained(a.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    out = export_backbone(net, a.out_dir)
    sys.stdout.write(f"wrote {out / WEIGHTS_NAME} ({sum(v.numel() for v in backbone_state(net).values())} parameters) "
                     f"and {out / CONFIG_NAME}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
