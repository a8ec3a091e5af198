"""Distillation loss terms: each pure function against the paper's formula computed by hand
(plain loops over numpy arrays), zero where the formula gives zero, a float64 gradcheck,
and every registered term through the Objective on a tiny student/teacher pair."""

import copy
import math
import pkgutil

import numpy as np
import pytest
import torch
from torch import nn

import compress.losses as losses_pkg
from compress.config import parse_recipe
from compress.data import Batch
from compress.engine import Frozen
from compress.losses import LOSSES, LossTerm, Objective, Outputs, TermInfo, TermSpec, register
from compress.losses.at import ATSpec, at_loss, attention_map
from compress.losses.cosine import CosineSpec, cosine_distance
from compress.losses.crd import CRDSpec, bank_scores, nce_loss, sample_contrast
from compress.losses.dist import DISTSpec, dist_loss, dist_parts
from compress.losses.dkd import DKDSpec, dkd_loss, dkd_parts
from compress.losses.kd import kd_loss
from compress.losses.mbd import MBDSpec, mbd_loss, merit_weights
from compress.losses.nst import nst_mmd2
from compress.losses.pkt import pkt_loss
from compress.losses.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss
from compress.losses.sp import SPSpec, sp_loss
from compress.models import VGG, Ensemble
from compress.stages.distill import DistillStage

F64 = torch.float64


def _rng(seed=0):
    return np.random.default_rng(seed)


def _t(a, grad=False):
    return torch.tensor(np.asarray(a), dtype=F64, requires_grad=grad)


def _softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _gradcheck(fn, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*s, dtype=F64, generator=g).requires_grad_() for s in shapes]
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-5)


# ---- dist -----------------------------------------------------------------------------------

def _pearson(u, v):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    num = sum((a - mu) * (b - mv) for a, b in zip(u, v))
    den = math.sqrt(sum((a - mu) ** 2 for a in u)) * math.sqrt(sum((b - mv) ** 2 for b in v))
    return num / (den + 1e-8)


def test_dist_matches_hand_computed_inter_and_intra_class_relations():
    s = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.5, 0.0], [-0.7, 0.1, 0.2, 2.2]]
    t = [[3.0, 1.0, 0.0, 0.5], [0.0, 2.0, -1.0, 1.0], [0.4, -1.2, 0.9, 1.1]]
    T = 2.0
    ps = [_softmax([v / T for v in row]) for row in s]
    pt = [_softmax([v / T for v in row]) for row in t]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt)) / 3
    cols = lambda p, c: [row[c] for row in p]
    intra = 1 - sum(_pearson(cols(ps, c), cols(pt, c)) for c in range(4)) / 4
    got_inter, got_intra = dist_parts(_t(s), _t(t), T)
    assert got_inter.item() == pytest.approx(T * T * inter, rel=1e-9)
    assert got_intra.item() == pytest.approx(T * T * intra, rel=1e-9)
    assert dist_loss(_t(s), _t(t), 2.0, 0.5, T).item() == pytest.approx(T * T * (2 * inter + 0.5 * intra), rel=1e-9)
    # Only the relation counts: a student whose probabilities are a linear map of the
    # teacher's (flatter, still summing to 1) has both relations at zero, where KL is not.
    pt_t = _t(pt)
    shifted = 0.5 * pt_t + 0.5 / 4       # each row still sums to 1, a linear map of the teacher's
    inter0, intra0 = dist_parts(shifted.log(), pt_t.log(), 1.0)
    assert inter0.item() == pytest.approx(0.0, abs=1e-6)    # the 1e-8 in the denominator only
    assert intra0.item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(shifted.log(), pt_t.log(), 1.0).item() > 1e-3


def test_dist_zero_for_identical_logits_and_gradcheck():
    z = torch.randn(5, 6, dtype=F64)
    assert dist_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(5, 6, dtype=F64)
    _gradcheck(lambda s: dist_loss(s, t, 1.0, 2.0, 4.0), (5, 6))


# ---- dkd ------------------------------------------------------------------------------------

