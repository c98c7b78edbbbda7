"""Tests of grafit_core.models (trunks, heads, EMA target), grafit_core.memory (the memory M of
paper §3.1) and the gradient flow of methods/base.py's training step."""

import math

import pytest
import torch
import torch.nn as nn

from grafit_core.config import config_from_dict
from grafit_core.losses import knn_loss
from grafit_core.memory import MemoryBank
from grafit_core.methods import get_method
from grafit_core.models import GrafitNet, TargetNet, build_projector, build_trunk, ema_tau

torch.set_num_threads(1)

R2 = 1 / math.sqrt(2)   # 0.7071067811865476


def _small_net(projector="mlp", predictor=True, seed=0):
    torch.manual_seed(seed)
    trunk, dim = build_trunk("conv4", 1, False, width=4)
    return GrafitNet(trunk, dim, projector, embed_dim=6, hidden_dim=10, predictor=predictor)


# ====== trunks ======
@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_small_stem(name, dim):
    torch.manual_seed(0)
    trunk, feat_dim = build_trunk(name, 3, small_stem=True)
    assert feat_dim == dim
    assert isinstance(trunk.conv1, nn.Conv2d)
    assert trunk.conv1.kernel_size == (3, 3) and trunk.conv1.stride == (1, 1)
    assert trunk.conv1.in_channels == 3
    assert isinstance(trunk.maxpool, nn.Identity)
    trunk.eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, dim)


def test_resnet18_small_stem_one_channel():
    trunk, feat_dim = build_trunk("resnet18", 1, small_stem=True)
    assert trunk.conv1.in_channels == 1 and trunk.conv1.kernel_size == (3, 3) and trunk.conv1.stride == (1, 1)
    trunk.eval()
    with torch.no_grad():
        assert trunk(torch.randn(2, 1, 16, 16)).shape == (2, feat_dim) == (2, 512)


def test_conv4_on_one_channel_28px():
    torch.manual_seed(0)
    trunk, feat_dim = build_trunk("conv4", 1, False, width=8)
    out = trunk(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, feat_dim)
    assert torch.isfinite(out).all()


def test_unknown_trunk_raises():
    with pytest.raises(ValueError):
        build_trunk("vgg", 3, False)


# ====== heads ======
def test_projector_mlp_is_linear_bn_relu_linear():
    proj, out_dim = build_projector("mlp", 12, 20, 7)
    assert out_dim == 7
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (proj[0].in_features, proj[0].out_features) == (12, 20)
    assert proj[1].num_features == 20
    assert (proj[3].in_features, proj[3].out_features) == (20, 7)
    assert proj(torch.randn(4, 12)).shape == (4, 7)


def test_projector_linear_and_none():
    proj, out_dim = build_projector("linear", 12, 20, 7)
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features, out_dim) == (12, 7, 7)
    proj, out_dim = build_projector("none", 12, 20, 7)
    assert isinstance(proj, nn.Identity) and out_dim == 12
    x = torch.randn(3, 12)
    assert torch.equal(proj(x), x)
    with pytest.raises(ValueError):
        build_projector("conv", 12, 20, 7)


@pytest.mark.parametrize("projector,dim", [("mlp", 6), ("linear", 6), ("none", 8)])
def test_embed_is_l2_normalised(projector, dim):
    net = _small_net(projector)
    x = torch.randn(5, 1, 28, 28) * 10
    for mode in (net.train, net.eval):
        mode()
        e = net.embed(x)
        assert e.shape == (5, dim)
        assert torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
        # forward's z is g_theta as well
        assert torch.allclose(net(x)["z"].norm(dim=1), torch.ones(5), atol=1e-5)
    # embed is normalize(P(f(x))) and not, e.g., normalize(f(x))
    net.eval()
    with torch.no_grad():
        raw = net.projector(net.trunk(x))
    assert torch.allclose(net.embed(x), raw / raw.norm(dim=1, keepdim=True), atol=1e-6)


