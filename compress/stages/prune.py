"""`prune`: structured channel pruning, a thin layer over torch-pruning's BasePruner."""

import copy
import fnmatch
import math
from typing import Literal, Optional

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..config import StageSpec, stage_ref
from ..errors import CompressError, did_you_mean
from ..hooks import resolve
from ..models import apply_layer_shapes, build_model, classifier_path, layer_shapes, make_spec, resolve_point
from ..registry import Registry
from . import StageResult, describe, model_cost, plan_student, prepare, register

IMPORTANCES = Registry("importance criterion")


def _tp():
    """torch-pruning, imported on first use (with the timm and torchvision it imports, 2.5-3 s
    of start-up that a command refusing a malformed recipe need not pay)."""
    import torch_pruning

    return torch_pruning


# Classic per-filter L1 (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): each
# filter ranked by the L1 norm of its own weights, no normalisation across layers.
IMPORTANCES.register("l1")(lambda: _tp().importance.MagnitudeImportance(p=1, normalizer=None,
                                                                       group_reduction="first"))
IMPORTANCES.register("l2")(lambda: _tp().importance.MagnitudeImportance(p=2, normalizer=None,
                                                                       group_reduction="first"))
# torch-pruning's default: L1 summed over the whole dependency group, mean-normalised.
IMPORTANCES.register("group_l1")(lambda: _tp().importance.MagnitudeImportance(p=1))
# Network slimming (Liu et al. 2017): |gamma| of the BatchNorm after each conv.
IMPORTANCES.register("bn_scale")(lambda: _tp().importance.BNScaleImportance())
IMPORTANCES.register("random")(lambda: _tp().importance.RandomImportance())


class PruneStage(StageSpec):
    kind: Literal["prune"] = "prune"
    from_: stage_ref(float_model=True) = Field(alias="from", description="earlier stage with a float model")
    ratio: Optional[float] = Field(None, gt=0, lt=1, description="fraction of channels removed per layer")
    target_macs: Optional[float] = Field(None, gt=0, lt=1, description="fraction of the input's MACs to keep")
    importance: str = "l1"
    global_: bool = Field(False, alias="global", description="rank channels across layers")
    steps: int = Field(1, ge=1, description="iterative pruning steps (torch-pruning iterative_steps)")
    ignore: list[str] = Field([], description="module paths left whole, besides the classifier; a path with "
                              "* ? or [ ] is a pattern naming every Conv2d/Linear whose path matches")
    round_to: Optional[int] = Field(None, ge=1, description="keep channel counts a multiple of this")
    layers: dict[str, float] = Field({}, description="per-layer ratios (module path -> fraction of its "
                                     "output channels removed) that replace `ratio` for those layers")

    @field_validator("layers")
    @classmethod
    def _layer_ratios(cls, v):
        for path, r in v.items():
            if not 0 < r < 1:
                raise ValueError(f"'{path}': {r} is not a fraction in (0, 1)")
        return v

    @model_validator(mode="after")
    def _one_target(self):
        if (self.ratio is None) == (self.target_macs is None):
            raise ValueError("give exactly one of `ratio` or `target_macs`")
        if self.importance not in IMPORTANCES:
            from ..errors import unknown

            raise ValueError(f"importance: {unknown('importance criterion', self.importance, IMPORTANCES)}")
        return self


def classifier_layers(model, num_classes):
    """The layer whose outputs are the logits (the architecture's `penultimate` point, else
    the last Linear/Conv2d with `num_classes` outputs): left whole so the class count survives."""
    path = classifier_path(model, num_classes)
    return [model.get_submodule(path)] if path is not None else []


