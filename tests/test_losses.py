"""Tests of grafit_core.losses (paper §3.1, eq. 1-3) against hand-worked values and float64 Python loops.

The references below are written independently of the library: explicit loops over the
queries i and memory rows j with math.exp / math.log (shifted by the row maximum so that
sigma = 0.01 does not overflow), returning None for a query whose class has no other row.
"""

import math

import pytest
import torch

from grafit_core.losses import instance_loss, knn_loss, knn_partials, knn_terms

torch.set_num_threads(1)

E = math.e


# ====== float64 Python references ======
def _cos(a, b):
    a, b = [float(x) for x in a], [float(x) for x in b]
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ref_knn_term(z_i, label_i, index_i, bank, bank_labels, sigma, offset=0):
    """-log sum_{j != i, y_j = y_i} p_ij, p_ij ∝ exp(cos/sigma) over j != i; None if no same-class j."""
    logits, same = [], []
    for j in range(len(bank)):
        if offset + j == int(index_i):
            continue
        logits.append(_cos(z_i, bank[j]) / sigma)
        same.append(int(bank_labels[j]) == int(label_i))
    if not any(same):
        return None
    mx = max(logits)
    s_all = sum(math.exp(l - mx) for l in logits)
    s_same = sum(math.exp(l - mx) for l, s in zip(logits, same) if s)
    return -(math.log(s_same) - math.log(s_all))


def ref_knn_loss(z, labels, indices, bank, bank_labels, sigma):
    terms = [ref_knn_term(z[i].tolist(), labels[i], indices[i], bank.tolist(), bank_labels.tolist(), sigma)
             for i in range(len(z))]
    valid = [t for t in terms if t is not None]
    return sum(valid) / len(valid) if valid else 0.0


def ref_lse(z_i, label_i, index_i, bank, bank_labels, sigma, offset):
    """(log sum_{j != i} e^{cos/sigma}, log sum_{j != i, same} e^{cos/sigma}) over a block; -inf if empty."""
    all_l, same_l = [], []
    for j in range(len(bank)):
        if offset + j == int(index_i):
            continue
        l = _cos(z_i, bank[j]) / sigma
        all_l.append(l)
        if int(bank_labels[j]) == int(label_i):
            same_l.append(l)

    def lse(ls):
        if not ls:
            return -math.inf
        mx = max(ls)
        return mx + math.log(sum(math.exp(l - mx) for l in ls))
    return lse(all_l), lse(same_l)


def ref_instance_loss(preds, targets):
    """Eq. 1 per sample, averaged over the batch, in float64 loops."""
    T, B = len(preds), preds[0].shape[0]
    total = 0.0
    for b in range(B):
        s = 0.0
        for i in range(T):
            for j in range(T):
                if i != j:
                    s += _cos(preds[i][b].tolist(), targets[j][b].tolist())
        total += -s / (T * (T - 1))
    return total / B


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def _random_case(seed, B=7, N=23, d=5, classes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, d, generator=g, dtype=dtype)
    bank = torch.randn(N, d, generator=g, dtype=dtype)
    bank_labels = torch.randint(0, classes, (N,), generator=g)
    indices = torch.randperm(N, generator=g)[:B]
    labels = bank_labels[indices].clone()
    return z, labels, indices, bank, bank_labels


# ====== knn_loss: hand-worked ======
def test_knn_hand_own_row_excluded_sigma1():
    # query (1,0), label 0, own row 0. Bank rows at 0°, 90°, 180°: cos = 1, 0, -1; labels 0, 1, 0.
    # j != 0: exp(0) = 1 (label 1), exp(-1) (label 0).
    # loss = -log(e^-1 / (1 + e^-1)) = log(1 + e) = 1.3132616875182228
    z = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([_unit(0), _unit(90), _unit(180)])
    loss = knn_loss(z, torch.tensor([0]), torch.tensor([0]), bank, torch.tensor([0, 1, 0]), 1.0)
    assert loss.item() == pytest.approx(1.3132616875182228, rel=1e-6)


def test_knn_hand_index_outside_bank_excludes_nothing():
    # Same bank, index 5 (not in this bank): all three rows count.
    # all = e + 1 + e^-1 = 4.0861613, same (rows 0, 2) = e + e^-1 = 3.0861613
    # loss = log(4.0861613 / 3.0861613) = 0.28067795340140783
    z = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([_unit(0), _unit(90), _unit(180)])
    loss = knn_loss(z, torch.tensor([0]), torch.tensor([5]), bank, torch.tensor([0, 1, 0]), 1.0)
    assert loss.item() == pytest.approx(0.28067795340140783, rel=1e-6)
    # a negative index is outside the bank too
    loss = knn_loss(z, torch.tensor([0]), torch.tensor([-1]), bank, torch.tensor([0, 1, 0]), 1.0)
    assert loss.item() == pytest.approx(0.28067795340140783, rel=1e-6)