def test_dkd_matches_hand_computed_tckd_and_nckd():
    s = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.5, 0.0]]
    t = [[3.0, 1.0, 0.0, 0.5], [0.0, 2.0, -1.0, 1.0]]
    y, T = [0, 2], 2.0
    tckd = nckd = 0.0
    for si, ti, yi in zip(s, t, y):
        ps, pt = _softmax([v / T for v in si]), _softmax([v / T for v in ti])
        tckd += _kl([pt[yi], 1 - pt[yi]], [ps[yi], 1 - ps[yi]])
        qs = [p / (1 - ps[yi]) for c, p in enumerate(ps) if c != yi]
        qt = [p / (1 - pt[yi]) for c, p in enumerate(pt) if c != yi]
        nckd += _kl(qt, qs)
    tckd, nckd = T * T * tckd / 2, T * T * nckd / 2
    got_t, got_n = dkd_parts(_t(s), _t(t), torch.tensor(y), T)
    assert got_t.item() == pytest.approx(tckd, rel=1e-9)
    assert got_n.item() == pytest.approx(nckd, rel=1e-9)
    assert dkd_loss(_t(s), _t(t), torch.tensor(y), 1.0, 8.0, T).item() == pytest.approx(tckd + 8 * nckd, rel=1e-9)


def test_dkd_zero_for_identical_logits_and_gradcheck():
    z = torch.randn(5, 6, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 5])
    assert dkd_loss(z, z.clone(), y).item() == pytest.approx(0.0, abs=1e-12)
    t = torch.randn(5, 6, dtype=F64)
    _gradcheck(lambda s: dkd_loss(s, t, y, 1.0, 8.0, 4.0), (5, 6))


def test_dkd_warmup_ramps_with_training_images_seen():
    term = LOSSES["dkd"](DKDSpec(warmup_epochs=2))
    term.setup({}, {}, TermInfo(num_samples=10))
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    full = dkd_loss(s, t, y).item()
    batch = Batch(s, y, torch.arange(5))
    term.train()
    assert term(Outputs(s), Outputs(t), batch).item() == pytest.approx(full * 5 / 20, rel=1e-6)
    assert term(Outputs(s), Outputs(t), batch).item() == pytest.approx(full * 10 / 20, rel=1e-6)
    term.eval()                      # evaluation does not advance the ramp
    assert term(Outputs(s), Outputs(t), batch).item() == pytest.approx(full * 10 / 20, rel=1e-6)
    term.train()
    for _ in range(5):
        out = term(Outputs(s), Outputs(t), batch)
    assert out.item() == pytest.approx(full, rel=1e-6)    # capped at 1 after 2 epochs


# ---- cosine ---------------------------------------------------------------------------------

def test_cosine_distance_matches_hand_computation():
    a, b = _rng().normal(size=(3, 2, 2, 2)), _rng(1).normal(size=(3, 2, 2, 2))
    want = 0.0
    for x, z in zip(a.reshape(3, -1), b.reshape(3, -1)):
        dot = sum(p * q for p, q in zip(x, z))
        want += 1 - dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in z)))
    assert cosine_distance(_t(a), _t(b)).item() == pytest.approx(want / 3, rel=1e-9)
    assert cosine_distance(_t(a), _t(a)).item() == pytest.approx(0.0, abs=1e-12)
    _gradcheck(cosine_distance, (3, 2, 2, 2), (3, 2, 2, 2))


def test_cosine_term_projects_channels_and_pools_space():
    spec = CosineSpec(student_layers=["a", "b"], teacher_layers=["a", "b"])
    term = LOSSES["cosine"](spec)
    term.setup({"a": (4, 8, 8), "b": (5,)}, {"a": (6, 4, 4), "b": (5,)}, TermInfo())
    assert isinstance(term.proj[0], nn.Conv2d) and (term.proj[0].in_channels, term.proj[0].out_channels) == (4, 6)
    assert isinstance(term.proj[1], nn.Identity)          # equal shapes: no adapter
    # with an identity projection, equal features give 0 (and pooling is by 2x2 means)
    term.proj[0] = nn.Identity()
    t = torch.randn(2, 4, 4, 4)
    s = t.repeat_interleave(2, 2).repeat_interleave(2, 3)   # 8x8 whose 2x2 means are t
    v = torch.randn(2, 5)
    out = term(Outputs(None, {"a": s, "b": v}), Outputs(None, {"a": t, "b": v}), None)
    assert out.item() == pytest.approx(0.0, abs=1e-6)


