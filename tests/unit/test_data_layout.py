"""pipeline/data/ shows the flow source -> decode -> encode -> store -> load (+ precompute): a step imports
only the steps before it, and no module imports itself through others (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "pipeline" / "data"
STEPS = ["source", "decode", "encode", "store", "load", "precompute"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in DATA.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` imports the submodule
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                           else node.module for alias in node.names]
            for target in targets:
                if target.startswith("pipeline.data"):
                    assert target in modules, f"{path}: imports {target}, which does not exist"
                    graph[name].add(target)
    return graph


def _step(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else None


def test_every_module_belongs_to_a_step():
    loose = [m for m in _import_graph() if m != "pipeline.data" and _step(m) not in STEPS]
    assert not loose, f"modules outside the step packages {STEPS}: {loose}"


def test_steps_import_only_earlier_steps():
    backwards = [(m, t) for m, targets in _import_graph().items() for t in targets
                 if _step(m) in STEPS and _step(t) in STEPS and STEPS.index(_step(t)) > STEPS.index(_step(m))]
    assert not backwards, f"imports from a later step: {backwards}"


def test_no_import_cycles():
    graph, state, cycles = _import_graph(), {}, []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
