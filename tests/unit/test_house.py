"""The shape of the code, read from its source (no imports of the checked modules):

- the import graph of `grpo`, `rewards` and `reward_models` has no circle; every import counts, also those
  inside functions, and so does a string naming a module to import later (`"pkg.module:attr"`, as registries
  and entry points write them);
- imports point one way, in the order docs/architecture.md states (its `text` block of layers, read here):
  a module imports from its own layer and those below; `rewards` imports nothing of the other two,
  `grpo` nothing of `reward_models`; every folder and module the map names exists;
- `grpo/core/` imports nothing else of `grpo`;
- imports sit at module level, except the heavy optional backends (vLLM, DeepSpeed), which load when chosen;
- no function is longer than 60 lines;
- `grpo/algorithms/grpo.py` reads top down: `train` and `train_step` within its first 80 lines, under 250 in all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("grpo", "rewards", "reward_models")
# imported where a config chooses them: `import grpo` must not load them (the backends, peft; the last three cost
# a few seconds of every launch and rank: a hub dataset, a reasoning_gym task, wandb logging)
LAZY = ("vllm", "deepspeed", "peft", "datasets", "reasoning_gym", "grpo.data.reasoning_gym", "wandb")
MAX_FUNCTION_LINES = 60
MODULE_STRING = re.compile(r"^((?:grpo|rewards|reward_models)(?:\.\w+)+):[\w.]+$")  # "pkg.module:attr"


def modules() -> dict[str, ast.Module]:
    """Every module of the packages, by dotted name, parsed."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imported_names(node: ast.AST) -> list[str]:
    """The dotted names an import statement may load (`from a import b` may load `a.b`), or that a string
    naming a module to import later holds."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        match = MODULE_STRING.match(node.value)
        return [match.group(1)] if match else []
    return []


def import_graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, tree in mods.items():
        targets = {resolve(t) for node in ast.walk(tree) for t in imported_names(node)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def stated_layers() -> list[list[str]]:
    """The layers docs/architecture.md states, top first, as dotted prefixes (`grpo/core/` -> `grpo.core`)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```text\n(.*?)```", text, re.S).group(1)
    return [[w.removesuffix("/").removesuffix(".py").replace("/", ".") for w in line.split()]
            for line in block.splitlines() if line.strip()]


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The index (0 = top) of the layer holding `module`: its longest matching prefix; None outside the map."""
    best = None
    for i, layer in enumerate(layers):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph(modules())) == []


def test_the_stated_map_names_what_exists_and_covers_every_module():
    layers = stated_layers()
    for prefix in (p for layer in layers for p in layer):
        path = ROOT / prefix.replace(".", "/")
        assert path.is_dir() or path.with_suffix(".py").is_file(), f"docs/architecture.md names {prefix}: missing"
    outside = [m for m in modules() if m.startswith(("grpo.", "rewards")) and layer_of(m, layers) is None]
    assert outside == [], "modules docs/architecture.md places nowhere"


def test_imports_point_down_the_stated_layers():
    layers = stated_layers()
    graph = import_graph(modules())
    upward = []
    for module, targets in graph.items():
        top = module.split(".")[0]
        allowed = {"grpo": {"grpo", "rewards"}, "rewards": {"rewards"}, "reward_models": set(PACKAGES)}[top]
        upward += [f"{module} -> {t}" for t in targets if t.split(".")[0] not in allowed]
        if top == "reward_models":
            continue
        mine = layer_of(module, layers)
        if mine is None:  # the package `grpo` itself: its __init__ imports nothing
            continue
        upward += [f"{module} -> {t}" for t in targets if layer_of(t, layers) < mine]
    assert upward == []


def test_core_imports_nothing_else_of_grpo():
    graph = import_graph(modules())
    out = [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("grpo.core")
           for t in ts if t.startswith("grpo") and not t.startswith("grpo.core")]
    assert out == []


def test_the_layer_check_sees_an_upward_string_import():
    """A registry naming an upper module by string is an import the layer check refuses."""
    tree = ast.parse('ENGINES = {"x": "grpo.algorithms.ppo:train"}')
    names = [t for node in ast.walk(tree) for t in imported_names(node)]
    assert names == ["grpo.algorithms.ppo"]
    layers = stated_layers()
    assert layer_of("grpo.algorithms.ppo", layers) < layer_of("grpo.rollout", layers)


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_are_at_module_level_except_the_heavy_backends():
    inner = []
    for name, tree in modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    for target in imported_names(node)[:1]:
                        if not any(target == lazy or target.startswith(f"{lazy}.") for lazy in LAZY):
                            inner.append(f"{name}.{fn.name}: {target}")
    assert inner == []


def test_no_function_is_longer_than_60_lines():
    long = [f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
            for name, tree in modules().items() for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_grpo_loop_is_on_top_of_its_module():
    source = (ROOT / "grpo" / "algorithms" / "grpo.py").read_text()
    tree = ast.parse(source)
    starts = {fn.name: fn.lineno for fn in tree.body if isinstance(fn, ast.FunctionDef)}
    assert starts["train"] <= 80 and starts["train_step"] <= 80, starts
    assert len(source.splitlines()) < 250