# ---- at -------------------------------------------------------------------------------------

def _hand_at_map(f):
    n, c, h, w = f.shape
    out = []
    for i in range(n):
        q = [sum(abs(f[i, k, y, x]) ** 2 for k in range(c)) for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / norm for v in q])
    return out


def test_at_matches_the_paper_formula():
    r = _rng()
    pairs = [(r.normal(size=(2, 3, 2, 2)), r.normal(size=(2, 5, 2, 2))),
             (r.normal(size=(2, 2, 4, 4)), r.normal(size=(2, 4, 2, 2)))]   # second: pool student 4x4 -> 2x2
    want = 0.0
    for s, t in pairs:
        if s.shape[-1] != t.shape[-1]:
            s = s.reshape(2, 2, 2, 2, 2, 2).mean(axis=(3, 5))             # 2x2 block means
        qs, qt = _hand_at_map(s), _hand_at_map(t)
        want += sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v))) for u, v in zip(qs, qt)) / 2
    got = at_loss([_t(s) for s, _ in pairs], [_t(t) for _, t in pairs], beta=1000.0)
    assert got.item() == pytest.approx(1000.0 / 2 * want, rel=1e-9)
    f = _t(pairs[0][0])
    assert np.allclose(attention_map(f).numpy(), _hand_at_map(pairs[0][0]))


def test_at_zero_for_identical_features_and_gradcheck():
    f = torch.randn(3, 4, 5, 5, dtype=F64)
    assert at_loss([f], [f.clone()]).item() == pytest.approx(0.0, abs=1e-9)
    assert at_loss([f], [2 * f]).item() == pytest.approx(0.0, abs=1e-9)   # scale-free (normalised)
    _gradcheck(lambda s, t: at_loss([s], [t], beta=2.0), (2, 3, 4, 4), (2, 5, 4, 4))


# ---- nst ------------------------------------------------------------------------------------

def test_nst_matches_hand_computed_mmd():
    r = _rng(2)
    s, t = r.normal(size=(2, 3, 2, 3)), r.normal(size=(2, 4, 2, 3))
    want = 0.0
    for b in range(2):
        fs = [v / np.sqrt(sum(x * x for x in v)) for v in s[b].reshape(3, -1)]
        ft = [v / np.sqrt(sum(x * x for x in v)) for v in t[b].reshape(4, -1)]

        def k(u, v):
            return float(sum(x * y for x, y in zip(u, v))) ** 2

        kss = sum(k(u, v) for u in fs for v in fs) / 9
        ktt = sum(k(u, v) for u in ft for v in ft) / 16
        kst = sum(k(u, v) for u in fs for v in ft) / 12
        want += (kss + ktt - 2 * kst) / 2
    assert nst_mmd2(_t(s), _t(t)).item() == pytest.approx(want, rel=1e-9)


def test_nst_zero_for_identical_features_and_gradcheck():
    f = torch.randn(2, 5, 3, 3, dtype=F64)
    assert nst_mmd2(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    _gradcheck(nst_mmd2, (2, 3, 3, 3), (2, 4, 3, 3))
    _gradcheck(nst_mmd2, (2, 3, 4, 4), (2, 4, 2, 2))     # spatial mismatch pooled


# ---- pkt ------------------------------------------------------------------------------------

def _hand_pkt_probs(x, eps=1e-7):
    x = [v / (math.sqrt(sum(a * a for a in v)) + eps) for v in x]
    k = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in x] for u in x]
    return [[kij / sum(row) for kij in row] for row in k]


def test_pkt_matches_hand_computed_kl():
    r = _rng(3)
    s, t = r.normal(size=(4, 3)), r.normal(size=(4, 6))
    ps, pt = _hand_pkt_probs(s), _hand_pkt_probs(t)
    eps = 1e-7
    want = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(4) for j in range(4)) / 4
    assert pkt_loss(_t(s), _t(t)).item() == pytest.approx(want, rel=1e-9)
    assert pkt_loss(_t(t), _t(t)).item() == 0.0
    _gradcheck(pkt_loss, (4, 3), (4, 6))


# ---- sp -------------------------------------------------------------------------------------