# ====== EMA target ======
def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("projector", ["mlp", "linear", "none"])
def test_target_update_is_exact_ema_and_copies_buffers(projector):
    online = _small_net(projector)
    target = TargetNet(online)
    for p in target.parameters():
        assert not p.requires_grad
    _perturb(online, 1)
    _perturb(target, 2)
    # change the online BN statistics and num_batches_tracked
    online.train()
    with torch.no_grad():
        online(torch.randn(4, 1, 28, 28))
        online(torch.randn(4, 1, 28, 28))
    online_parts = [online.trunk, online.inst_projector if online.inst_projector is not None else online.projector]
    online_params = [p for m in online_parts for p in m.parameters()]
    online_buffers = [b for m in online_parts for b in m.buffers()]
    target_params = [p for m in (target.trunk, target.projector) for p in m.parameters()]
    target_buffers = [b for m in (target.trunk, target.projector) for b in m.buffers()]
    assert len(target_params) == len(online_params) == len(list(target.parameters())) > 0
    assert len(target_buffers) == len(online_buffers) > 0
    before_t = [p.detach().double().clone() for p in target_params]
    before_o = [p.detach().clone() for p in online.parameters()]
    tau = 0.7
    target.update(online, tau)
    for p_t, old, p_o in zip(target_params, before_t, online_params):
        assert p_t.shape == p_o.shape
        expected = tau * old + (1 - tau) * p_o.detach().double()
        assert torch.allclose(p_t.double(), expected, rtol=0, atol=1e-6)
    for b_t, b_o in zip(target_buffers, online_buffers):
        assert torch.equal(b_t, b_o)
    nbt = [b for m in online_parts for n, b in m.named_buffers() if n.endswith("num_batches_tracked")]
    assert nbt and all(int(b) >= 2 for b in nbt)       # the buffers did change before the copy
    # online untouched
    for p, old in zip(online.parameters(), before_o):
        assert torch.equal(p.detach(), old)


def test_target_update_tau_extremes():
    online = _small_net()
    target = TargetNet(online)
    _perturb(online, 3)
    before = [p.clone() for p in target.parameters()]
    target.update(online, 1.0)                     # xi <- xi
    for p, old in zip(target.parameters(), before):
        assert torch.equal(p, old)
    target.update(online, 0.0)                     # xi <- theta
    for p_t, p_o in zip(target.parameters(), [p for m in (online.trunk, online.projector) for p in m.parameters()]):
        assert torch.equal(p_t, p_o.detach())


def test_target_starts_as_copy_of_online():
    online = _small_net()
    target = TargetNet(online)
    x = torch.randn(3, 1, 28, 28)
    online.eval()
    target.eval()
    with torch.no_grad():
        assert torch.allclose(target(x), online.projector(online.trunk(x)), atol=1e-6)


def test_ema_tau_cosine_hand_values():
    # tau = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2 with tau_base = 0.99, K = 100
    assert ema_tau(0.99, 0, 100, "cosine") == pytest.approx(0.99, abs=1e-12)        # cos 0 = 1
    assert ema_tau(0.99, 100, 100, "cosine") == pytest.approx(1.0, abs=1e-12)      # cos pi = -1
    assert ema_tau(0.99, 50, 100, "cosine") == pytest.approx(0.995, abs=1e-12)     # (1 + 0.99)/2
    # k = 25: 1 - 0.01 * (cos(pi/4) + 1)/2 = 1 - 0.01 * 0.8535533905932737 = 0.9914644660940673
    assert ema_tau(0.99, 25, 100, "cosine") == pytest.approx(0.9914644660940673, abs=1e-12)
    # tau_base = 0.996, K = 1000, k = 500 -> (1 + 0.996)/2 = 0.998
    assert ema_tau(0.996, 500, 1000, "cosine") == pytest.approx(0.998, abs=1e-12)
    assert ema_tau(0.9, 10, 10) == pytest.approx(1.0, abs=1e-12)                   # default cosine


def test_ema_tau_constant():
    for step in (0, 3, 50, 100):
        assert ema_tau(0.99, step, 100, "constant") == 0.99


