"""InfoBatch data pruning (`data_pruning` on a training stage): which images an epoch keeps,
their loss weights, the stretched schedule, the loop, and the recipe checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress.config import DataPruningSpec, TrainingSpec, load_recipe
from compress.data import Batch, Data, Split
from compress.engine import DataPruning, RunContext, _Stretched, fit
from compress.errors import CompressError
from compress.losses import LOSSES, Objective, Outputs
from compress.losses.ce import CESpec
from compress.losses.dist import dist_parts
from compress.losses.kd import kd_loss
from compress.pipeline import validate_recipe


def test_ce_weights_each_image_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    w = torch.tensor([1.0, 2.0, 0.5])
    each = [-(2.0 - torch.logsumexp(torch.tensor([2.0, 0.0]), 0)),
            -(0.0 - torch.logsumexp(torch.tensor([0.0, 1.0]), 0)),
            torch.log(torch.tensor(2.0))]
    expect = (each[0] * 1.0 + each[1] * 2.0 + each[2] * 0.5) / 3
    term = LOSSES["ce"](CESpec())
    got = term(Outputs(logits), None, Batch(None, y, torch.arange(3), weight=w))
    assert torch.allclose(got, torch.as_tensor(expect))
    plain = term(Outputs(logits), None, Batch(None, y, torch.arange(3)))
    assert torch.allclose(plain, F.cross_entropy(logits, y))


def test_dist_weights_count_an_image_as_copies_of_it_in_the_intra_relation():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    rep = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])               # each image `w` times
    inter, intra = dist_parts(s, t, weight=w)
    _, intra_rep = dist_parts(s[rep], t[rep])
    assert intra.item() == pytest.approx(intra_rep.item(), rel=1e-6)   # eps 1e-8 on other norms
    ys, yt = torch.softmax(s, 1), torch.softmax(t, 1)
    each = [1 - np.corrcoef(ys[i].numpy(), yt[i].numpy())[0, 1] for i in range(5)]
    assert inter.item() == pytest.approx(float(np.dot(each, w.numpy())) / 5, rel=1e-6)
    cols = [np.corrcoef(ys[rep, c].numpy(), yt[rep, c].numpy())[0, 1] for c in range(4)]
    assert intra.item() == pytest.approx(1 - float(np.mean(cols)), rel=1e-6)
    plain = dist_parts(s, t)                                    # equal weights: the paper's DIST
    same = dist_parts(s, t, weight=torch.ones(5, dtype=torch.float64))
    assert all(a.item() == pytest.approx(b.item(), rel=1e-12) for a, b in zip(plain, same))


def test_kd_weights_each_image_kl_and_ce():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    y, w, T, alpha = torch.tensor([1, 0]), torch.tensor([2.0, 0.5], dtype=torch.float64), 2.0, 0.75

    def kl(i):
        p, q = torch.softmax(t[i] / T, 0), torch.softmax(s[i] / T, 0)
        return float((p * (p / q).log()).sum())

    ce = [float(-torch.log_softmax(s[i], 0)[y[i]]) for i in range(2)]
    want = sum(w[i].item() * (alpha * T * T * kl(i) + (1 - alpha) * ce[i]) for i in range(2)) / 2
    assert kd_loss(s, t, T, alpha, y, weight=w).item() == pytest.approx(want, rel=1e-9)
    assert kd_loss(s, t, T, alpha, y, weight=torch.ones(2, dtype=torch.float64)).item() == \
        pytest.approx(kd_loss(s, t, T, alpha, y).item(), rel=1e-12)


def _pruning(scores, ratio=0.5, epochs=4, full_epochs=1, seed=0):
    p = DataPruning(DataPruningSpec(ratio=ratio, full_epochs=full_epochs), len(scores), epochs,
                    torch.device("cpu"), torch.Generator().manual_seed(seed))
    p.scores = torch.as_tensor(scores, dtype=torch.float32)
    return p


def test_plan_drops_only_well_learned_images_and_reweights_the_rest():
    n = 20000
    scores = torch.cat([torch.full((n // 2,), 0.1), torch.full((n // 2,), 2.0)])   # mean 1.05
    keep, w = _pruning(scores, ratio=0.3).plan(0)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep] = True
    assert kept[n // 2:].all()                                  # no hard image is dropped
    assert torch.all(w[n // 2:] == 1)
    dropped = (~kept[: n // 2]).float().mean().item()
    assert abs(dropped - 0.3) < 0.02                            # each easy one with probability 0.3
    assert torch.allclose(w[: n // 2][kept[: n // 2]], torch.tensor(1 / 0.7))


def test_weighted_kept_loss_is_an_unbiased_estimate_of_the_full_sum():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(500, generator=g) ** 3               # skewed: most images well learned
    p = _pruning(scores, ratio=0.5, epochs=1000)
    sums = []
    for e in range(400):
        keep, w = p.plan(e)
        sums.append(float((w[keep] * scores[keep]).sum()))
    assert abs(sum(sums) / len(sums) / float(scores.sum()) - 1) < 0.01
    assert len(keep) < 0.8 * len(scores)                     # and it does train on fewer images


def test_first_epoch_keeps_all_and_the_last_epochs_are_whole():
    p = DataPruning(DataPruningSpec(ratio=0.5, full_epochs=2), 100, 5, torch.device("cpu"), None)
    keep, w = p.plan(0)
    assert len(keep) == 100 and torch.all(w == 1)            # scores start equal: none below the mean
    p.scores = torch.arange(100.0)
    assert len(p.plan(2)[0]) < 100
    assert p.plan(3) == (None, None) and p.plan(4) == (None, None)


def test_record_keeps_old_scores_of_images_not_seen():
    p = _pruning(torch.full((6,), 9.0))
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    p.record(Batch(None, torch.tensor([0, 0]), torch.tensor([1, 4])), logits)
    p.end_epoch()
    ce = F.cross_entropy(logits, torch.tensor([0, 0]), reduction="none")
    assert torch.allclose(p.scores, torch.tensor([9.0, ce[0], 9.0, 9.0, ce[1], 9.0]))


@pytest.mark.parametrize("full, actual", [(10, 10), (10, 7), (9, 4), (5, 1)])
def test_stretched_schedule_moves_a_whole_epoch(full, actual):
    calls = []

    class Count:
        def step(self):
            calls.append(1)

    s = _Stretched(Count(), full, actual)
    per = []
    for _ in range(actual):
        before = len(calls)
        s.step()
        per.append(len(calls) - before)
    assert len(calls) == full and min(per) >= 1


def test_fit_trains_pruned_epochs_on_fewer_steps_and_ends_the_schedule(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127).long()              # learnable: bright or dark
    split = Split(x, y)
    data = Data("toy", ["a", "b"], split, split, [0.5], [0.25])
    ctx = RunContext(recipe=SimpleNamespace(data=SimpleNamespace(eval_batch_size=64)), data=data,
                     device=torch.device("cpu"))
    runs = {}
    for pruned in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        steps = []
        model.register_forward_pre_hook(lambda m, a: steps.append(len(a[0])) if m.training else None)
        spec = TrainingSpec(epochs=4, batch_size=16, eval_every=0, optimizer={"lr": 0.05},
                            data_pruning={"ratio": 0.5} if pruned else None)
        history = fit(model, Objective([CESpec()], model), spec, ctx, name="toy")
        runs[pruned] = (history, len(steps))
    (plain, n_plain), (pr, n_pr) = runs[False], runs[True]
    assert n_plain == 4 * 16
    assert [h["steps"] for h in pr][0] == 16 and pr[-1]["steps"] == 16   # first and last whole
    assert pr[0]["kept_images"] == 256 and pr[-1]["kept_images"] == 256
    assert all(h["steps"] < 16 and h["kept_images"] < 256 for h in pr[1:3])
    assert n_pr == sum(h["steps"] for h in pr) < n_plain
    assert pr[-1]["lr"] == pytest.approx(plain[-1]["lr"])    # the schedule ran to its end
    assert pr[-1]["test_top1"] > 90


def test_recipe_checks_refuse_terms_that_cannot_weight_images_and_no_pruned_epoch(tiny_recipe_dict, tmp_path):
    import yaml

    d = tiny_recipe_dict
    d["stages"][0].update(epochs=2, data_pruning={"ratio": 0.5})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    assert "valid" in validate_recipe(load_recipe(path))[0]
    d["stages"][2].update(epochs=2, data_pruning={}, loss=[{"term": "ce"}, {"term": "dist"}])
    path.write_text(yaml.safe_dump(d))
    assert "valid" in validate_recipe(load_recipe(path))[0]
    d["stages"][2]["loss"] = [{"term": "ce"}, {"term": "dkd"}]
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(CompressError, match=r"^stages\[2\]\.data_pruning: loss term 'dkd' is not a mean "
                                            r"over images, so its images cannot be weighted; terms that can: "
                                            r"ce, dist, kd$"):
        validate_recipe(load_recipe(path))
    del d["stages"][2]["data_pruning"]
    d["stages"][0]["data_pruning"] = {"full_epochs": 2}
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(CompressError, match=r"^stages\[0\]\.data_pruning\.full_epochs: 2 of the stage's 2 "
                                            r"epochs leaves none to prune; give fewer than 2$"):
        validate_recipe(load_recipe(path))
    d["stages"][0]["data_pruning"] = {"ratio": 1.0}
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(CompressError, match=r"^stages\[0\]\.data_pruning\.ratio: must be < 1"):
        load_recipe(path)


def test_pruned_distill_epochs_look_up_cached_teacher_logits_by_dataset_index():
    """DIST alone (no labels in the loss) from a cached logit table that encodes each image's
    class: the student learns the task only if every kept image of a pruned epoch is taught
    its own row of the table, and each pruned epoch trains on fewer images."""
    from compress.losses.dist import DISTSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127).long()
    split = Split(x, y)
    data = Data("toy", ["a", "b"], split, split, [0.5], [0.25])
    ctx = RunContext(recipe=SimpleNamespace(data=SimpleNamespace(eval_batch_size=64)), data=data,
                     device=torch.device("cpu"))
    table = (F.one_hot(y, 2).float() * 8 - 4).unsqueeze(0)   # [1 view, N, classes]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    objective = Objective([DISTSpec()], model, teacher_logits=table)
    spec = TrainingSpec(epochs=4, batch_size=16, eval_every=0, optimizer={"lr": 0.1},
                        data_pruning={"ratio": 0.5})
    history = fit(model, objective, spec, ctx, name="toy")
    assert all(h["kept_images"] < 256 for h in history[1:3])
    assert history[-1]["test_top1"] > 85      # 91.4%; taught a shuffled table's rows: 50%


def _score_rank(rank, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        p = _pruning(torch.full((8,), 9.0))
        logits = torch.arange(16.0).reshape(8, 2) / 4
        y = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])
        mine = torch.tensor([0, 2, 4]) + rank       # images 0-5 trained, split over the ranks; 6, 7 not
        p.record(Batch(None, y[mine], mine), logits[mine])
        p.end_epoch()
        torch.save(p.scores, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_scores_are_gathered_over_torchrun_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_score_rank, args=(f"file://{tmp_path / 'init'}", str(tmp_path / "s")), nprocs=2)
    logits = torch.arange(16.0).reshape(8, 2) / 4
    y = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])
    want = torch.cat([F.cross_entropy(logits[:6], y[:6], reduction="none"), torch.tensor([9.0, 9.0])])
    for r in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"s.{r}"), want)
