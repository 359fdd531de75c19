"""Each loss against an independent plain-Python reference (math module, per-element loops).

The references follow the official `dinov3/loss/*` definitions literally (including the SK steps the
implementation skips or rearranges), in Python floats (double precision).
"""

from __future__ import annotations

import math

import pytest
import torch

from gramline.errors import InputError
from gramline.losses import (
    LossWeights,
    combine_losses,
    dino_loss,
    dino_pair_weights,
    gram_loss,
    ibot_loss,
    ibot_mask_weights,
    koleo_loss,
    koleo_loss_distributed,
    sinkhorn_knopp,
)

TOL = {"rel": 1e-5, "abs": 1e-6}


# ----------------------------------------------------------------------------- plain references


def ref_log_softmax(row: list[float], temp: float) -> list[float]:
    scaled = [v / temp for v in row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - log_z for v in scaled]


def ref_cross_entropy(p: list[float], s: list[float], temp: float) -> float:
    log_q = ref_log_softmax(s, temp)
    return -sum(pk * qk for pk, qk in zip(p, log_q))


def ref_sinkhorn(
    logits: list[list[float]], temp: float, n_iters: int, b_tot: float | None = None
) -> list[list[float]]:
    """The official Sinkhorn-Knopp verbatim: Q = exp(t/temp)ᵀ, / global sum, iterations, * B_tot, transpose."""
    n, k = len(logits), len(logits[0])
    b_tot = float(n) if b_tot is None else b_tot
    q = [[math.exp(logits[b][j] / temp) for b in range(n)] for j in range(k)]  # [K][N]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iters):
        for j in range(k):
            row_sum = sum(q[j])
            q[j] = [v / row_sum / k for v in q[j]]
        for b in range(n):
            col_sum = sum(q[j][b] for j in range(k))
            for j in range(k):
                q[j][b] = q[j][b] / col_sum / b_tot
    return [[q[j][b] * b_tot for j in range(k)] for b in range(n)]


def ref_normalize(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def ref_koleo(points: list[list[float]], eps: float = 1e-8) -> float:
    z = [ref_normalize(p) for p in points]
    total = 0.0
    for i, zi in enumerate(z):
        best, best_dot = -1, -math.inf
        for j, zj in enumerate(z):
            if j != i:
                dot = sum(a * b for a, b in zip(zi, zj))
                if dot > best_dot:
                    best, best_dot = j, dot
        dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(zi, z[best])))
        total += -math.log(dist + eps)
    return total / len(z)


def ref_gram(
    student: list[list[list[float]]],
    teacher: list[list[list[float]]],
    normalize: bool,
    img_level: bool,
    remove_neg: bool,
    only_teacher_neg: bool,
) -> float:
    def prep(x: list[list[list[float]]]) -> list[list[list[float]]]:
        return [[ref_normalize(tok) if normalize else tok for tok in img] for img in x]

    s, t = prep(student), prep(teacher)
    blocks = (
        [(si, ti) for si, ti in zip(s, t)]
        if img_level
        else [([tok for img in s for tok in img], [tok for img in t for tok in img])]
    )
    sq_err, count = 0.0, 0
    for fs, ft in blocks:
        for a in range(len(fs)):
            for b in range(len(fs)):
                gs = sum(x * y for x, y in zip(fs[a], fs[b]))
                gt = sum(x * y for x, y in zip(ft[a], ft[b]))
                if remove_neg:
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                if only_teacher_neg and gt < 0:
                    gs, gt = 0.0, 0.0
                sq_err += (gs - gt) ** 2
                count += 1
    return sq_err / count


# ----------------------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize("n_iters", [1, 3])
def test_sinkhorn_matches_plain_reference(n_iters: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 5) * 0.5
    got = sinkhorn_knopp(logits, temp=0.07, n_iters=n_iters)
    want = ref_sinkhorn(logits.double().tolist(), 0.07, n_iters)
    assert got.dtype == torch.float32 and got.shape == (7, 5)
    for b in range(7):
        for k in range(5):
            assert got[b, k].item() == pytest.approx(want[b][k], **TOL)


