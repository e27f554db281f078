"""The shape of the code, read from its source (no imports of the checked modules):

- the import graph of `grpo`, `rewards` and `reward_models` (every import, also those inside functions)
  has no circle, and points one way: `reward_models` may use `grpo` and `rewards`, `grpo` uses `rewards`
  but never `reward_models` (a learned reward reaches training through the reward registry), and
  `rewards` stands alone;
- imports sit at module level, except the heavy optional backends (vLLM, DeepSpeed), which load when chosen;
- no function is longer than 60 lines;
- `grpo/trainer.py` reads top down: `train` and `train_step` within its first 80 lines, under 250 in all.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("grpo", "rewards", "reward_models")
LAZY = ("vllm", "deepspeed")  # imported where a config chooses them: `import grpo` must not load them
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    """Every module of the packages, by dotted name, parsed."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imported_names(node: ast.AST) -> list[str]:
    """The dotted names an import statement may load (`from a import b` may load `a.b`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
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


def test_the_import_graph_has_no_circle_and_points_one_way():
    graph = import_graph(modules())
    assert cycles(graph) == []
    for module, targets in graph.items():
        top = module.split(".")[0]
        allowed = {"grpo": {"grpo", "rewards"}, "rewards": {"rewards"}, "reward_models": set(PACKAGES)}[top]
        wrong = sorted(t for t in targets if t.split(".")[0] not in allowed)
        assert not wrong, f"{module} imports {wrong}"


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_are_at_module_level_except_the_heavy_backends():
    inner = []
    for name, tree in modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    for target in imported_names(node)[:1]:
                        if target.split(".")[0] not in LAZY:
                            inner.append(f"{name}.{fn.name}: {target}")
    assert inner == []


def test_no_function_is_longer_than_60_lines():
    long = [f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
            for name, tree in modules().items() for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_grpo_loop_is_on_top_of_its_module():
    source = (ROOT / "grpo" / "trainer.py").read_text()
    tree = ast.parse(source)
    starts = {fn.name: fn.lineno for fn in tree.body if isinstance(fn, ast.FunctionDef)}
    assert starts["train"] <= 80 and starts["train_step"] <= 80, starts
    assert len(source.splitlines()) < 250