def test_knn_hand_sigma_half_and_batch_mean():
    # Rows at 0°, 60°, 120°, 180°, labels 0, 1, 0, 1; query at 0°, sigma = 0.5:
    # logits cos/sigma = 2, 1, -1, -2.
    # query A: label 0, index 9 (outside): all = e^2+e+e^-1+e^-2, same = e^2+e^-1
    #   loss_A = log(1 + (e + e^-2)/(e^2 + e^-1)) = log(1 + 1/e) = 0.31326168751822303
    # query B: label 1, own row 0 excluded: all = e + e^-1 + e^-2, same (rows 1, 3) = e + e^-2
    #   loss_B = log((e + e^-1 + e^-2)/(e + e^-2)) = log(3.221501/2.853617) = log(1.128918) = 0.1212587
    # query C: label 0, own row 2 excluded: all = e^2 + e + e^-2, same (row 0) = e^2
    #   loss_C = log(1 + e^-1 + e^-4) = log(1 + 0.367879 + 0.018316) = log(1.386195) = 0.3265626
    # mean = (0.3132617 + 0.1212587 + 0.3265626)/3 = 0.2536943
    la = math.log(1 + 1 / E)
    lb = math.log((E + E ** -1 + E ** -2) / (E + E ** -2))
    lc = math.log(1 + E ** -1 + E ** -4)
    assert la == pytest.approx(0.31326168751822303)
    bank = torch.tensor([_unit(0), _unit(60), _unit(120), _unit(180)])
    bank_labels = torch.tensor([0, 1, 0, 1])
    z = torch.tensor([_unit(0)] * 3)
    loss = knn_loss(z, torch.tensor([0, 1, 0]), torch.tensor([9, 0, 2]), bank, bank_labels, 0.5)
    assert lb == pytest.approx(0.1212587, abs=1e-7) and lc == pytest.approx(0.3265626, abs=1e-7)
    assert loss.item() == pytest.approx((la + lb + lc) / 3, rel=1e-6)
    assert loss.item() == pytest.approx(0.2536943, abs=1e-6)


def test_knn_uses_cosines_not_raw_dot_products():
    # Scaling the query and the bank rows must not change eq. 2 (cosine similarity).
    bank = torch.tensor([_unit(0), _unit(90), _unit(180)])
    scaled = bank * torch.tensor([[3.0], [0.2], [7.0]])
    z = torch.tensor([[5.0, 0.0]])
    loss = knn_loss(z, torch.tensor([0]), torch.tensor([0]), scaled, torch.tensor([0, 1, 0]), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + E), rel=1e-6)