def prune_model(model, cfg, input_shape, num_classes, ratio):
    """Prune `model` in place with torch-pruning's dependency graph (channels coupled
    through residual adds and depthwise convs are removed together); returns it."""
    example = torch.zeros(1, *input_shape)
    ignored = left_whole(model, cfg, num_classes)
    per_layer = {resolve(model, p, f"stages.{cfg.name}.layers"): r for p, r in cfg.layers.items()}
    round_to = cfg.round_to
    if (round_to or 1) > 1 and not cfg.global_ and has_channel_groups(model):
        # torch-pruning 1.6 rounds a grouped layer's per-group count against its whole width
        # (ResNeXt's 32 groups of 4: 2 per group becomes 8, which empties every group, so it
        # skips the layer): each group's ratio is rounded here instead, in its own arithmetic
        per_layer, round_to = rounded_ratios(model, example, ignored, per_layer, ratio, round_to), None
    pruner = _tp().pruner.BasePruner(
        model, example, importance=IMPORTANCES[cfg.importance](), global_pruning=cfg.global_,
        pruning_ratio=ratio, pruning_ratio_dict=per_layer or None, iterative_steps=cfg.steps,
        ignored_layers=ignored, round_to=round_to)
    for _ in range(cfg.steps):
        pruner.step()
    return model


def channel_groups(dg, m):
    """How many equal channel groups torch-pruning keeps `m`'s channels in, by its own pruner
    for the layer type (a grouped conv's groups, a GroupNorm's); 1 for other layers and, as
    BasePruner has it, for depthwise convs (pruned channel by channel with the layer before)."""
    pruner = dg.get_pruner_of_module(m)
    if pruner is None or (isinstance(m, nn.Conv2d) and m.groups == m.out_channels):
        return 1
    return pruner.get_out_channel_groups(m)


def has_channel_groups(model):
    dg = _tp().DependencyGraph()   # unbuilt: only its registry of pruners by layer type
    return any(channel_groups(dg, m) > 1 for m in model.modules())


def kept_per_group(size, groups, ratio, step):
    """Channels each of `groups` equal groups of `size` keeps at `ratio`, as torch-pruning
    counts them (int(size * (1 - ratio))), rounded down so that all groups together keep a
    multiple of `step`."""
    per = step // math.gcd(step, groups)
    keep = int(size * (1 - ratio))
    return keep - keep % per


def rounded_ratios(model, example, ignored, per_layer, ratio, step):
    """{layer: ratio} for every layer torch-pruning will narrow, such that its own count
    (int(size * (1 - ratio)) per channel group) keeps a multiple of `step` channels in all:
    `round_to` for models with grouped convs or GroupNorm. A group left as it is gets 0."""
    dg = _tp().DependencyGraph().build_dependency(model, example)
    skipped = [x for m in ignored for x in m.modules()]
    out = {}
    for group in dg.get_all_groups(ignored_layers=skipped, root_module_types=[nn.Conv2d, nn.Linear]):
        layers = [d.target.module for d, _ in group
                  if prunable(d.target.module) and dg.is_out_channel_pruning_fn(d.handler)]
        r = next((per_layer[m] for m in layers if m in per_layer), ratio)
        groups = max(channel_groups(dg, d.target.module) for d, _ in group)
        size = len(group[0][1]) // groups
        keep = kept_per_group(size, groups, r, step)
        # half a channel over `keep`, so that float rounding cannot tip torch-pruning's int()
        out.update({m: 1 - (keep + 0.5) / size if 0 < keep < size else 0.0 for m in layers})
    return out


def is_pattern(path):
    """An `ignore` entry with a shell wildcard (``*.fc1``, ``layer?.0.conv[12]``)."""
    return any(c in path for c in "*?[")


def matching_layers(model, pattern):
    """The Conv2d/Linear layers whose module paths match `pattern` (fnmatch, case-sensitive;
    ``*`` crosses dots), in model order."""
    return [m for path, m in model.named_modules() if path and prunable(m) and fnmatch.fnmatchcase(path, pattern)]