def test_sp_matches_hand_computed_gram_distance():
    r = _rng(4)
    s, t = r.normal(size=(3, 2, 2, 2)), r.normal(size=(3, 5))

    def gram(x):
        x = x.reshape(3, -1)
        g = [[float(sum(a * b for a, b in zip(u, v))) for v in x] for u in x]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s), gram(t)
    want = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert sp_loss(_t(s), _t(t)).item() == pytest.approx(want, rel=1e-9)
    assert sp_loss(_t(s), _t(s)).item() == 0.0
    _gradcheck(sp_loss, (3, 2, 2, 2), (3, 5))
    assert SPSpec(student_layers=["a"], teacher_layers=["b"]).weight == 3000.0   # gamma


# ---- rkd ------------------------------------------------------------------------------------

def test_rkd_matches_hand_computed_distance_and_angle_terms():
    r = _rng(5)
    s, t = r.normal(size=(4, 3)), 3 * r.normal(size=(4, 5))
    n = 4

    def dist(e):
        d = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(e[i], e[j]))) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    def angles(e):
        out = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out[i, j, k] = 0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv)
        return out

    ds, dt = dist(s), dist(t)
    want_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    as_, at_ = angles(s), angles(t)
    want_a = sum(_huber(as_[key] - at_[key]) for key in as_) / n ** 3
    assert rkd_distance_loss(_t(s), _t(t)).item() == pytest.approx(want_d, rel=1e-6)
    assert rkd_angle_loss(_t(s), _t(t)).item() == pytest.approx(want_a, rel=1e-9)
    assert rkd_loss(_t(s), _t(t)).item() == pytest.approx(25 * want_d + 50 * want_a, rel=1e-6)


def test_rkd_zero_for_identical_embeddings_and_gradcheck():
    e = torch.randn(5, 4, dtype=F64)
    assert rkd_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-9)
    assert rkd_loss(e, 7 * e).item() == pytest.approx(0.0, abs=1e-9)   # distances are mean-normalised
    t = torch.randn(5, 6, dtype=F64)
    _gradcheck(lambda s: rkd_loss(s, t), (5, 4))


# ---- crd ------------------------------------------------------------------------------------

def test_crd_nce_loss_matches_hand_computation():
    x = np.abs(_rng(6).normal(size=(3, 5))) * 1e-3      # P(i|v) estimates; column 0 positive
    n, m = 50, 4
    pn = m / n
    want = 0.0
    for row in x:
        want += math.log(row[0] / (row[0] + pn + 1e-7))
        want += sum(math.log(pn / (v + pn + 1e-7)) for v in row[1:])
    assert nce_loss(_t(x), n).item() == pytest.approx(-want / 3, rel=1e-9)
    _gradcheck(lambda a: nce_loss(a.abs() + 0.01, n), (3, 5))


def test_crd_negatives_are_uniform_over_other_indices():
    idx = torch.tensor([0, 3, 9])
    c = sample_contrast(idx, 10, 2000, torch.Generator().manual_seed(0))
    assert c.shape == (3, 2001) and torch.equal(c[:, 0], idx)
    neg = c[:, 1:]
    assert (neg != idx[:, None]).all() and neg.min() >= 0 and neg.max() <= 9
    counts = torch.bincount(neg[1], minlength=10)        # anchor 3: the other 9 equally often
    assert counts[3] == 0 and counts[[0, 1, 2, 4, 5, 6, 7, 8, 9]].min() > 150