def test_sinkhorn_ibot_form_with_given_total_matches_reference() -> None:
    torch.manual_seed(1)
    logits = torch.randn(9, 4)
    # B_tot as iBOT passes it: an all-reduced count tensor (here as if other ranks held 11 more)
    got = sinkhorn_knopp(logits, temp=0.1, n_iters=3, n_samples_total=torch.tensor([20]))
    want = ref_sinkhorn(logits.double().tolist(), 0.1, 3, b_tot=20.0)
    for b in range(9):
        for k in range(4):
            assert got[b, k].item() == pytest.approx(want[b][k], **TOL)


def test_sinkhorn_rows_sum_to_one_and_columns_become_uniform() -> None:
    torch.manual_seed(2)
    n, k = 12, 4
    logits = torch.randn(n, k) * 2
    few = sinkhorn_knopp(logits, temp=0.5, n_iters=3)
    assert few.sum(dim=1).tolist() == pytest.approx([1.0] * n, abs=1e-5)
    many = sinkhorn_knopp(logits, temp=0.5, n_iters=500)
    assert many.sum(dim=1).tolist() == pytest.approx([1.0] * n, abs=1e-5)
    # every prototype gets an equal share of the batch: N / K
    assert many.sum(dim=0).tolist() == pytest.approx([n / k] * k, abs=1e-4)
    # and 3 iterations are not there yet on these peaked logits, so the test can tell them apart
    assert max(abs(v - n / k) for v in few.sum(dim=0).tolist()) > 1e-3


def test_sinkhorn_invariant_to_constant_shift_and_does_not_overflow() -> None:
    torch.manual_seed(3)
    # multiples of 1/8 and a power-of-two temperature keep logits + 1000 and the division exact in
    # fp32, so any difference would come from the function, not from rounding the inputs
    logits = torch.randint(-16, 16, (6, 8)).float() / 8
    base = sinkhorn_knopp(logits, temp=0.0625)
    assert torch.allclose(sinkhorn_knopp(logits + 3.0, temp=0.0625), base, atol=1e-6)
    # logits / temp = 1.6e4: exp() overflows fp32 in the unguarded reference; here it is the same answer
    shifted = sinkhorn_knopp(logits + 1000.0, temp=0.0625)
    assert torch.isfinite(shifted).all()
    assert torch.allclose(shifted, base, atol=1e-5)


def test_sinkhorn_invariant_to_per_prototype_shift() -> None:
    """A per-prototype constant is undone by the first row normalisation (reference property)."""
    torch.manual_seed(4)
    logits = torch.randn(10, 6)
    shift = torch.randn(6) * 2
    assert torch.allclose(sinkhorn_knopp(logits + shift, 0.1), sinkhorn_knopp(logits, 0.1), atol=1e-6)