def left_whole(model, cfg, num_classes):
    """The modules pruning never narrows: the classifier and the `ignore` paths (a pattern:
    every Conv2d/Linear it matches)."""
    out = classifier_layers(model, num_classes)
    for p in cfg.ignore:
        out += matching_layers(model, p) if is_pattern(p) else [resolve(model, p, "ignore")]
    return out


def ignore_hint(model, layer):
    """How to leave `layer` whole: ``ignore: ['<layer>']``, and where more layers end in the
    same name (the squeeze-excitation convs of every block, say) the pattern for all of them,
    unless that name is so common that the pattern would leave most of the model whole
    (timm's ``.conv`` of every conv-norm-act block)."""
    hint = f"ignore: ['{layer}']"
    last = layer.rsplit(".", 1)[-1]
    pattern = f"*.{last}" if "." in layer and not last.isdigit() else None   # not '*.0': any Sequential's first
    alike = len(matching_layers(model, pattern)) if pattern else 0
    targeted = 1 < alike and 2 * alike <= sum(prunable(m) for m in model.modules())
    return hint + (f", or ['{pattern}'] for all {alike} alike" if targeted else "")


def width(m):
    """Output channels of a Conv2d, output features of a Linear: what pruning removes."""
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def prunable(m):
    return isinstance(m, (nn.Conv2d, nn.Linear))


def _listing(paths, limit=30):
    return ", ".join(paths[:limit]) + (f" ... ({len(paths)} in all)" if len(paths) > limit else "")


def prunable_paths(model, num_classes):
    """Module paths of the model's prunable layers: its Conv2d/Linear but the classifier."""
    classifier = {id(m) for m in classifier_layers(model, num_classes)}
    return [p for p, m in model.named_modules() if prunable(m) and id(m) not in classifier]


def resolve_layer(model, path, where, num_classes):
    """The module a `layers` / `ignore` entry names (a module path or feature point), or a
    CompressError listing the model's prunable layers (its Conv2d/Linear but the classifier)."""
    if resolve_point(model, path) is None:
        valid = prunable_paths(model, num_classes)
        raise CompressError(f"{where}: no layer '{path}'{did_you_mean(path, valid)}; prunable layers: "
                            f"{_listing(valid)}")
    return resolve(model, path, where)


def check_ignore(model, cfg, num_classes):
    """Each `ignore` path names a module holding a Conv2d/Linear (what pruning narrows):
    ignoring a ReLU or a pool would silently change nothing."""
    for i, p in enumerate(cfg.ignore):
        where = f"stages.{cfg.name}.ignore[{i}]"
        if is_pattern(p):
            if not matching_layers(model, p):
                raise CompressError(f"{where}: pattern '{p}' matches no Conv2d/Linear path; prunable layers: "
                                    f"{_listing(prunable_paths(model, num_classes))}")
            continue
        m = resolve_layer(model, p, where, num_classes)
        if not any(prunable(x) for x in m.modules()):
            raise CompressError(f"{where}: '{p}' is a {type(m).__name__}, with no Conv2d/Linear to leave whole; "
                                "name a conv, a linear layer or a block holding them")


def _names(members, limit=6):
    shown = ", ".join(f"'{p}'" for p, _ in members[:limit])
    return shown + (f" and {len(members) - limit} more" if len(members) > limit else "")


def dependency_groups(model, input_shape):
    """torch-pruning's dependency groups, each as (channels, [(path, width), ...], channel
    groups): the Conv2d/Linear layers whose output channels it removes together, and into how
    many equal groups a grouped conv or GroupNorm among them splits those channels. Layers
    joined by a residual add have the group's width (the same channels go from each);
    layers whose outputs are concatenated and then read by an add or a depthwise conv share
    one group as wide as their sum, which torch-pruning ranks, rounds and splits as a whole."""
    dg = _tp().DependencyGraph().build_dependency(model, torch.zeros(1, *input_shape))
    names = {m: p for p, m in model.named_modules()}
    order = {p: i for i, p in enumerate(names.values())}
    groups = []
    for group in dg.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        layers = {names[d.target.module]: width(d.target.module) for d, _ in group
                  if prunable(d.target.module) and d.target.module in names
                  and dg.is_out_channel_pruning_fn(d.handler)}
        if layers:
            groups.append((len(group[0][1]), sorted(layers.items(), key=lambda kv: order[kv[0]]),
                           max(channel_groups(dg, d.target.module) for d, _ in group)))
    return sorted(groups, key=lambda g: order[g[1][0][0]])   # in model order, for messages