def test_crd_bank_scores_paths_agree():
    mem, v = torch.randn(7, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    idx = torch.tensor([[1, 4, 6], [0, 0, 5]])
    want = torch.tensor([[float(mem[j] @ v[b]) for j in row] for b, row in enumerate(idx.tolist())], dtype=F64)
    assert torch.allclose(bank_scores(mem, v, idx), want)                    # whole bank (7 <= 3*3)
    big = torch.randn(100, 3, dtype=F64)
    want = torch.stack([big[idx[b]] @ v[b] for b in range(2)])
    assert torch.allclose(bank_scores(big, v, idx), want)                    # gathered rows


def test_crd_memory_momentum_update_and_fixed_z():
    term = LOSSES["crd"](CRDSpec(feat_dim=4, nce_k=5))
    term.setup({"penultimate": (3,)}, {"penultimate": (6,)}, TermInfo(num_samples=12))
    assert term.k == 5 and term.memory_s.shape == (12, 4)
    stdv = 1 / math.sqrt(4 / 3)
    assert term.memory_s.abs().max() <= stdv
    before_s, before_t = term.memory_s.clone(), term.memory_t.clone()
    fs, ft, idx = torch.randn(3, 3), torch.randn(3, 6), torch.tensor([2, 7, 11])
    term.train()
    term(Outputs(None, {"penultimate": fs}), Outputs(None, {"penultimate": ft}), Batch(fs, None, idx))
    z = term.z_s.item()
    assert z > 0 and term.z_t.item() > 0
    vs = torch.nn.functional.normalize(term.embed_s(fs), dim=1).detach()
    want = torch.nn.functional.normalize(0.5 * before_s[idx] + 0.5 * vs, dim=1)
    assert torch.allclose(term.memory_s[idx], want, atol=1e-6)
    untouched = [i for i in range(12) if i not in (2, 7, 11)]
    assert torch.equal(term.memory_s[untouched], before_s[untouched])
    assert not torch.equal(term.memory_t[idx], before_t[idx])
    term(Outputs(None, {"penultimate": fs}), Outputs(None, {"penultimate": ft}), Batch(fs, None, idx))
    assert term.z_s.item() == z                          # Z is estimated once, on the first batch


def test_crd_needs_the_dataset_size():
    with pytest.raises(ValueError, match="training-set size"):
        LOSSES["crd"](CRDSpec()).setup({"flatten": (3,)}, {"flatten": (3,)}, TermInfo())


# ---- mbd ------------------------------------------------------------------------------------

# Teacher logits: rows 0 and 2 are right (argmax == label), rows 1 and 3 wrong.
MBD_T = [[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.5, 1.0], [0.0, 2.0, 0.0]]
MBD_Y = [0, 1, 2, 2]


@pytest.mark.parametrize("variant, want", [
    ("delta", [0.7, 0.3, 0.7, 0.3]),
    ("hard", [0.5, 0.0, 0.5, 0.0]),
    ("soft", [_softmax(row)[y] for row, y in zip(MBD_T, MBD_Y)]),
])
def test_mbd_picks_per_sample_weights_by_teacher_merit(variant, want):
    got = merit_weights(torch.tensor(MBD_T), torch.tensor(MBD_Y), variant, alpha=0.5, delta=0.2)
    assert got.tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("variant", ["delta", "hard", "soft"])
def test_mbd_loss_matches_hand_computation(variant):
    s = [[0.5, 1.0, -1.0], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0], [-1.0, 0.5, 0.0]]
    T = 4.0
    w = {"delta": [0.7, 0.3, 0.7, 0.3], "hard": [0.5, 0.0, 0.5, 0.0],
         "soft": [_softmax(row)[y] for row, y in zip(MBD_T, MBD_Y)]}[variant]
    want = 0.0
    for si, ti, yi, wi in zip(s, MBD_T, MBD_Y, w):
        kl = _kl(_softmax([v / T for v in ti]), _softmax([v / T for v in si]))
        ce = -math.log(_softmax(si)[yi])
        want += wi * T * T * kl + (1 - wi) * ce
    got = mbd_loss(_t(s), _t(MBD_T), torch.tensor(MBD_Y), variant, T=T, alpha=0.5, delta=0.2)
    assert got.item() == pytest.approx(want / 4, rel=1e-9)
    _gradcheck(lambda a: mbd_loss(a, _t(MBD_T), torch.tensor(MBD_Y), variant), (4, 3))


def test_mbd_hard_is_pure_ce_where_every_teacher_answer_is_wrong():
    s, t, y = torch.randn(3, 4, dtype=F64), torch.eye(4, dtype=F64)[[1, 2, 3]] * 5, torch.tensor([0, 0, 0])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert mbd_loss(s, t, y, "hard").item() == pytest.approx(ce.item(), rel=1e-12)