# ====== memory bank ======
def test_memory_fill_writes_rows_as_they_are():
    mem = MemoryBank(torch.tensor([0, 1, 0, 2]), 2)
    assert len(mem) == 4 and not mem.is_full()
    mem.fill(torch.tensor([2, 0]), torch.tensor([[3.0, 4.0], [0.5, -0.25]]))
    assert mem.bank.tolist() == [[0.5, -0.25], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]
    assert not mem.is_full()
    mem.fill(torch.tensor([1, 3]), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert mem.is_full()
    assert mem.bank.tolist() == [[0.5, -0.25], [1.0, 0.0], [3.0, 4.0], [0.0, 2.0]]


def test_memory_update_renormalized_hand_values():
    mem = MemoryBank(torch.tensor([0, 0, 1]), 2)
    mem.fill(torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]))
    mem.update(torch.tensor([0, 1]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    # row 0: ((1,0)+(0,1))/2 = (0.5,0.5) -> /0.70711 = (1/sqrt2, 1/sqrt2)
    # row 1: ((0.6,0.8)+(1,0))/2 = (0.8,0.4), norm sqrt(0.8) = 0.894427 -> (0.894427, 0.447214)
    assert mem.bank[0].tolist() == pytest.approx([R2, R2], abs=1e-6)
    assert mem.bank[1].tolist() == pytest.approx([0.8944272, 0.4472136], abs=1e-6)
    assert mem.bank[2].tolist() == [0.0, -1.0]                         # untouched


def test_memory_update_literal_paper_rule():
    mem = MemoryBank(torch.tensor([0, 0, 1]), 2, renormalize=False)
    mem.fill(torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]))
    mem.update(torch.tensor([0, 1]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    # (m + z)/2: (0.5, 0.5) and (0.8, 0.4)
    assert mem.bank[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-7)
    assert mem.bank[1].tolist() == pytest.approx([0.8, 0.4], abs=1e-7)
    assert mem.bank[2].tolist() == [0.0, -1.0]
    # a second update of row 0 with z = (1, 0): ((0.5,0.5)+(1,0))/2 = (0.75, 0.25)
    mem.update(torch.tensor([0]), torch.tensor([[1.0, 0.0]]))
    assert mem.bank[0].tolist() == pytest.approx([0.75, 0.25], abs=1e-7)


def test_memory_update_duplicate_indices_use_first_occurrence():
    for renorm, expected in ((True, [R2, R2]), (False, [0.5, 0.5])):
        mem = MemoryBank(torch.tensor([0, 1, 1]), 2, renormalize=renorm)
        mem.fill(torch.arange(3), torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        # row 0 appears twice: first z = (0,1), second z = (-1,0). Written once with the first:
        # not ((m+z1)/2 + z2)/2 and not the last occurrence
        mem.update(torch.tensor([0, 2, 0]), torch.tensor([[0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]]))
        assert mem.bank[0].tolist() == pytest.approx(expected, abs=1e-6)
        assert mem.bank[1].tolist() == [0.0, 1.0]
        assert mem.bank[2].tolist() == pytest.approx([-1.0, 0.0], abs=1e-6)
    mem = MemoryBank(torch.tensor([0, 1]), 2)
    mem.fill(torch.tensor([1, 1, 0]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert mem.bank.tolist() == [[5.0, 6.0], [1.0, 2.0]]


def test_memory_offset_writes_only_own_block():
    # a shard owning global rows [5, 8)
    mem = MemoryBank(torch.tensor([0, 1, 2]), 2, offset=5, renormalize=False)
    mem.fill(torch.tensor([4, 5, 6, 7, 8, 0]),
             torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [9.0, 9.0], [9.0, 9.0]]))
    assert mem.bank.tolist() == [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    assert mem.is_full()
    mem.update(torch.tensor([8, 6, 2, 7, 4]),
               torch.tensor([[9.0, 9.0], [1.0, 1.0], [9.0, 9.0], [1.0, 0.0], [9.0, 9.0]]))
    # row 6 (local 1): ((0,1)+(1,1))/2 = (0.5, 1); row 7 (local 2): ((-1,0)+(1,0))/2 = (0, 0)
    assert mem.bank.tolist() == [[1.0, 0.0], [0.5, 1.0], [0.0, 0.0]]


def test_memory_update_detached_from_graph():
    mem = MemoryBank(torch.tensor([0, 1]), 2)
    mem.fill(torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([[0.0, 1.0]], requires_grad=True)
    mem.update(torch.tensor([1]), z * 2)
    assert not mem.bank.requires_grad and mem.bank.grad_fn is None
    assert mem.bank[1].tolist() == pytest.approx([0.0, 1.0], abs=1e-7)   # normalize((0,1)+(0,2))/2) = (0,1)


def test_memory_knn_loss_matches_function():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (10,), generator=g)
    mem = MemoryBank(labels, 4)
    mem.fill(torch.arange(10), torch.randn(10, 4, generator=g))
    z = torch.randn(3, 4, generator=g)
    idx = torch.tensor([1, 4, 7])
    assert mem.knn_loss(z, labels[idx], idx, 0.1).item() == pytest.approx(
        knn_loss(z, labels[idx], idx, mem.bank, labels, 0.1).item(), rel=1e-6)


# ====== gradient flow through Method.training_step ======
def test_training_step_gradients_and_memory():
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32}})
    method = get_method("grafit")(cfg, in_channels=1, num_classes=4)
    method.train()
    N, B, T = 12, 4, 2
    bank_labels = torch.tensor([0, 1, 2, 3] * 3)
    memory = MemoryBank(bank_labels, 16)
    memory.fill(torch.arange(N), torch.nn.functional.normalize(torch.randn(N, 16), dim=1))
    bank_before = memory.bank.clone()
    indices = torch.tensor([1, 4, 6, 11])
    labels = bank_labels[indices]
    views = torch.randn(B, T, 1, 28, 28)

    loss, parts, z = method.training_step(views, labels, indices, memory)
    assert set(parts) == {"knn", "inst"}
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()

    net = method.net
    for name, module in (("trunk", net.trunk), ("projector", net.projector), ("predictor", net.predictor)):
        params = list(module.named_parameters())
        assert params, name
        for pname, p in params:
            assert p.grad is not None, f"{name}.{pname} has no grad"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname}"
            if p.dim() >= 2:       # every weight matrix / kernel receives gradient
                assert p.grad.abs().sum() > 0, f"{name}.{pname} has a zero grad"
        assert sum(p.grad.abs().sum() for _, p in params) > 0, name

    assert method.target is not None
    target_params = list(method.target.parameters())
    assert target_params
    for p in target_params:
        assert p.grad is None and not p.requires_grad

    assert memory.bank.grad is None and not memory.bank.requires_grad
    assert torch.equal(memory.bank, bank_before)

    # the embeddings returned for the memory: B x d, unit norm, detached
    assert z.shape == (B, 16) and not z.requires_grad
    assert torch.allclose(z.norm(dim=1), torch.ones(B), atol=1e-5)
    memory.update(indices, z)
    changed = (memory.bank != bank_before).any(dim=1)
    assert changed.nonzero().squeeze(1).tolist() == indices.tolist()
    expected = torch.nn.functional.normalize((bank_before[indices] + z) / 2, dim=1)
    assert torch.allclose(memory.bank[indices], expected, atol=1e-6)


def test_training_step_knn_part_equals_mean_over_views():
    # L_knn on each of the T views, averaged (checked against knn_loss on the views' z)
    torch.manual_seed(1)
    cfg = config_from_dict({"model": {"trunk": "conv4", "width": 8, "embed_dim": 16, "hidden_dim": 32}})
    method = get_method("grafit")(cfg, in_channels=1, num_classes=4)
    method.eval()
    bank_labels = torch.tensor([0, 1, 2] * 3)
    memory = MemoryBank(bank_labels, 16)
    memory.fill(torch.arange(9), torch.randn(9, 16))
    indices = torch.tensor([0, 4, 8])
    views = torch.randn(3, 3, 1, 28, 28)
    with torch.no_grad():
        _, parts, _ = method.training_step(views, bank_labels[indices], indices, memory)
        zs = [method.net.embed(views[:, t]) for t in range(3)]
    expected = sum(knn_loss(zt, bank_labels[indices], indices, memory.bank, bank_labels, cfg.method.sigma).item()
                   for zt in zs) / 3
    assert parts["knn"] == pytest.approx(expected, rel=1e-5)