def test_knn_sample_without_other_same_class_row_is_left_out():
    # Query A: label 2 whose only bank row is its own (row 3) -> invalid, left out.
    # Query B: as test_knn_hand_own_row_excluded_sigma1 but with row 3 (label 2, at 90°) added:
    #   j != 0: rows 1 (90°, label 1), 2 (180°, label 0), 3 (90°, label 2): all = 1 + e^-1 + 1, same = e^-1
    #   loss_B = log(1 + 2e) = 1.8619948...
    # Query C: label 7, absent from the bank -> invalid.
    # loss = loss_B / 1 (V = 1 valid sample, not B = 3).
    bank = torch.tensor([_unit(0), _unit(90), _unit(180), _unit(90)])
    bank_labels = torch.tensor([0, 1, 0, 2])
    z = torch.tensor([_unit(30), _unit(0), _unit(45)], requires_grad=True)
    loss = knn_loss(z, torch.tensor([2, 0, 7]), torch.tensor([3, 0, 11]), bank, bank_labels, 1.0)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(math.log(1 + 2 * E), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert torch.all(z.grad[0] == 0) and torch.all(z.grad[2] == 0)   # left-out samples get no gradient
    assert z.grad[1].abs().sum() > 0


def test_knn_no_valid_sample_gives_finite_zero_and_backward_works():
    bank = torch.tensor([_unit(0), _unit(90), _unit(180)])
    bank_labels = torch.tensor([0, 1, 2])
    z = torch.tensor([_unit(10), _unit(20)], requires_grad=True)
    # sample 0: class 1 whose only row is its own; sample 1: class 5 absent from the bank
    loss = knn_loss(z, torch.tensor([1, 5]), torch.tensor([1, 9]), bank, bank_labels, 0.05)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert torch.all(z.grad == 0)


def test_knn_single_row_bank_own_row_only():
    # The only row is the query's own: both sets are empty -> left out, loss 0, finite gradient.
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = knn_loss(z, torch.tensor([0]), torch.tensor([0]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all()


# ====== knn_loss: random cases against float64 loops ======
@pytest.mark.parametrize("seed,sigma", [(0, 1.0), (1, 0.5), (2, 0.05), (3, 0.1)])
def test_knn_random_against_float64_loop(seed, sigma):
    z, labels, indices, bank, bank_labels = _random_case(seed)
    indices[0] = 100            # a query whose own row is not in this bank
    indices[1] = -3
    labels[2] = 99              # a class absent from the bank -> left out
    expected = ref_knn_loss(z, labels, indices, bank, bank_labels, sigma)
    got = knn_loss(z, labels, indices, bank, bank_labels, sigma)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # float32 inputs agree to float32 precision
    got32 = knn_loss(z.float(), labels, indices, bank.float(), bank_labels, sigma)
    assert got32.item() == pytest.approx(expected, rel=2e-4, abs=1e-5)


def test_knn_duplicate_queries_in_batch():
    # A padded distributed sampler repeats a sample: each copy is its own term in the mean.
    z, labels, indices, bank, bank_labels = _random_case(4, B=4)
    z = torch.cat([z, z[:2]])
    labels = torch.cat([labels, labels[:2]])
    indices = torch.cat([indices, indices[:2]])
    expected = ref_knn_loss(z, labels, indices, bank, bank_labels, 0.2)
    assert knn_loss(z, labels, indices, bank, bank_labels, 0.2).item() == pytest.approx(expected, rel=1e-10)


def test_knn_gradient_matches_finite_differences_of_loop():
    z, labels, indices, bank, bank_labels = _random_case(5, B=4, N=12, d=3)
    sigma = 0.3
    z = z.clone().requires_grad_(True)
    knn_loss(z, labels, indices, bank, bank_labels, sigma).backward()
    h = 1e-6
    for i in range(z.shape[0]):
        for k in range(z.shape[1]):
            zp, zm = z.detach().clone(), z.detach().clone()
            zp[i, k] += h
            zm[i, k] -= h
            fd = (ref_knn_loss(zp, labels, indices, bank, bank_labels, sigma)
                  - ref_knn_loss(zm, labels, indices, bank, bank_labels, sigma)) / (2 * h)
            assert z.grad[i, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_knn_no_gradient_into_bank():
    z, labels, indices, bank, bank_labels = _random_case(6)
    z = z.clone().requires_grad_(True)
    bank = bank.clone().requires_grad_(True)
    before = bank.detach().clone()
    loss = knn_loss(z, labels, indices, bank, bank_labels, 0.05)
    loss.backward()
    assert bank.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert torch.equal(bank.detach(), before)


def test_knn_stable_at_sigma_001_with_cosines_near_one():
    # cos ≈ 1 everywhere, sigma = 0.01: logits ≈ 100, exp(100) = 2.7e43 overflows float32.
    # Rows at 0°, 1°, 2°, 3°, 4° (labels 0,1,0,1,0); query at 0.5°, label 0, index 10 (outside).
    angles = [0.0, 1.0, 2.0, 3.0, 4.0]
    bank = torch.tensor([_unit(a) for a in angles])
    bank_labels = torch.tensor([0, 1, 0, 1, 0])
    z = torch.tensor([_unit(0.5)], requires_grad=True)
    # reference: logits_j = cos(0.5° - a_j)/0.01, shifted by max before exp
    logits = [math.cos(math.radians(0.5 - a)) / 0.01 for a in angles]
    mx = max(logits)
    s_all = sum(math.exp(l - mx) for l in logits)
    s_same = sum(math.exp(l - mx) for l, y in zip(logits, [0, 1, 0, 1, 0]) if y == 0)
    expected = math.log(s_all / s_same)
    loss = knn_loss(z, torch.tensor([0]), torch.tensor([10]), bank, bank_labels, 0.01)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-3, abs=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # all rows identical to the query: p uniform over 5 rows, 3 same -> log(5/3)
    bank = torch.tensor([[1.0, 0.0]] * 5)
    loss = knn_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), torch.tensor([10]), bank, bank_labels, 0.01)
    assert loss.item() == pytest.approx(math.log(5 / 3), rel=1e-5)


def test_knn_float32_random_sigma001_finite():
    g = torch.Generator().manual_seed(7)
    base = torch.nn.functional.normalize(torch.randn(1, 8, generator=g), dim=1)
    bank = base + 1e-3 * torch.randn(40, 8, generator=g)       # all cosines near 1
    z = (base + 1e-3 * torch.randn(5, 8, generator=g)).requires_grad_(True)
    bank_labels = torch.arange(40) % 3
    indices = torch.tensor([0, 5, 10, 15, 20])
    labels = bank_labels[indices]
    loss = knn_loss(z, labels, indices, bank, bank_labels, 0.01)
    expected = ref_knn_loss(z.detach().double(), labels, indices, bank.double(), bank_labels, 0.01)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-3, abs=1e-3)
    loss.backward()
    assert torch.isfinite(z.grad).all()


# ====== knn_partials / knn_terms ======
def test_knn_partials_against_loop_with_offset():
    z, labels, indices, bank, bank_labels = _random_case(8, B=6, N=20)
    offset, lo, hi = 30, 5, 14          # block = global rows [35, 44) taken from local rows 5..13
    block, block_labels = bank[lo:hi], bank_labels[lo:hi]
    g_indices = indices + offset         # global indices; some fall in the block, some not
    lse_all, lse_same = knn_partials(z, labels, g_indices, block, block_labels, 0.2, offset=offset + lo)
    assert lse_all.shape == (6,) and lse_same.shape == (6,)
    for i in range(6):
        ea, es = ref_lse(z[i].tolist(), labels[i], g_indices[i], block.tolist(), block_labels.tolist(),
                         0.2, offset + lo)
        assert lse_all[i].item() == pytest.approx(ea, rel=1e-12)
        if es == -math.inf:
            assert lse_same[i].item() == -math.inf
        else:
            assert lse_same[i].item() == pytest.approx(es, rel=1e-12)


def test_knn_partials_empty_sets_are_minus_inf():
    # block of one row which is the query's own: both sets empty
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    block = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    lse_all, lse_same = knn_partials(z, torch.tensor([0, 1]), torch.tensor([4, 7]), block,
                                     torch.tensor([0]), 1.0, offset=4)
    assert lse_all[0].item() == -math.inf and lse_same[0].item() == -math.inf
    # query 1: row 4 counts (index 7 outside the block), other class -> lse_same -inf
    # lse_all = cos((0,1),(1,1)) / 1 = 1/sqrt2
    assert lse_all[1].item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert lse_same[1].item() == -math.inf


def _combined_loss(z, labels, indices, bank, bank_labels, sigma, cuts):
    parts = []
    bounds = [0] + list(cuts) + [len(bank)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        parts.append(knn_partials(z, labels, indices, bank[lo:hi], bank_labels[lo:hi], sigma, offset=lo))
    lse_all, lse_same = parts[0]
    for a, s in parts[1:]:
        lse_all, lse_same = torch.logaddexp(lse_all, a), torch.logaddexp(lse_same, s)
    terms, valid = knn_terms(lse_all, lse_same)
    return terms.sum() / valid.sum().clamp(min=1), terms, valid


def _sharding_case():
    # N = 12 rows in 3 classes; blocks [0,5), [5,6), [6,12) for the 3-way split.
    z, _, _, bank, _ = _random_case(9, B=6, N=12, d=4)
    bank_labels = torch.tensor([0, 0, 1, 1, 0, 2, 1, 1, 0, 0, 1, 0])
    # q0: own row 3 (class 1), q1: own row 5 = the only row of the 1-row block and the only
    # class-2 row (invalid overall), q2: own row 11, q3: index outside the memory,
    # q4: class 2 with index outside -> valid only through block [5,6), q5: own row 0
    indices = torch.tensor([3, 5, 11, 40, 41, 0])
    labels = torch.tensor([1, 2, 0, 1, 2, 0])
    return z, labels, indices, bank, bank_labels


@pytest.mark.parametrize("cuts", [(5,), (6,), (5, 6), (4, 9), (1, 11)])
def test_knn_partials_blocks_combine_to_whole_loss(cuts):
    z, labels, indices, bank, bank_labels = _sharding_case()
    sigma = 0.25
    z1 = z.clone().requires_grad_(True)
    whole = knn_loss(z1, labels, indices, bank, bank_labels, sigma)
    whole.backward()
    z2 = z.clone().requires_grad_(True)
    combined, terms, valid = _combined_loss(z2, labels, indices, bank, bank_labels, sigma, cuts)
    assert valid.tolist() == [True, False, True, True, True, True]
    assert combined.item() == pytest.approx(whole.item(), rel=1e-12, abs=1e-14)
    assert combined.item() == pytest.approx(ref_knn_loss(z, labels, indices, bank, bank_labels, sigma),
                                            rel=1e-12)
    combined.backward()
    assert torch.isfinite(z2.grad).all(), f"non-finite gradient from the combined blocks: {z2.grad}"
    assert torch.allclose(z2.grad, z1.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cuts", [(7,), (3, 8)])
def test_knn_partials_blocks_combine_all_valid_random(cuts):
    z, labels, indices, bank, bank_labels = _random_case(10, B=8, N=15, d=6, classes=3)
    z1 = z.clone().requires_grad_(True)
    whole = knn_loss(z1, labels, indices, bank, bank_labels, 0.05)
    whole.backward()
    z2 = z.clone().requires_grad_(True)
    combined, _, _ = _combined_loss(z2, labels, indices, bank, bank_labels, 0.05, cuts)
    combined.backward()
    assert combined.item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(z2.grad, z1.grad, rtol=1e-10, atol=1e-14)


def test_knn_terms_per_query_values():
    lse_all = torch.tensor([2.0, 1.0, -math.inf, 3.0], dtype=torch.float64)
    lse_same = torch.tensor([0.5, -math.inf, -math.inf, 3.0], dtype=torch.float64)
    terms, valid = knn_terms(lse_all, lse_same)
    assert valid.tolist() == [True, False, False, True]
    assert terms.tolist() == [1.5, 0.0, 0.0, 0.0]


# ====== instance_loss (eq. 1) ======
def test_instance_loss_hand_T2():
    # sample 0: p1=(1,0), p2=(0,1); t1=(0,2), t2=(1,1).
    #   pairs i!=j: cos(p1,t2) = 1/sqrt2, cos(p2,t1) = 1 -> -(0.70711 + 1)/2 = -0.8535533905932737
    #   (the i=j terms cos(p1,t1)=0, cos(p2,t2)=1/sqrt2 must not count)
    # sample 1: p1=(1,0), p2=(1,0); t1=(-1,0), t2=(0,3): cos(p1,t2)=0, cos(p2,t1)=-1 -> -(0-1)/2 = 0.5
    # batch mean: (-0.8535533905932737 + 0.5)/2 = -0.17677669529663687
    p1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    t1 = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    t2 = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    loss = instance_loss([p1, p2], [t1, t2])
    assert loss.item() == pytest.approx(-0.17677669529663687, rel=1e-6)


def test_instance_loss_hand_T3():
    # p1=(1,0), p2=(0,1), p3=(1,1)/.. ; t1=(1,0), t2=(0,1), t3=(-1,0)
    # i!=j pairs (6 of them):
    #   cos(p1,t2)=0, cos(p1,t3)=-1, cos(p2,t1)=0, cos(p2,t3)=0,
    #   cos(p3,t1)=1/sqrt2, cos(p3,t2)=1/sqrt2          sum = sqrt2 - 1 = 0.41421356
    # loss = -(sqrt2 - 1)/6 = -0.06903559372884927
    p = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 2.0]])]
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0.0]])]
    loss = instance_loss(p, t)
    assert loss.item() == pytest.approx(-(math.sqrt(2) - 1) / 6, rel=1e-6)
    assert -(math.sqrt(2) - 1) / 6 == pytest.approx(-0.06903559372884927)


