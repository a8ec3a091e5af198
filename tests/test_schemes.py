"""Training schemes: teacher-assistant chains, hint+KD, born-again generations and their
ensemble, mutual learning and online ensemble KD, several teachers at once."""

import math
from pathlib import Path

import pytest
import torch

from compress.config import load_recipe
from compress.losses.dml import dml_loss
from compress.losses.online_kd import online_kd_loss
from compress.models import Ensemble, VGG
from compress.pipeline import run_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=1024", "data.test_subset=256"]


def _epochs(recipe_path, n=2):
    """Short training for every training stage: n epochs of batches of 64."""
    import yaml

    raw = yaml.safe_load((ROOT / recipe_path).read_text())
    train = [s["name"] for s in raw["stages"] if s["kind"] in ("train", "distill", "mutual")]
    return [f"stages.{n_}.{k}={v}" for n_ in train for k, v in (("epochs", n), ("batch_size", 64))]


def _run(tmp_path, recipe, extra):
    r = load_recipe(ROOT / recipe, TINY + _epochs(recipe) + extra)
    return run_recipe(r, workdir=tmp_path, device="cpu")


def test_dml_loss_matches_hand_computation():
    z1, z2 = [[1.0, 0.0, -1.0]], [[0.0, 2.0, 0.0]]
    y = 0

    def sm(v):
        e = [math.exp(a) for a in v]
        return [a / sum(e) for a in e]

    p1, p2 = sm(z1[0]), sm(z2[0])
    ce = -math.log(p1[y]) - math.log(p2[y])
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    expected = ce + kl(p2, p1) + kl(p1, p2)
    got = dml_loss([torch.tensor(z1), torch.tensor(z2)], torch.tensor([y]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dml_gradient_treats_the_other_peer_as_fixed():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    dml_loss([a, b], y).backward()
    # d/da: CE(a) + KL(p_b || p_a) -> (p_a - onehot)/B + (p_a - p_b)/B
    pa, pb = torch.softmax(a.detach(), 1), torch.softmax(b.detach(), 1)
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert torch.allclose(a.grad, ((pa - onehot) + (pa - pb)) / 3, atol=1e-6)


def test_online_kd_is_ce_only_when_peers_agree():
    z = torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    ce = torch.nn.functional.cross_entropy(z, y).item()
    assert online_kd_loss([z, z.clone(), z.clone()], y, T=3).item() == pytest.approx(4 * ce, rel=1e-5)


def test_ensemble_is_weighted_mean_of_members():
    torch.manual_seed(0)
    a, b = VGG([4], 1, 3).eval(), VGG([4], 1, 3).eval()
    x = torch.randn(2, 1, 8, 8)
    e = Ensemble([a, b], [3.0, 1.0]).eval()
    assert torch.allclose(e(x), 0.75 * a(x) + 0.25 * b(x), atol=1e-6)


def test_takd_chain_and_direct_student_start_from_one_initialisation(tmp_path):
    rep = _run(tmp_path, "recipes/takd.yaml", ["models.teacher.args={width: 0.25}",
                                               "models.assistant.args={width: 0.125}",
                                               "models.student.args={width: 0.0625}"])
    st = {s["name"]: s for s in rep["stages"]}
    assert st["student"]["params"] == st["student_direct"]["params"] < st["assistant"]["params"]
    comp = rep["comparison"]
    assert comp["baseline"] == "student_direct"
    rows = {r["method"]: r for r in comp["rows"]}
    assert rows["student"]["delta"] == pytest.approx(st["student"]["top1"] - st["student_direct"]["top1"], abs=0.011)
    md = (tmp_path / "exports" / "takd" / "report.md").read_text()
    assert "## Methods compared (baseline: student_direct)" in md and "| student |" in md
    # same models entry -> same initial weights in every stage that builds it
    from compress.stages import new_model

    r = load_recipe(ROOT / "recipes/takd.yaml")
    m1, _ = new_model(r, "student", 1, 10)
    m2, _ = new_model(r, "student", 1, 10)
    m3, _ = new_model(r, "student", 1, 10, salt="#peer1")
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(next(m1.parameters()), next(m3.parameters()))


def test_hint_then_kd_chain_runs(tmp_path):
    rep = _run(tmp_path, "recipes/takd_hint.yaml", ["models.teacher.args={width: 0.25}",
                                                    "models.assistant.args={width: 0.125}",
                                                    "models.student.args={width: 0.0625}"])
    assert [s["name"] for s in rep["stages"]] == ["teacher", "assistant_hint", "assistant", "student_hint", "student"]
    assert all(s["top1"] is not None for s in rep["stages"])


def test_born_again_reports_every_generation_and_their_ensemble(tmp_path):
    rep = _run(tmp_path, "recipes/born_again.yaml", ["models.gen1.args={width: 0.125}",
                                                     "models.gen2.args={width: 0.125}",
                                                     "models.gen3.args={width: 0.125}"])
    st = {s["name"]: s for s in rep["stages"]}
    members = st["ensemble"]["members"]
    assert [m["name"] for m in members] == ["gen1", "gen2", "gen3"]
    assert [m["top1"] for m in members] == [st[g]["top1"] for g in ("gen1", "gen2", "gen3")]
    assert st["ensemble"]["params"] == sum(st[g]["params"] for g in ("gen1", "gen2", "gen3"))
    assert [r["method"] for r in rep["comparison"]["rows"]] == ["gen1", "gen2", "gen3", "ensemble"]


def test_mutual_learning_trains_and_reports_each_peer(tmp_path):
    rep = _run(tmp_path, "recipes/mutual.yaml", ["models.student.args={width: 0.125}"])
    st = {s["name"]: s for s in rep["stages"]}
    assert len(st["dml"]["members"]) == 2 and len(st["online_kd"]["members"]) == 3
    assert st["dml"]["params"] == 2 * st["alone"]["params"]
    peers = st["dml"]["members"]
    assert all(m["top1"] > 20 for m in peers)                   # each peer learned
    # stored cohort rebuilds and loads with weights_only=True
    from compress.checkpoint import load_checkpoint

    spec, model = load_checkpoint(tmp_path / "runs" / "mutual" / "stages" / "dml" / "model.pt")
    assert spec["arch"] == "ensemble" and len(model.members) == 2


def test_several_teachers_average_their_logits(tmp_path):
    extra = ["models.teacher.args={width: 0.25}", "models.assistant.args={width: 0.125}",
             "models.student.args={width: 0.0625}", "stages.student.teacher=[teacher, assistant]",
             "stages.student.teacher_weights=[2.0, 1.0]"]
    rep = _run(tmp_path, "recipes/takd.yaml", extra)
    assert {s["name"] for s in rep["stages"]} >= {"student"}
    with pytest.raises(Exception, match="teacher_weights"):
        load_recipe(ROOT / "recipes/takd.yaml", ["stages.student.teacher=[teacher, assistant]",
                                                  "stages.student.teacher_weights=[1.0]"])
