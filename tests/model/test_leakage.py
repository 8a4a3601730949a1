"""No information crosses molecules, and no task target can be read from the input fields.

The batch contract (pipeline/collate.py): the encoder and backbone read input fields only; targets are
held apart. These tests check it on real demo molecules: the model's outputs do not move when only a
target changes, no held-out pair is in any input graph, and a simple classifier on a masked atom's own
input features does not recover its element (measured: ~0.86-0.88 accuracy without coordinate noise).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model.encoder import geometry_features
from pipeline.schema import Sample
from tests.model.helpers import MAX_NEIGHBORS, RADIUS, build_net, demo_samples, make_batch, mixed_samples


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_changing_one_molecule_leaves_the_others_bit_identical(backend):
    batch = make_batch(mixed_samples(), seed=2)
    net = build_net()
    a0, a1 = int(batch.ptr[0]), int(batch.ptr[1])  # molecule A: the protein fragment
    changed = batch.clone()
    g = torch.Generator().manual_seed(0)
    changed.pos[a0:a1] += torch.randn(a1 - a0, 3, generator=g)
    changed.z[a0:a1] = torch.randint(1, 40, (a1 - a0,), generator=g)
    with torch.no_grad():
        ref = net(batch, backend=backend)
        out = net(changed, backend=backend)
    others = batch.batch != 0
    assert not torch.equal(out.node_embeddings[~others], ref.node_embeddings[~others]), "A itself must change"
    assert torch.equal(out.node_embeddings[others], ref.node_embeddings[others])
    assert torch.equal(out.graph_embeddings[1:], ref.graph_embeddings[1:])
    for task, p in ref.predictions.items():
        keep = p.graph != 0
        assert torch.equal(out.predictions[task].logits[keep], p.logits[keep]), task


def randomised_net(seed: int = 0, **kw):
    """A test net whose embeddings and Gaussian pair affine are random (their init hides type leaks: the
    pair affine starts as the identity for every type pair)."""
    net = build_net(seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    enc = net.encoder
    with torch.no_grad():
        for w in (enc.type_embed.weight, enc.period_embed.weight):
            w.copy_(torch.randn(w.shape, generator=g))
        enc.gaussian.mul.weight.copy_(1 + 0.5 * torch.randn(enc.gaussian.mul.weight.shape, generator=g))
        enc.gaussian.bias.weight.copy_(torch.randn(enc.gaussian.bias.weight.shape, generator=g))
    return net


# elements of other periods: H (1), C (2), S (3), Br (4), I (5)
_ACROSS_PERIODS = {1: 35, 6: 16, 7: 53, 8: 34, 16: 1, 15: 6}


def _swap_elements(samples: list[Sample], atoms: np.ndarray, ptr: np.ndarray) -> list[Sample]:
    """The same samples with the given (batch) atoms turned into elements of another period."""
    out = []
    for k, s in enumerate(samples):
        z = s.z.copy()
        local = atoms[(atoms >= ptr[k]) & (atoms < ptr[k + 1])] - ptr[k]
        z[local] = [_ACROSS_PERIODS.get(int(v), 1 if v != 1 else 9) for v in z[local]]
        out.append(Sample(**{**s.__dict__, "z": z}))
    return out


@pytest.mark.parametrize("distance_bias", [False, True])
def test_masked_elements_do_not_reach_any_output(distance_bias):
    """Masked atoms' true elements moved across periods, embeddings and pair affine randomised: every output
    that is not a target is bit-identical; the same change at unmasked atoms changes them (control)."""
    samples = mixed_samples()
    ref_batch = make_batch(samples, seed=4)
    ptr = ref_batch.ptr.numpy()
    masked = ref_batch.mlm_mask.nonzero().squeeze(1).numpy()
    changed = make_batch(_swap_elements(samples, masked, ptr), seed=4)
    assert torch.equal(changed.mlm_mask, ref_batch.mlm_mask)
    assert not torch.equal(changed.mlm_target, ref_batch.mlm_target), "the targets differ"
    for name in ("z", "pos", "edge_index", "edge_is_bond", "bond_index"):  # the input fields are identical
        assert torch.equal(getattr(changed, name), getattr(ref_batch, name)), name
    net = randomised_net(distance_bias=distance_bias)
    with torch.no_grad():
        ref, out = net(ref_batch), net(changed)
    assert torch.equal(out.node_embeddings, ref.node_embeddings)
    assert torch.equal(out.graph_embeddings, ref.graph_embeddings)
    for task, p in ref.predictions.items():
        assert torch.equal(out.predictions[task].logits, p.logits), task
    unmasked = np.flatnonzero(~ref_batch.mlm_mask.numpy())[:5]
    control = make_batch(_swap_elements(samples, unmasked, ptr), seed=4)
    with torch.no_grad():
        assert not torch.equal(net(control).node_embeddings, ref.node_embeddings)


def _triangle(angle_deg: float) -> Sample:
    """Atoms i=0 and j=1 both 1.5 Å from k=2; the i-j distance depends only on the angle at k."""
    t = math.radians(angle_deg)
    pos = np.array([[1.5, 0, 0], [1.5 * math.cos(t), 1.5 * math.sin(t), 0], [0, 0, 0]], np.float32)
    return Sample(
        key=f"tri{angle_deg:g}", domain="small_molecule", z=np.array([6, 8, 6], np.uint8), pos=pos,
        bonds=np.array([[0, 2], [1, 2]], np.int32), bond_order=np.ones(2, np.uint8),
        edges=np.array([[0, 2], [1, 2]], np.int32),  # the i-j pair is held out: not an edge
        radius_A=RADIUS, max_neighbors=MAX_NEIGHBORS,
    )


def _triangle_batch(angle_deg: float, expose_pair: bool = False):
    b = make_batch([_triangle(angle_deg)], seed=0, sr_fraction=0.0, mask_fraction=0.0)
    b.sr_index = torch.tensor([[0], [1]])
    b.sr_target = (b.pos[0] - b.pos[1]).norm().reshape(1)
    if expose_pair:  # control: what a leaking loader would hand over
        b.edge_index = torch.cat([b.edge_index, torch.tensor([[0, 1], [1, 0]])], dim=1)
    return b


@pytest.mark.parametrize("distance_bias", [False, True])
def test_held_out_edge_length_does_not_reach_its_prediction(distance_bias):
    net = build_net(distance_bias=distance_bias)
    near, far = _triangle_batch(60.0), _triangle_batch(110.0)  # i-j: 1.50 Å vs 2.46 Å
    with torch.no_grad():
        p_near = net(near).predictions["short_range"]
        p_far = net(far).predictions["short_range"]
    assert p_near.target.item() != p_far.target.item(), "the targets differ"
    torch.testing.assert_close(p_near.logits, p_far.logits, rtol=1e-6, atol=1e-6)
    # control: when the pair is an edge, its length does change the prediction
    with torch.no_grad():
        c_near = net(_triangle_batch(60.0, True)).predictions["short_range"].logits
        c_far = net(_triangle_batch(110.0, True)).predictions["short_range"].logits
    assert (c_near - c_far).abs().max() > 1e-4


# ------------------------------------------------------------------ a classifier on the inputs

# per domain: (training files, held-out files, records per file, atoms kept per record)
LEAK_SETS = {
    "protein": (["protein/1ahsA.pdb", "protein/1dx5I.pdb", "protein/1eteA.pdb"], ["protein/2cviA.pdb", "protein/3fhkA.pdb"]),
    "small_molecule": (["small_molecule/qm9_sample.xyz"], None),
    "metabolite": (["metabolite/metabolites_ccd_hmdb.sdf"], None),
    "rna": (["rna/1JZC.pdb", "rna/1Y26.pdb", "rna/1a51_00_A.pdb"], ["rna/1dqf.pdb", "rna/434d.pdb"]),
}


def leak_split(domain: str) -> tuple[list[Sample], list[Sample]]:
    """Training and held-out real molecules of a domain (big ones cropped to 600 atoms; QM9/HMDB: 120 + 120)."""
    train, held = LEAK_SETS[domain]
    if held is None:
        s = demo_samples(train[0], domain, 240)
        return s[:120], s[120:]
    return ([x for f in train for x in demo_samples(f, domain, 1, max_atoms=600)],
            [x for f in held for x in demo_samples(f, domain, 1, max_atoms=600)])


def masked_atom_features(batch) -> tuple[np.ndarray, np.ndarray]:
    """A masked atom's own input features (bond count, neighbour counts, nearest and mean close distance,
    from the input ``pos``/``edge_index``/``bond_index``) and its true element."""
    src, dst = batch.edge_index
    d = (batch.pos[dst] - batch.pos[src]).norm(dim=-1)
    f = geometry_features(batch.num_nodes, batch.edge_index, d, batch.bond_index, 6.0, 3.0)
    return f[batch.mlm_mask].numpy(), batch.mlm_target.numpy()


def leakage(domain: str, **opts) -> tuple[float, float]:
    """(accuracy of a logistic regression on held-out molecules' masked atoms, majority-class accuracy)."""
    train, held = leak_split(domain)
    x, y = zip(*(masked_atom_features(make_batch(train, seed=s, **opts)) for s in range(4)), strict=True)
    xt, yt = zip(*(masked_atom_features(make_batch(held, seed=10 + s, **opts)) for s in range(2)), strict=True)
    x, y, xt, yt = np.concatenate(x), np.concatenate(y), np.concatenate(xt), np.concatenate(yt)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    vals, cnt = np.unique(y, return_counts=True)
    return float(clf.score(xt, yt)), float((yt == vals[cnt.argmax()]).mean())


@pytest.mark.parametrize("domain", list(LEAK_SETS))
def test_masked_atoms_own_inputs_do_not_give_their_element_away(domain):
    acc, majority = leakage(domain)
    assert acc <= majority + 0.2, (domain, acc, majority)


def test_leakage_classifier_can_see_a_leak():
    """Control: without coordinate noise the same classifier recovers the element (bond lengths show it)."""
    acc, majority = leakage("small_molecule", mask_noise_A=0.0)
    assert acc > majority + 0.25, (acc, majority)