def test_sinkhorn_is_fp32_under_autocast_and_detached() -> None:
    torch.manual_seed(5)
    logits = torch.randn(8, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sinkhorn_knopp(logits.bfloat16(), temp=0.1)
    assert got.dtype == torch.float32 and not got.requires_grad
    want = ref_sinkhorn(logits.detach().bfloat16().double().tolist(), 0.1, 3)
    assert got.tolist() == [pytest.approx(row, **TOL) for row in want]


def test_sinkhorn_bad_arguments() -> None:
    with pytest.raises(InputError, match="temp"):
        sinkhorn_knopp(torch.randn(3, 4), temp=0.0)
    with pytest.raises(InputError, match="n_iters"):
        sinkhorn_knopp(torch.randn(3, 4), temp=0.1, n_iters=0)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn_knopp(torch.randn(2, 3, 4), temp=0.1)


def test_sinkhorn_empty_local_batch() -> None:
    assert sinkhorn_knopp(torch.randn(0, 5), temp=0.1).shape == (0, 5)


# ----------------------------------------------------------------------------- DINO


def ref_dino(student: torch.Tensor, teacher: torch.Tensor, temp: float, ignore_diagonal: bool) -> float:
    s_list, t_list = student.double().tolist(), teacher.double().tolist()
    total, count = 0.0, 0
    for s in range(len(s_list)):
        for t in range(len(t_list)):
            if ignore_diagonal and s == t:
                continue
            for b in range(len(s_list[s])):
                total += ref_cross_entropy(t_list[t][b], s_list[s][b], temp)
                count += 1
    return total / count


@pytest.mark.parametrize("n_student,ignore", [(8, False), (2, False), (2, True), (3, True)])
def test_dino_loss_matches_plain_reference(n_student: int, ignore: bool) -> None:
    torch.manual_seed(10)
    student = torch.randn(n_student, 4, 6)
    teacher = torch.softmax(torch.randn(2, 4, 6), dim=-1)
    got = dino_loss(student, teacher, student_temp=0.1, ignore_diagonal=ignore)
    assert got.item() == pytest.approx(ref_dino(student, teacher, 0.1, ignore), **TOL)


def test_dino_ignore_diagonal_normaliser() -> None:
    """S=3, T=2: 6 pairs minus min(3,2)=2 diagonal ones leaves 4; normaliser B·4."""
    torch.manual_seed(11)
    b = 5
    student = torch.randn(3, b, 7)
    teacher = torch.softmax(torch.randn(2, b, 7), dim=-1)
    cross_sum = sum(
        dino_loss(student[s : s + 1], teacher[t : t + 1]).item() * b  # one pair: mean over b
        for s in range(3)
        for t in range(2)
        if s != t
    )
    got = dino_loss(student, teacher, ignore_diagonal=True)
    assert got.item() == pytest.approx(cross_sum / (b * (3 * 2 - 2)), **TOL)


def test_dino_loss_shape_checks() -> None:
    with pytest.raises(ValueError, match="equal B and K"):
        dino_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="no pairs"):
        dino_loss(torch.randn(1, 3, 4), torch.randn(1, 3, 4), ignore_diagonal=True)


# ----------------------------------------------------------------------------- iBOT


def make_masks() -> torch.Tensor:
    """4 crops × 6 patches: 3, 1, 0 (an unmasked crop) and 5 masked patches."""
    rows = [
        [1, 0, 1, 0, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 1, 1],
    ]
    return torch.tensor(rows, dtype=torch.bool)


def test_ibot_mask_weights_by_hand() -> None:
    got = ibot_mask_weights(make_masks())
    want = [1 / 3] * 3 + [1.0] + [1 / 5] * 5
    assert got.tolist() == pytest.approx(want, **TOL)


def test_ibot_loss_matches_plain_reference() -> None:
    torch.manual_seed(20)
    masks = make_masks()
    m, k = int(masks.sum()), 7
    student = torch.randn(m, k)
    teacher = torch.softmax(torch.randn(m, k) * 3, dim=-1)
    got = ibot_loss(student, teacher, ibot_mask_weights(masks), n_crops=masks.shape[0], student_temp=0.1)

    # per crop: the mean CE over its masked patches; summed over crops; divided by all 4 crops
    s_list, t_list = student.double().tolist(), teacher.double().tolist()
    j, total = 0, 0.0
    for crop in masks.tolist():
        ces = []
        for masked in crop:
            if masked:
                ces.append(ref_cross_entropy(t_list[j], s_list[j], 0.1))
                j += 1
        if ces:
            total += sum(ces) / len(ces)
    assert j == m
    assert got.item() == pytest.approx(total / 4, **TOL)


def test_ibot_loss_argument_checks() -> None:
    with pytest.raises(InputError, match="n_crops"):
        ibot_loss(torch.randn(2, 3), torch.rand(2, 3), torch.ones(2), n_crops=0)
    with pytest.raises(ValueError, match="weights"):
        ibot_loss(torch.randn(2, 3), torch.rand(2, 3), torch.ones(3), n_crops=2)