def _roles(model, cfg, num_classes):
    """({module path: (recipe key, ratio)} of the `layers` entries, {module paths left whole}:
    the classifier, the `ignore` entries and everything inside them)."""
    path_of = {id(m): p for p, m in model.named_modules()}
    given = {path_of[id(resolve(model, k, f"stages.{cfg.name}.layers"))]: (k, r) for k, r in cfg.layers.items()}
    whole = {path_of[id(x)] for m in left_whole(model, cfg, num_classes) for x in m.modules()}
    return given, whole


def check_coupling(model, cfg, input_shape, num_classes):
    """Refuse what torch-pruning would silently do otherwise with layers it prunes together:
    two different `layers` ratios in one group (one of them would win), a `layers` ratio for
    a layer coupled with one left whole (nothing would be pruned), `round_to` on layers
    whose outputs are concatenated into one group (it rounds the group, not each layer), and
    `round_to` with global ranking on grouped convs or GroupNorm (it empties them).
    Returns the groups (:func:`dependency_groups`)."""
    where = f"stages.{cfg.name}"
    groups = dependency_groups(model, input_shape)
    given, whole = _roles(model, cfg, num_classes)
    grouped = [members for _, members, n in groups if n > 1 and not any(p in whole for p, _ in members)]
    if grouped and cfg.global_ and (cfg.round_to or 1) > 1:
        raise CompressError(f"{where}.round_to: {cfg.round_to} cannot hold with global: true for "
                            f"{_names(grouped[0])} (a grouped conv or GroupNorm): torch-pruning rounds their "
                            "per-group count against the whole width and empties them; drop round_to or global")
    for channels, members, _ in groups:
        if len(members) < 2:
            continue
        asked = [given[p] for p, _ in members if p in given]
        kept = [(p, w) for p, w in members if p in whole]
        if asked and kept:
            raise CompressError(f"{where}.layers.{asked[0][0]}: coupled with '{kept[0][0]}', which is left whole "
                                f"(ignored or the classifier), so torch-pruning prunes none of {_names(members)}")
        if len({r for _, r in asked}) > 1:
            (a, ra), (b, rb) = asked[0], next(x for x in asked if x[1] != asked[0][1])
            raise CompressError(f"{where}.layers: '{a}' ({ra:g}) and '{b}' ({rb:g}) are coupled: torch-pruning "
                                f"removes the same channels from {_names(members)}; give them one ratio")
        if not kept and (cfg.round_to or 1) > 1 and any(w != channels for _, w in members):
            raise CompressError(f"{where}.round_to: {cfg.round_to} cannot hold for {_names(members)}: their outputs "
                                f"are concatenated into one group of {channels} channels, which torch-pruning "
                                "rounds as a whole and splits between them by importance; `ignore` them or drop round_to")
    return groups


def spread_ratios(groups, model, cfg, num_classes):
    """Lines naming the layers a `layers` ratio also narrows because they are coupled with
    the layer it names (torch-pruning gives the whole group that ratio)."""
    given, lines = _roles(model, cfg, num_classes)[0], []
    for _, members, _ in groups:
        asked = [given[p] for p, _ in members if p in given]
        others = [(p, w) for p, w in members if p not in given]
        if asked and others:
            lines.append(f"note: stages.{cfg.name}.layers.{asked[0][0]}: ratio {asked[0][1]:g} also applies to "
                         f"{_names(others)} (coupled: pruned together)")
    return lines