# ---- configs --------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, kwargs", [
    (ATSpec, {"student_layers": ["a"], "teacher_layers": ["a"], "beta": -1.0}),
    (ATSpec, {"student_layers": ["a", "b"], "teacher_layers": ["a"]}),
    (CosineSpec, {"student_layers": [], "teacher_layers": []}),
    (DKDSpec, {"T": 0.0}),
    (DISTSpec, {"T": 0.0}),
    (DISTSpec, {"gamma": -1.0}),
    (MBDSpec, {"alpha": 0.9, "delta": 0.2}),
    (MBDSpec, {"variant": "median"}),
    (CRDSpec, {"nce_m": 1.0}),
])
def test_specs_refuse_out_of_range_values(cls, kwargs):
    with pytest.raises(Exception):
        cls(**kwargs)


def test_paper_defaults():
    assert (DKDSpec().alpha, DKDSpec().beta, DKDSpec().T) == (1.0, 8.0, 4.0)
    assert (DISTSpec().beta, DISTSpec().gamma, DISTSpec().T) == (1.0, 1.0, 1.0)
    at = ATSpec(student_layers=["a"], teacher_layers=["a"])
    assert (at.beta, at.p) == (1000.0, 2.0)
    crd = CRDSpec()
    assert (crd.feat_dim, crd.nce_k, crd.nce_t, crd.nce_m, crd.student_layer) == (128, 4096, 0.07, 0.5, "penultimate")
    m = MBDSpec()
    assert (m.T, m.alpha, m.delta) == (4.0, 0.5, 0.2)
    assert LOSSES["rkd"].spec_cls().w_dist == 25.0 and LOSSES["rkd"].spec_cls().w_angle == 50.0


# ---- every registered term through the Objective -----------------------------------------------

# Values for required layer fields of any term; new terms with other required fields fail
# here loudly rather than being skipped.
REQUIRED = {"student_layer": "features.2", "teacher_layer": "features.6",
            "student_layers": ["features.2", "features.6"], "teacher_layers": ["features.6", "features.6"]}


def _spec(name, **extra):
    cls = LOSSES[name].spec_cls
    need = {k: REQUIRED[k] for k, f in cls.model_fields.items() if f.is_required()}
    return cls(**need, **extra)


def _models(term):
    torch.manual_seed(0)
    student = VGG([4, "M", 8], in_channels=1, num_classes=3)
    if any(p.startswith("members.") for p in term.student_layers()):      # a cohort (mutual stage)
        student = Ensemble([student, VGG([4, "M", 8], in_channels=1, num_classes=3)])
    teacher = Frozen(VGG([8, "M", 16], in_channels=1, num_classes=3)) if term.uses_teacher else None
    return student, teacher


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_term_trains_the_student_and_its_adapters_not_the_teacher(name):
    spec = _spec(name)
    student, teacher = _models(LOSSES[name](spec))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    obj = Objective([spec], student, teacher, sample=x[:2], info=TermInfo(num_samples=20, num_classes=3))
    obj.train()
    loss, parts, logits = obj(student, Batch(x, y, torch.tensor([0, 5, 7, 11, 13, 19]), torch.zeros(6, dtype=torch.long)))
    assert set(parts) == {name} and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)
    for n, p in obj.terms.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"adapter {n} got no gradient"
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())


def test_combined_distillation_is_the_weighted_sum_of_named_terms():
    specs = [_spec("ce"), _spec("kd", weight=0.5), _spec("at", weight=0.01), _spec("crd"), _spec("rkd", w_angle=0.0)]
    student = VGG([4, "M", 8], in_channels=1, num_classes=3)
    teacher = Frozen(VGG([8, "M", 16], in_channels=1, num_classes=3))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    obj = Objective(specs, student, teacher, sample=x[:2], info=TermInfo(num_samples=6))
    loss, parts, logits = obj(student, Batch(x, y, torch.arange(6)))
    assert list(parts) == ["ce", "kd", "at", "crd", "rkd"]
    assert parts["kd"].item() == pytest.approx(0.5 * kd_loss(logits, teacher(x)).item(), rel=1e-6)
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)


