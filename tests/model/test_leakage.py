"""No information crosses molecules, and no task target reaches the features that predict it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.schema import Sample
from tests.model.helpers import MAX_NEIGHBORS, RADIUS, build_net, make_batch, mixed_samples


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


def test_masked_element_does_not_reach_its_prediction():
    batch = make_batch(mixed_samples(), seed=4)
    net = build_net()
    masked = batch.mlm_mask.nonzero().squeeze(1)
    changed = batch.clone()
    changed.z[masked] = (batch.z[masked] % 50) + 1  # other true elements at every masked atom
    assert not torch.equal(changed.z, batch.z)
    with torch.no_grad():
        ref = net(batch)
        out = net(changed)
    assert not torch.equal(out.predictions["mlm"].target, ref.predictions["mlm"].target)
    assert torch.equal(out.predictions["mlm"].logits, ref.predictions["mlm"].logits)
    assert torch.equal(out.node_embeddings, ref.node_embeddings)
    # control: the same change at unmasked atoms is visible
    unmasked = (~batch.mlm_mask).nonzero().squeeze(1)[:5]
    control = batch.clone()
    control.z[unmasked] = (batch.z[unmasked] % 50) + 1
    with torch.no_grad():
        assert not torch.equal(net(control).predictions["mlm"].logits, ref.predictions["mlm"].logits)


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
    b.mlm_mask[:] = False
    b.sr_index = torch.tensor([[0], [1]])
    if expose_pair:  # control: what a leaking loader would hand over
        b.edge_index = torch.cat([b.edge_index, torch.tensor([[0, 1], [1, 0]])], dim=1)
    return b


def test_held_out_edge_length_does_not_reach_its_prediction():
    net = build_net()
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