def check_outcome(groups, model, cfg, num_classes, ratio):
    """After a local prune: no group the ratio asks to narrow was left whole (torch-pruning
    skips, without a word, a group in which removing the least important channels would
    empty one of its layers, e.g. one branch of a concatenation), and no grouped conv or
    GroupNorm was left whole because no multiple of `round_to` splits into its groups."""
    if cfg.global_:
        return
    given, whole = _roles(model, cfg, num_classes)
    step = cfg.round_to or 1
    stuck = []   # grouped layers that no multiple of round_to lets torch-pruning narrow
    for channels, members, n in groups:
        if any(p in whole for p, _ in members):
            continue
        r = next((given[p][1] for p, _ in members if p in given), ratio)
        size = channels // n
        keep = kept_per_group(size, n, r, step) * n
        if n > 1 and keep == 0 and int(size * (1 - r)) > 0:
            stuck.append((members, n, size, r))
            continue
        if 0 < keep < channels and all(width(model.get_submodule(p)) == w for p, w in members):
            what = (f"'{members[0][0]}'" if len(members) == 1 else
                    f"{_names(members)} ({'concatenated' if any(w != channels for _, w in members) else 'coupled'})")
            raise CompressError(f"stages.{cfg.name}: torch-pruning left {what} whole, though ratio {r:g} asks to "
                                f"remove {channels - keep} of {channels} channels: the least important would empty "
                                "a layer; give them a smaller ratio under `layers`, or `ignore` them")
    if stuck:
        members, n, size, r = stuck[0]
        fits = next(k for k in range(step, 0, -1) if all(kept_per_group(sz, g, q, k) for _, g, sz, q in stuck))
        more = f" (and {len(stuck) - 1} more such groups)" if len(stuck) > 1 else ""
        raise CompressError(f"stages.{cfg.name}.round_to: {step} cannot hold for {_names(members)}{more}: a "
                            f"grouped conv or GroupNorm splits the channels into {n} groups of {size}, which keep as "
                            f"many each, and at ratio {r:g} no count under {size} makes a multiple of {step}; "
                            f"round_to {fits} lets all be narrowed, or leave them whole "
                            f"({ignore_hint(model, members[0][0])})")


def largest_ratio(c, step):
    """The largest ratio that leaves a layer of `c` channels at least `step` of them:
    keep = int(c * (1 - r)) >= step  <=>  r <= 1 - step / c (less a hair for float rounding)."""
    return max(0.0, 1 - step / c - 1e-9)


def max_ratio(model, cfg, num_classes):
    """The largest per-layer ratio that leaves every pruned layer at least one channel, and
    the layer that sets it. torch-pruning keeps int(C * (1 - ratio)) of a layer's C channels
    (rounded down to `round_to`) and silently skips a layer it would empty, so above this
    ratio fewer channels would be pruned, not more."""
    ignored = {id(m) for m in left_whole(model, cfg, num_classes)}
    ignored |= {id(resolve(model, p, "layers")) for p in cfg.layers}   # their own ratios apply
    step = cfg.round_to or 1
    widths = [(path, width(m)) for path, m in model.named_modules()
              if prunable(m) and id(m) not in ignored]
    if not widths:
        return None, None
    path, c = min(widths, key=lambda w: w[1])
    return largest_ratio(c, step), path


def check_layers(model, cfg, num_classes):
    """The `layers` paths name prunable layers, and no per-layer ratio empties its layer."""
    ignored = {id(m) for m in left_whole(model, cfg, num_classes)}
    step = cfg.round_to or 1
    for path, r in cfg.layers.items():
        m = resolve_layer(model, path, f"stages.{cfg.name}.layers", num_classes)
        if not prunable(m) or id(m) in ignored:
            raise CompressError(f"stages.{cfg.name}.layers: '{path}' is not a prunable Conv2d/Linear "
                                "(the classifier and `ignore` paths are left whole)")
        if width(m) < step:
            raise CompressError(f"stages.{cfg.name}.round_to: {step} is wider than layer '{path}' "
                                f"({width(m)} channels); give round_to <= {width(m)}")
        if int(width(m) * (1 - r)) < step:
            raise CompressError(f"stages.{cfg.name}.layers.{path}: {r:g} would leave it no channel; "
                                f"at most {largest_ratio(width(m), step):.4f} (with round_to {step})")