def test_a_new_term_is_one_file_and_one_registry_entry():
    # Every file in compress/losses registers the term named like the file ...
    owners = {LOSSES[n].__module__ for n in LOSSES}
    for m in pkgutil.iter_modules(losses_pkg.__path__):
        assert f"compress.losses.{m.name}" in owners, f"{m.name}.py registers no loss term"
    # ... every registered term is accepted in a stage's loss list ...
    for name in LOSSES:
        stage = DistillStage(name="d", kind="distill", model="s", teacher="t",
                             loss=[_spec(name).model_dump()])
        assert stage.loss[0].term == name
    # ... and a term registered at runtime runs in the Objective with no other change.

    class L1Spec(TermSpec):
        term: str = "tmp_l1"

    @register("tmp_l1")
    class L1(LossTerm):
        """A throwaway test term."""
        spec_cls = L1Spec

        def forward(self, student, teacher, batch):
            return student.logits.abs().mean()

    try:
        student = VGG([4], in_channels=1, num_classes=3)
        loss, parts, _ = Objective([L1Spec()], student)(student, Batch(torch.randn(2, 1, 4, 4), None, None))
        assert set(parts) == {"tmp_l1"} and loss.item() > 0
    finally:
        del LOSSES["tmp_l1"]


# ---- recipes --------------------------------------------------------------------------------

def _recipe(fmnist_root, stages):
    return parse_recipe({
        "name": "terms", "data": {"name": "fashion_mnist", "root": str(fmnist_root), "download": False,
                                  "train_subset": 32, "test_subset": 16},
        "models": {"teacher": {"arch": "vgg_small", "args": {"cfg": [8, "M", 16]}},
                   "student": {"arch": "vgg_small", "args": {"cfg": [4, "M", 8]}}},
        "stages": stages})


ALL_TERMS = [
    {"term": "ce"},
    {"term": "dkd", "alpha": 1, "beta": 8, "T": 4},
    {"term": "dist", "beta": 1, "gamma": 1, "T": 4},
    {"term": "cosine", "student_layers": ["features.2", "features.6"], "teacher_layers": ["features.2", "features.6"]},
    {"term": "at", "student_layers": ["features.6"], "teacher_layers": ["features.6"], "beta": 1000},
    {"term": "nst", "student_layers": ["features.6"], "teacher_layers": ["features.6"]},
    {"term": "pkt"}, {"term": "sp", "student_layers": ["flatten"], "teacher_layers": ["flatten"]},
    {"term": "rkd"}, {"term": "crd", "nce_k": 16}, {"term": "mbd", "variant": "soft", "weight": 0.5},
]


def test_validate_accepts_recipes_with_every_new_term(fmnist_root):
    from compress.pipeline import validate_recipe

    train = {"name": "teacher", "kind": "train", "model": "teacher", "epochs": 1}
    stages = [train, {"name": "kd", "kind": "distill", "model": "student", "teacher": "teacher", "loss": ALL_TERMS}]
    lines = validate_recipe(_recipe(fmnist_root, stages))
    assert "valid" in lines[0]
    bad = copy.deepcopy(stages)
    bad[1]["loss"] = [{"term": "at", "student_layers": ["features.99"], "teacher_layers": ["features.6"]}]
    with pytest.raises(Exception, match=r"stages\[1\]\.loss\[0\]\.student_layer"):
        validate_recipe(_recipe(fmnist_root, bad))


def test_hint_stage_then_kd_stage_and_combined_terms_run(fmnist_root, tmp_path):
    """The two-stage FitNets schedule is a recipe: a hint-only distill stage (fitnet alone)
    then a KD stage from it; a combined stage runs every new term, CRD sized from the data."""
    from compress.pipeline import run_recipe

    common = {"epochs": 1, "batch_size": 8}
    stages = [
        {"name": "teacher", "kind": "train", "model": "teacher", **common},
        {"name": "hint", "kind": "distill", "model": "student", "teacher": "teacher", **common,
         "loss": [{"term": "fitnet", "student_layer": "features.6", "teacher_layer": "features.6"}]},
        {"name": "kd", "kind": "distill", "from": "hint", "teacher": "teacher", **common,
         "loss": [{"term": "kd", "T": 4, "alpha": 0.9}]},
        {"name": "all", "kind": "distill", "model": "student", "teacher": "teacher", **common, "loss": ALL_TERMS},
    ]
    report = run_recipe(_recipe(fmnist_root, stages), workdir=tmp_path, device="cpu")
    rows = {s["name"]: s for s in report["stages"]}
    assert set(rows) >= {"teacher", "hint", "kd", "all"}
    assert all(math.isfinite(rows[n]["top1"]) for n in rows)
