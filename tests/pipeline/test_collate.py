"""The batch contract of pipeline/collate.py on real demo molecules of all four domains: what the
model may read (inputs) never shows what it must predict (targets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.collate import INPUT_FIELDS, LR_STRATA_A, MASK_TOKEN, TARGET_FIELDS, CollateOptions
from tests.model.helpers import RADIUS, demo_samples, make_batch


def real_samples():
    return (
        demo_samples("protein/1ahsA.pdb", "protein", 1, max_atoms=2000)
        + demo_samples("rna/1Y26.pdb", "rna", 1, max_atoms=500)
        + demo_samples("small_molecule/qm9_sample.xyz", "small_molecule", 20)
        + demo_samples("metabolite/metabolites_ccd_hmdb.sdf", "metabolite", 10)
    )


@pytest.fixture(scope="module")
def samples():
    return real_samples()


@pytest.fixture(scope="module")
def batch(samples):
    return make_batch(samples, seed=0)


def codes(index: torch.Tensor, n: int) -> set[int]:
    """Unordered pair codes of a [2, K] index."""
    a, b = index.numpy().astype(np.int64)
    return set((np.minimum(a, b) * n + np.maximum(a, b)).tolist())


def clean(samples):
    """Clean coordinates, true elements and source bonds of the concatenated samples."""
    pos = np.concatenate([s.pos for s in samples])
    z = np.concatenate([s.z for s in samples])
    off = np.cumsum([0] + [s.num_atoms for s in samples])
    bonds = np.concatenate([s.bonds + o for s, o in zip(samples, off, strict=False)])
    return pos, z, bonds


def test_every_field_is_documented_as_input_or_target(batch):
    assert set(INPUT_FIELDS) | set(TARGET_FIELDS) | {"keys"} == set(batch.keys())
    assert not set(INPUT_FIELDS) & set(TARGET_FIELDS)


def test_held_out_pairs_are_in_no_input_graph(batch, samples):
    n = batch.num_nodes
    sr = codes(batch.sr_index, n)
    assert len(sr) > 50
    assert not sr & codes(batch.edge_index, n), "a held-out pair is a radius edge"
    assert not sr & codes(batch.bond_index, n), "a held-out pair is a bond"
    _, _, bonds = clean(samples)
    assert sr & codes(torch.from_numpy(bonds.T), n), "control: some held-out pairs are real bonds"
    masked = batch.mlm_mask
    assert not (masked[batch.sr_index[0]] | masked[batch.sr_index[1]]).any(), "a held-out pair touches a masked atom"


def test_masked_atoms_are_hidden_noised_and_unbonded(batch, samples):
    pos, z, _ = clean(samples)
    m = batch.mlm_mask.numpy()
    assert (batch.z.numpy()[m] == MASK_TOKEN).all() and (batch.z.numpy()[~m] == z[~m]).all()
    assert np.array_equal(batch.mlm_target.numpy(), z[m])
    shift = batch.pos.numpy() - pos
    assert (np.abs(shift[~m]) == 0).all()
    assert (np.abs(shift[m]) <= 1.0 + 1e-6).all() and np.abs(shift[m]).mean() > 0.4  # uniform in ±1 Å: mean 0.5
    assert not m[batch.bond_index.numpy()].any(), "a masked atom keeps a bond"
    # a masked atom's neighbours: exactly the atoms of its molecule within the radius of its noised position
    g = batch.batch.numpy()
    ei = batch.edge_index.numpy()
    for a in np.flatnonzero(m)[::7]:
        d = np.linalg.norm(batch.pos.numpy() - batch.pos.numpy()[a], axis=1)
        want = set(np.flatnonzero((d <= RADIUS) & (g == g[a])).tolist()) - {a}
        assert set(ei[0][ei[1] == a].tolist()) == want
    n = batch.num_nodes
    directed = ei[0].astype(np.int64) * n + ei[1]
    assert len(np.unique(directed)) == len(directed), "an edge is listed twice (a pair of two masked atoms?)"


def test_every_molecule_of_two_or_more_atoms_is_masked(batch):
    counts = (batch.ptr[1:] - batch.ptr[:-1]).numpy()
    per_mol = np.bincount(batch.batch.numpy()[batch.mlm_mask.numpy()], minlength=len(counts))
    assert (per_mol[counts >= 2] >= 1).all()
    assert np.array_equal(per_mol, np.clip(np.round(0.15 * counts), 1, counts - 1))


def test_long_range_pairs_are_unseen_and_spread_over_the_bins(batch, samples):
    n = batch.num_nodes
    lr = batch.lr_index
    g = batch.batch
    assert torch.equal(g[lr[0]], g[lr[1]]) and (lr[0] != lr[1]).all()
    masked = batch.mlm_mask
    unmasked_lr = lr[:, ~(masked[lr[0]] | masked[lr[1]])]
    assert unmasked_lr.shape[1] > 100 and (masked[lr[0]] | masked[lr[1]]).any()
    assert not codes(unmasked_lr, n) & codes(batch.edge_index, n), "an unnoised long-range pair is an input edge"
    pos, _, _ = clean(samples)
    torch.testing.assert_close(batch.lr_target, torch.from_numpy(np.linalg.norm(pos[lr[0]] - pos[lr[1]], axis=1)))
    # the protein fragment: uniform non-edge pairs crowd into a few strata, stratified ones spread out
    prot = (g[lr[0]] == 0).numpy()
    strata = np.asarray(LR_STRATA_A)
    rng = np.random.default_rng(0)
    na = samples[0].num_atoms
    i, j = rng.integers(0, na, 20_000), rng.integers(0, na, 20_000)
    uniform = np.linalg.norm(pos[i] - pos[j], axis=1)
    uniform = uniform[uniform > RADIUS]
    top = lambda d: np.bincount(np.searchsorted(strata, d)).max() / len(d)  # noqa: E731
    bound = 1.5 / len(np.unique(np.searchsorted(strata, uniform)))  # 1.5 x the share of a perfectly even spread
    assert top(batch.lr_target.numpy()[prot]) < bound < top(uniform), (top(batch.lr_target.numpy()[prot]), top(uniform))


def test_long_range_candidates_are_distinct_uniform_pairs():
    """Every ordered pair (i != j) of a molecule is an equally likely candidate, and no pair is kept twice."""
    from pipeline.collate import _long_range_pairs

    n_mol, n = 4000, 5
    counts, offsets = np.full(n_mol, n), np.arange(n_mol) * n
    pos = np.random.default_rng(0).normal(size=(n_mol * n, 3)).astype(np.float32)
    # all pairs beyond the radius and in one stratum; 2 candidates a molecule, both kept unless repeated
    opt = CollateOptions(radius_A=1e-3, lr_pairs_per_atom=0.4, lr_candidates=1, lr_strata_A=(1e6,))
    lr = _long_range_pairs(counts, offsets, pos, np.zeros(n_mol * n, bool), opt, np.random.default_rng(1))
    i, j = lr
    assert (i // n == j // n).all() and (i != j).all()
    code = np.minimum(i, j) * n_mol * n + np.maximum(i, j)
    assert len(np.unique(code)) == lr.shape[1]
    # 2 draws of 10 unordered pairs repeat with probability 1/10: the repeats are dropped, not kept twice
    assert 0.85 * 2 * n_mol < lr.shape[1] < 0.95 * 2 * n_mol, lr.shape
    ordered = np.bincount((i % n) * n + j % n, minlength=n * n).reshape(n, n)
    assert (np.diag(ordered) == 0).all()
    share = ordered[~np.eye(n, dtype=bool)] / lr.shape[1]  # 20 ordered pairs, 1/20 each (~7,200 draws)
    assert np.abs(share - 1 / 20).max() < 0.012, share


def test_edge_budget_holds_after_masked_atoms_are_rebuilt(batch, samples):
    """Masked atoms' pairs rebuilt on noised positions can outnumber their stored ones (which the packer counted):
    past ``max_edges`` the farthest rebuilt pairs go, and nothing else changes."""
    total = batch.edge_index.shape[1] + 2 * batch.sr_index.shape[1]
    tight = make_batch(samples, seed=0, max_edges=total - 100)
    assert tight.edge_index.shape[1] + 2 * tight.sr_index.shape[1] == total - 100
    for name in ("z", "pos", "mlm_mask", "sr_index", "lr_index", "bond_index"):
        assert torch.equal(getattr(tight, name), getattr(batch, name)), name
    n = batch.num_nodes
    gone = codes(batch.edge_index, n) - codes(tight.edge_index, n)
    assert len(gone) == 50 and not codes(tight.edge_index, n) - codes(batch.edge_index, n)
    masked = batch.mlm_mask.numpy()
    a, b = np.array(sorted(gone)) // n, np.array(sorted(gone)) % n
    assert (masked[a] | masked[b]).all()  # only rebuilt pairs (of a masked atom) were dropped
    pos = batch.pos.numpy()
    ei = tight.edge_index.numpy()
    kept_rebuilt = masked[ei[0]] | masked[ei[1]]
    kept_far = np.linalg.norm(pos[ei[0]] - pos[ei[1]], axis=1)[kept_rebuilt].max()
    assert np.linalg.norm(pos[a] - pos[b], axis=1).min() >= kept_far - 1e-5  # the farthest went
    assert torch.equal(make_batch(samples, seed=0, max_edges=total).edge_index, batch.edge_index)


def test_targets_are_clean_and_deterministic(batch, samples):
    pos, _, _ = clean(samples)
    sr = batch.sr_index.numpy()
    np.testing.assert_allclose(batch.sr_target.numpy(), np.linalg.norm(pos[sr[0]] - pos[sr[1]], axis=1), rtol=1e-6)
    again = make_batch(samples, seed=0)
    other = make_batch(samples, seed=1)
    for name in INPUT_FIELDS + TARGET_FIELDS:
        assert torch.equal(getattr(again, name), getattr(batch, name)), name
    assert not torch.equal(other.mlm_mask, batch.mlm_mask)


def test_bert_replacement_shares(samples):
    b = make_batch(samples * 4, seed=3, mask_random_fraction=0.1, mask_keep_fraction=0.1)
    shown = b.z[b.mlm_mask]
    tok = float((shown == MASK_TOKEN).float().mean())
    own = float((shown == b.mlm_target).float().mean())
    assert 0.74 < tok < 0.86 and 0.1 < own < 0.25  # a random element is sometimes the atom's own


def test_inference_batch_has_empty_targets_and_clean_inputs(samples):
    b = make_batch(samples, seed=0, mask_fraction=0.0, sr_fraction=0.0, lr_pairs_per_atom=0.0)
    pos, z, bonds = clean(samples)
    assert np.array_equal(b.z.numpy(), z) and np.array_equal(b.pos.numpy(), pos)
    assert b.bond_index.shape[1] == 2 * len(bonds)
    assert b.mlm_mask.sum() == 0 and b.sr_index.shape[1] == 0 and b.lr_index.shape[1] == 0


def test_empty_batch():
    b = make_batch([], seed=0)
    assert b.num_nodes == 0 and b.num_graphs == 0 and b.lr_index.shape == (2, 0)


def test_masked_neighbours_follow_the_cap_in_small_and_large_molecules(samples):
    """With a cap that binds (8 neighbours), a masked atom's rebuilt pairs are its 8 nearest atoms of its molecule
    within the radius, plus pairs found from other masked atoms' own lists; molecules of at most cap + 1 atoms (no
    tree) and larger ones (k-d tree) alike."""
    from pipeline.collate import masked_neighbours
    from pipeline.items import Block

    cap = 8
    opt = CollateOptions(radius_A=RADIUS, max_neighbors=cap)
    block = Block.from_samples(samples)
    pos, ptr = block.arrays["pos"], block.ptr["atom"]
    gid = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    atoms = np.flatnonzero(np.random.default_rng(1).random(len(pos)) < 0.2)
    pairs = masked_neighbours(pos, ptr, atoms, opt)
    found = {(int(a), int(b)) for a, b in pairs.tolist()}
    assert len(found) == len(pairs) and all(a < b for a, b in found)

    def nearest(a):
        d = np.linalg.norm(pos - pos[a], axis=1)
        d[(gid != gid[a]) | (np.arange(len(pos)) == a)] = np.inf
        order = np.argsort(d, kind="stable")[:cap]
        return set(order[d[order] <= RADIUS].tolist())

    lists = {int(a): nearest(a) for a in atoms}
    want = {(min(a, b), max(a, b)) for a, near in lists.items() for b in near}
    assert found == want
    sizes = np.diff(ptr)[gid[atoms]]
    assert (sizes <= cap + 1).any() and (sizes > cap + 1).any()  # both paths ran

    # the default cap (64) binds in none of the small molecules: half their atoms listed, so many pairs have two
    # listed ends; each within-radius pair touching a listed atom exactly once
    small = np.flatnonzero(np.diff(ptr)[gid] <= 65)
    atoms = small[np.random.default_rng(2).random(len(small)) < 0.5]
    pairs = masked_neighbours(pos, ptr, atoms, CollateOptions(radius_A=RADIUS))
    found = [tuple(x) for x in pairs.tolist()]
    listed = np.zeros(len(pos), bool)
    listed[atoms] = True
    i, j = np.triu_indices(len(pos), 1)
    near = (gid[i] == gid[j]) & (listed[i] | listed[j]) & (np.linalg.norm(pos[i] - pos[j], axis=1) <= RADIUS)
    assert len(found) == len(set(found)) and set(found) == set(zip(i[near].tolist(), j[near].tolist(), strict=True))
    assert (listed[i[near]] & listed[j[near]]).sum() > 100
