"""Recipe YAML, read safely and within bounds.

- YAML 1.2 core-schema scalars: ``1e-3`` and ``1e308`` are floats (YAML 1.1, PyYAML's default,
  reads them as strings), ``.inf``/``.nan`` are floats, ``yes``/``on`` stay strings, and
  ``0o17``/``0x1f`` are ints.
- A key given twice in one mapping is an error (YAML forbids it; PyYAML keeps the last).
- Bounded: the file size, the node count after alias expansion (an "alias bomb" of a few
  hundred bytes expands to billions of nodes) and the nesting depth have limits; past them
  one CompressError, decided before anything is built.
"""

import re

import yaml

from .errors import CompressError

MAX_BYTES = 128 * 1024       # the largest shipped recipe is ~4 KB; libyaml parses 128 KiB in < 0.5 s
MAX_NODES = 100_000          # scalars + collections after alias expansion
MAX_DEPTH = 64               # nesting of mappings and lists


_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml's parser: ~7x faster


class RecipeLoader(_Base):
    """SafeLoader with YAML 1.2 core-schema resolvers and duplicate-key detection."""


# Start from no implicit resolvers and add the YAML 1.2 core schema's.
RecipeLoader.yaml_implicit_resolvers = {}
_CORE = [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", "<"),
]
for _tag, _regex, _first in _CORE:
    RecipeLoader.add_implicit_resolver(_tag, re.compile(_regex), list(_first))


MAX_INT_DIGITS = 100   # far beyond any recipe number; Python refuses to parse > 4300


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    if len(text) > MAX_INT_DIGITS:
        raise CompressError(f"line {node.start_mark.line + 1}: an integer of {len(text)} characters; "
                            f"at most {MAX_INT_DIGITS}")
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)    # YAML 1.2: a leading 0 is decimal, not octal


def _construct_float(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise CompressError(f"line {key_node.start_mark.line + 1}: a mapping key must be a "
                                "plain value, not a list or mapping") from None
        if key in seen:
            raise CompressError(f"line {key_node.start_mark.line + 1}: duplicate key {_short(key)} "
                                f"(first at line {seen[key] + 1}); each key may appear once")
        seen[key] = key_node.start_mark.line
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


def _construct_yaml_map(loader, node):
    data = {}
    yield data
    data.update(_construct_mapping(loader, node))


RecipeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
RecipeLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
RecipeLoader.add_constructor("tag:yaml.org,2002:map", _construct_yaml_map)


def _short(v, n=60):
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def _check_size(root):
    """Count nodes as if every alias were expanded (shared subtrees counted once per use,
    computed once per node) and the deepest nesting; refuse cycles, bombs and deep trees."""
    size, depth, state = {}, {}, {}
    stack = [(root, False)]
    while stack:   # iterative post-order walk: no recursion limit to hit
        node, done = stack.pop()
        nid = id(node)
        if done:
            kids = _children(node)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            depth[nid] = 1 + max((depth[id(k)] for k in kids), default=0) \
                if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) else 0
            state[nid] = 2
            if size[nid] > MAX_NODES:
                raise CompressError(f"more than {MAX_NODES} values once its aliases are expanded; "
                                    "a recipe is far smaller (an alias bomb?)")
            if depth[nid] > MAX_DEPTH:
                raise CompressError(f"nested more than {MAX_DEPTH} levels deep; a recipe is far flatter")
            continue
        if state.get(nid) == 2:
            continue
        if state.get(nid) == 1:
            raise CompressError(f"line {node.start_mark.line + 1}: an alias refers to the node that "
                                "contains it (a recursive structure)")
        state[nid] = 1
        stack.append((node, True))
        for k in _children(node):
            if state.get(id(k)) == 1:
                raise CompressError(f"line {k.start_mark.line + 1}: an alias refers to the node that "
                                    "contains it (a recursive structure)")
            if state.get(id(k)) != 2:
                stack.append((k, False))


def _children(node):
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


_QUOTED_OR_COMMENT = re.compile(r"'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"|#[^\n]*")


def _flow_depth(text):
    """Deepest nesting of flow brackets ([ and {) outside quotes and comments: checked before
    parsing, since the parser recurses once per level."""
    depth = deepest = 0
    for ch in _QUOTED_OR_COMMENT.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def load_yaml(text, where):
    """The Python value of one YAML document `text`; every problem is one CompressError
    starting with `where` (a file name, or ``--set PATH``).

    >>> load_yaml("lr: 1e-3", "x.yaml")
    {'lr': 0.001}
    """
    if len(text) > MAX_BYTES:
        raise CompressError(f"{where}: {len(text)} characters; a recipe may have at most {MAX_BYTES}")
    if _flow_depth(text) > MAX_DEPTH:
        raise CompressError(f"{where}: nested more than {MAX_DEPTH} levels deep; a recipe is far flatter")
    loader = RecipeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise CompressError(f"{where}: nested too deeply to be a recipe") from None
        if node is None:
            return None
        try:
            _check_size(node)
            return loader.construct_document(node)
        except CompressError as e:
            raise CompressError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CompressError(f"{where}: YAML syntax error{at}: {_short(problem, 200)}") from None
    finally:
        loader.dispose()