# ----------------------------------------------------------------------------- KoLeo


def test_koleo_hand_made_configuration() -> None:
    """Directions 0°, 60°, 180° with unequal lengths (normalisation must remove them).

    Nearest neighbours: 0°↔60° at chord 2·sin(30°) = 1, and 180°→60° at chord 2·sin(60°) = √3
    (closer than 0° at chord 2). Loss = −(ln 1 + ln 1 + ln √3)/3 = −ln(3)/6.
    """
    x = torch.tensor([[3.0, 0.0], [0.25, 0.25 * math.sqrt(3)], [-0.7, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(3) / 6, **TOL)


def test_koleo_matches_plain_reference() -> None:
    torch.manual_seed(30)
    x = torch.randn(9, 5)
    assert koleo_loss(x).item() == pytest.approx(ref_koleo(x.double().tolist()), **TOL)


def test_koleo_distributed_single_process_is_grouped_koleo() -> None:
    torch.manual_seed(31)
    x = torch.randn(10, 4)
    got = koleo_loss_distributed(x, group_size=4)  # groups of 4, 4 and 2 samples
    pts = x.double().tolist()
    want = (ref_koleo(pts[:4]) * 4 + ref_koleo(pts[4:8]) * 4 + ref_koleo(pts[8:]) * 2) / 10
    assert got.item() == pytest.approx(want, **TOL)
    # a lone trailing sample joins the previous group: 7 = 3 + 4
    want7 = (ref_koleo(pts[:3]) * 3 + ref_koleo(pts[3:7]) * 4) / 7
    assert koleo_loss_distributed(x[:7], group_size=3).item() == pytest.approx(want7, **TOL)
    # one group covering everything is plain KoLeo
    assert koleo_loss_distributed(x, group_size=16).item() == pytest.approx(ref_koleo(pts), **TOL)


def test_koleo_argument_checks() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(InputError, match="group_size"):
        koleo_loss_distributed(torch.randn(4, 3), group_size=1)


def test_koleo_duplicate_points_give_finite_gradient() -> None:
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() == pytest.approx((-math.log(1e-8) * 2 - math.log(math.sqrt(2))) / 3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- Gram


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize(
    "normalize,remove_neg,only_teacher_neg",
    [(True, False, False), (True, True, False), (True, False, True), (False, False, False)],
)
def test_gram_loss_matches_plain_reference(
    img_level: bool, normalize: bool, remove_neg: bool, only_teacher_neg: bool
) -> None:
    torch.manual_seed(40)
    student = torch.randn(2, 3, 4)
    teacher = torch.randn(2, 3, 4)
    got = gram_loss(
        student,
        teacher,
        normalize=normalize,
        img_level=img_level,
        remove_neg=remove_neg,
        remove_only_teacher_neg=only_teacher_neg,
    )
    want = ref_gram(
        student.double().tolist(),
        teacher.double().tolist(),
        normalize,
        img_level,
        remove_neg,
        only_teacher_neg,
    )
    assert got.item() == pytest.approx(want, **TOL)


def test_gram_remove_neg_variants_differ() -> None:
    """On these inputs there are negative entries, so the three variants give three answers."""
    torch.manual_seed(41)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    plain = gram_loss(s, t).item()
    both = gram_loss(s, t, remove_neg=True).item()
    teacher_only = gram_loss(s, t, remove_only_teacher_neg=True).item()
    assert len({round(v, 6) for v in (plain, both, teacher_only)}) == 3
    with pytest.raises(InputError, match="at most one"):
        gram_loss(s, t, remove_neg=True, remove_only_teacher_neg=True)


# ----------------------------------------------------------------------------- total


def test_dino_pair_weights() -> None:
    local, glob = dino_pair_weights(2, 8)
    assert local == pytest.approx(8 / 9) and glob == pytest.approx(1 / 9)
    assert dino_pair_weights(2, 0) == (0.0, 1.0)
    assert dino_pair_weights(1, 4) == (1.0, 0.0)
    with pytest.raises(InputError):
        dino_pair_weights(1, 0)


def test_combine_losses_by_hand() -> None:
    terms = {
        "dino_local": torch.tensor(3.0),
        "dino_global": torch.tensor(4.5),
        "koleo": torch.tensor([-0.2, -0.4]),
        "ibot": torch.tensor(2.0),
        "gram": torch.tensor(0.05),
    }
    weights = LossWeights(dino=1.0, local=0.5, koleo=0.1, ibot=1.0, gram=2.0, n_global=2, n_local=8)
    total, log = combine_losses(terms, weights)
    # 8/9·0.5·3 + 1/9·4.5 + 0.1·2·(−0.3) + 1·2 + 2·0.05
    want = 4 / 3 + 0.5 - 0.06 + 2.0 + 0.1
    assert total.item() == pytest.approx(want, **TOL)
    assert log["total"] == pytest.approx(want, **TOL)
    assert log["koleo"] == pytest.approx(-0.3, **TOL)
    assert log["koleo_weighted"] == pytest.approx(-0.06, **TOL)
    assert log["dino_local_weighted"] == pytest.approx(4 / 3, **TOL)
    assert log["dino_global_weighted"] == pytest.approx(0.5, **TOL)
    assert all(isinstance(v, float) for v in log.values())

    partial, plog = combine_losses({"dino_local": terms["dino_local"], "ibot": terms["ibot"]}, LossWeights())
    assert partial.item() == pytest.approx(8 / 9 * 3 + 2.0, **TOL)
    assert set(plog) == {"dino_local", "ibot", "dino_local_weighted", "ibot_weighted", "total"}
    with pytest.raises(ValueError, match="unknown"):
        combine_losses({"dino": torch.tensor(1.0)}, LossWeights())


# ----------------------------------------------------------------------------- gradients


def test_every_loss_backpropagates() -> None:
    torch.manual_seed(50)
    s_cls = torch.randn(10, 4, 16, requires_grad=True)  # 2 global + 8 local student crops
    t_cls = torch.randn(8, 16)
    p_cls = sinkhorn_knopp(t_cls, temp=0.07).unflatten(0, (2, 4))
    masks = make_masks()
    s_patch = torch.randn(int(masks.sum()), 16, requires_grad=True)
    p_patch = sinkhorn_knopp(torch.randn(int(masks.sum()), 16), temp=0.07, n_samples_total=int(masks.sum()))
    feats = torch.randn(2, 4, 8, requires_grad=True)
    patches = torch.randn(2, 6, 8, requires_grad=True)

    terms = {
        "dino_local": dino_loss(s_cls[2:], p_cls),
        "dino_global": dino_loss(s_cls[:2], p_cls, ignore_diagonal=True),
        "koleo": torch.stack([koleo_loss(feats[0]), koleo_loss_distributed(feats[1], group_size=2)]),
        "ibot": ibot_loss(s_patch, p_patch, ibot_mask_weights(masks), n_crops=4),
        "gram": gram_loss(patches, torch.randn(2, 6, 8), remove_only_teacher_neg=True),
    }
    total, _ = combine_losses(terms, LossWeights(gram=1.0))
    total.backward()
    for grad in (s_cls.grad, s_patch.grad, feats.grad, patches.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_losses_compute_in_fp32_under_autocast() -> None:
    torch.manual_seed(51)
    s = torch.randn(2, 3, 8).bfloat16()
    p = torch.softmax(torch.randn(2, 3, 8), -1).bfloat16()
    x = torch.randn(5, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_dino = dino_loss(s, p)
        got_koleo = koleo_loss(x)
        got_gram = gram_loss(s, p)
    assert {got_dino.dtype, got_koleo.dtype, got_gram.dtype} == {torch.float32}
    assert got_dino.item() == pytest.approx(ref_dino(s, p, 0.1, False), **TOL)
    assert got_koleo.item() == pytest.approx(ref_koleo(x.double().tolist()), **TOL)