def check_ratio(model, cfg, num_classes, ratio, field):
    """Refuse a ratio that would empty a layer (torch-pruning would then prune less)."""
    top, layer = max_ratio(model, cfg, num_classes)
    if top is None:
        raise CompressError(f"stages.{cfg.name}: nothing to prune (every Conv2d/Linear is ignored or the classifier)")
    # torch-pruning's own arithmetic: the narrowest layer keeps int(C * (1 - ratio)) channels
    # (exact at boundaries such as 16 channels, ratio 0.5, round_to 8, which `top` excludes)
    c = width(model.get_submodule(layer))
    if c < (cfg.round_to or 1):
        # leaving the narrow layers whole helps only where round_to fits the others
        fits = any(prunable(m) and width(m) >= cfg.round_to for m in model.modules())
        raise CompressError(f"stages.{cfg.name}.round_to: {cfg.round_to} is wider than layer '{layer}' "
                            f"({c} channels); give round_to <= {c}"
                            + (f" or leave it whole ({ignore_hint(model, layer)})" if fits else ""))
    if int(c * (1 - ratio)) < (cfg.round_to or 1):
        # the ways out: a lower ratio, or that layer left whole / pruned less, or finer rounding
        raise CompressError(f"stages.{cfg.name}.{field}: {ratio:g} would leave layer '{layer}' ({c} channels) no "
                            f"channel; at most {top:.4f} for this model (with round_to {cfg.round_to or 1}), "
                            f"or leave it whole ({ignore_hint(model, layer)}) or give it its own ratio "
                            f"(layers: {{'{layer}': R}})" + (", or lower round_to" if (cfg.round_to or 1) > 1 else ""))


def ratio_for_macs(model, cfg, input_shape, num_classes, target):
    """Smallest per-layer ratio whose pruned model keeps <= `target` x the MACs (bisection:
    torch-pruning has no MACs target of its own; importance is deterministic)."""
    _, base = model_cost(model, input_shape)
    lo, hi = 0.0, max_ratio(model, cfg, num_classes)[0] or 0.0
    for _ in range(14):
        mid = (lo + hi) / 2
        trial = prune_model(copy.deepcopy(model), cfg, input_shape, num_classes, mid)
        if model_cost(trial, input_shape)[1] <= target * base:
            hi = mid
        else:
            lo = mid
    trial = prune_model(copy.deepcopy(model), cfg, input_shape, num_classes, hi)
    got = model_cost(trial, input_shape)[1] / base
    if got > target * 1.001:
        raise CompressError(f"stages.{cfg.name}.target_macs: {target} not reachable with importance "
                            f"'{cfg.importance}'{' and global ranking' if cfg.global_ else ''} "
                            f"(best {got:.3f} at ratio {hi:.2f}); use `ratio`, or global: false")
    return hi


def check_rebuild(rebuilt, pruned, input_shape, where):
    """CompressError unless `rebuilt` (the spec's architecture, with the pruned model's
    weights loaded) computes exactly what `pruned` computes."""
    pruned = copy.deepcopy(pruned).float().cpu().eval().to(memory_format=torch.contiguous_format)
    try:
        rebuilt.load_state_dict(pruned.state_dict())
    except RuntimeError as e:
        raise CompressError(f"{where}: the pruned model cannot be rebuilt from its spec "
                            f"({str(e).strip().splitlines()[0][:160]})") from None
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(rebuilt.eval()(x), pruned(x))
    if not same:
        raise CompressError(f"{where}: the model rebuilt from the pruned spec computes other outputs; "
                            "a pruned layer type is not recorded in the spec")


