"""The road to 10^8: the blockwise kNN loss equals the direct one, and benchmarks/scale_model.py's
formulas equal what the objects and the collectives measure (bytes, exactly)."""
import os
import sys

import pytest
import torch

from gloo import run_gloo
import grafit_core.losses as losses

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import scale_model  # noqa: E402


@pytest.mark.parametrize("batch,rows,classes,block", [(7, 50, 3, 6), (16, 200, 40, 13), (5, 33, 200, 1)])
def test_blockwise_knn_partials_equal_the_direct_ones(monkeypatch, batch, rows, classes, block):
    g = torch.Generator().manual_seed(batch)
    z = torch.randn(batch, 8, dtype=torch.float64, generator=g, requires_grad=True)
    bank = torch.randn(rows, 8, dtype=torch.float64, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    bank_labels = torch.randint(0, classes, (rows,), generator=g).int()
    indices = torch.randint(0, rows + 10, (batch,), generator=g)      # own rows in and out of this block, offset 5

    def run():
        lse_all, lse_same = losses.knn_partials(z, labels, indices, bank, bank_labels, 0.1, offset=5)
        grad, = torch.autograd.grad((1.3 * lse_all - torch.where(lse_same.isfinite(), lse_same, 0)).sum(), z)
        return lse_all, lse_same, grad

    direct = run()
    monkeypatch.setattr(losses, "KNN_BLOCK_ELEMENTS", batch * block)
    blocked = run()
    assert torch.equal(direct[1].isinf(), blocked[1].isinf())       # empty same-class sets stay exactly -inf
    for a, b in zip(direct, blocked):
        assert torch.allclose(torch.nan_to_num(a, neginf=0), torch.nan_to_num(b, neginf=0), atol=1e-12)
    if classes == 200:
        assert direct[1].isinf().any()                                 # the case is exercised


def test_blockwise_knn_loss_passes_gradcheck(monkeypatch):
    monkeypatch.setattr(losses, "KNN_BLOCK_ELEMENTS", 4 * 3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bank, bank_labels = torch.randn(11, 5, dtype=torch.float64, generator=g), torch.arange(11) % 3
    labels, indices = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 4, 9, 20])
    assert torch.autograd.gradcheck(lambda x: losses.knn_loss(x, labels, indices, bank, bank_labels, 0.5), (z,))


@pytest.mark.parametrize("n,world_size,levels,path_bytes", [(2_000, 2, 2, 30), (3_001, 3, 3, 41)])
def test_state_bytes_formula_equals_the_objects(n, world_size, levels, path_bytes):
    assert (scale_model.measured_state(n, world_size, 16, levels, path_bytes)
            == scale_model.state_bytes(n, world_size, 16, levels, path_bytes))


@pytest.mark.parametrize("n,world_size,batch", [(500, 2, 16), (301, 3, 24)])
def test_step_bytes_formula_equals_the_counted_collectives(n, world_size, batch):
    got = run_gloo(scale_model.counted_step, world_size, n, 8, batch, 6)
    assert len(set(got)) == 1                                          # every rank moves the same bytes
    moved, params = got[0]
    assert params == 6 * 8 + 8
    assert moved == scale_model.step_comm_bytes(batch, 8, world_size, params)


@pytest.mark.parametrize("world_size,classes", [(2, (10, 3)), (3, (20, 4, 2))])
def test_evaluation_bytes_formula_equals_the_counted_collectives(world_size, classes):
    got = run_gloo(scale_model.counted_eval, world_size, 600, 30, 8, 5, classes)
    assert len(set(got)) == 1 and got[0] == scale_model.eval_pass_bytes(30, 600, world_size, 5, classes, 1)