@pytest.mark.parametrize("T", [2, 3, 4])
def test_instance_loss_random_against_float64_loop(T):
    g = torch.Generator().manual_seed(T)
    preds = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(T)]
    targets = [torch.randn(5, 7, generator=g, dtype=torch.float64) * 3 for _ in range(T)]
    got = instance_loss(preds, targets)
    assert got.item() == pytest.approx(ref_instance_loss(preds, targets), rel=1e-12)


def test_instance_loss_no_gradient_into_targets():
    g = torch.Generator().manual_seed(11)
    preds = [torch.randn(4, 6, generator=g).requires_grad_(True) for _ in range(3)]
    targets = [torch.randn(4, 6, generator=g).requires_grad_(True) for _ in range(3)]
    instance_loss(preds, targets).backward()
    for t in targets:
        assert t.grad is None
    for p in preds:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_instance_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(12)
    preds = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    targets = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    p0 = preds[0].clone().requires_grad_(True)
    instance_loss([p0, preds[1]], targets).backward()
    h = 1e-6
    for b in range(3):
        for k in range(4):
            pp, pm = preds[0].clone(), preds[0].clone()
            pp[b, k] += h
            pm[b, k] -= h
            fd = (ref_instance_loss([pp, preds[1]], targets) - ref_instance_loss([pm, preds[1]], targets)) / (2 * h)
            assert p0.grad[b, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)