def _plan(cfg, inputs, build):
    """Check on the input's skeleton what `run` would fail on after training: the `ignore`
    paths exist, the ratio leaves every layer a channel, a MACs target is reachable, and a
    trial prune with the stage's settings runs on torch-pruning's graph, narrows every group
    it asks to, still maps a batch to logits and rebuilds bit-exactly from the recorded
    shapes. Returns the pruned skeleton."""
    skel = plan_student(cfg, inputs, build)
    shape, ncls = build.input_shape, build.num_classes
    where = f"stages.{cfg.name}"
    check_ignore(skel, cfg, ncls)
    check_layers(skel, cfg, ncls)
    original = copy.deepcopy(skel)
    try:
        if cfg.ratio is not None:
            check_ratio(skel, cfg, ncls, cfg.ratio, "ratio")
            ratio = cfg.ratio
        else:
            ratio = ratio_for_macs(copy.deepcopy(skel).eval(), cfg, shape, ncls, cfg.target_macs)
        groups = check_coupling(skel, cfg, shape, ncls)
        prune_model(skel, cfg, shape, ncls, ratio)
        check_outcome(groups, skel, cfg, ncls, ratio)
        out = skel.eval()(torch.zeros(2, *shape))
        if tuple(out.shape) != (2, ncls):
            raise ValueError(f"the pruned model maps a batch of 2 to logits of shape {tuple(out.shape)}")
    except CompressError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning errors become one line
        raise CompressError(f"{where}: torch-pruning cannot prune this model: {type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[0][:160]}") from None
    with torch.no_grad():
        rebuilt = apply_layer_shapes(copy.deepcopy(original), layer_shapes(skel))
    check_rebuild(rebuilt, skel, shape, where)
    return skel


@register("prune", PruneStage, _plan)
def run(cfg, ctx):
    """Remove the least important channels of stage `from`'s model.

    >>> # {name: prune, kind: prune, from: teacher, ratio: 0.7}
    """
    src = ctx.results[cfg.from_]
    model = copy.deepcopy(src.get_model()).float().cpu().eval().to(memory_format=torch.contiguous_format)
    shape, ncls = ctx.data.input_shape, ctx.data.num_classes
    before = layer_shapes(model)
    params0, macs0 = model_cost(model, shape)
    check_ignore(model, cfg, ncls)
    check_layers(model, cfg, ncls)
    if cfg.ratio is not None:
        check_ratio(model, cfg, ncls, cfg.ratio, "ratio")
    ratio = cfg.ratio if cfg.ratio is not None else ratio_for_macs(model, cfg, shape, ncls, cfg.target_macs)
    try:
        groups = check_coupling(model, cfg, shape, ncls)
        prune_model(model, cfg, shape, ncls, ratio)
    except CompressError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning errors become one line
        raise CompressError(f"stages.{cfg.name}: torch-pruning failed: {type(e).__name__}: {e}") from None
    check_outcome(groups, model, cfg, ncls, ratio)
    for line in spread_ratios(groups, model, cfg, ncls):
        print(f"  {line}")
    after = layer_shapes(model)
    widths = {p: [before[p]["out_channels"], s["out_channels"]] for p, s in after.items()
              if "out_channels" in s and s != before[p]}
    spec = make_spec(src.spec["arch"], src.spec["args"], model)
    check_rebuild(build_model(spec), model, shape, f"stages.{cfg.name}")
    model = prepare(model, ctx)
    metrics = describe(model, ctx)
    metrics.update({"params_before": params0, "macs_before": macs0,
                    "params_ratio": round(metrics["params"] / params0, 4),
                    "macs_ratio": round(metrics["macs"] / macs0, 4)})
    return StageResult(spec=spec, model=model,
                       metrics=metrics, info={"ratio": round(ratio, 4), "widths": widths})
