"""The package's layout holds (docs/architecture.md): the core lives in folders, kernels/ below
distattn/ below megatron/, planner/ and jobs/, and no import circle anywhere. Read with ast from
the sources, lazy imports inside functions included."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "megatron_lightseq"
TOP_LEVEL = {"megatron_lightseq.__main__", "megatron_lightseq.run"}  # besides the package's __init__
FOLDERS = {"kernels", "distattn", "megatron", "planner", "jobs"}
NEVER = {  # folder -> folders it must not import
    "kernels": {"distattn", "megatron", "planner", "jobs"},
    "distattn": {"megatron", "planner", "jobs"},
    "megatron": {"planner", "jobs"},
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("megatron_lightseq",) + path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
    """The package modules ``name`` imports (a name imported from a package counts as its module
    when it is one)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in modules and t != name}


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS else None


def test_no_core_module_at_the_top_level():
    top = {m for m in _modules() if m.count(".") == 1 and _folder(m) is None}
    assert top == TOP_LEVEL, top ^ TOP_LEVEL


def test_imports_run_one_way():
    wrong = [(m, t) for m, targets in _graph().items() for t in targets
             if _folder(m) in NEVER and _folder(t) in NEVER[_folder(m)]]
    assert not wrong, wrong


def test_no_import_circle():
    graph, state, circles = _graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


DISTATTN_NEVER = {  # distattn's parts: the plan is pure data, the transport knows no plan, the run uses both
    "plan": {"run", "transport"},
    "transport": {"plan", "run"},
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[1] == "distattn" else None


def test_distattn_parts_import_one_way():
    wrong = [(m, t) for m, targets in _graph().items() for t in targets
             if _part(m) in DISTATTN_NEVER and _part(t) in DISTATTN_NEVER[_part(m)]]
    assert not wrong, wrong
    plan_modules = [p for m, p in _modules().items() if _part(m) == "plan"]
    assert plan_modules and not [p for p in plan_modules if "torch.distributed" in p.read_text()]


def test_q_reaches_a_kernel_through_at_most_six_modules(monkeypatch):
    """Megatron's core attention calls dist_attn; from there to the kernel that computes, the
    frames on the stack lie in at most five modules (api, run/pipeline, run/executor, the kernel's
    own and its base), so q's options cross at most six from core attention to a kernel."""
    import inspect

    import torch

    import megatron_lightseq as mls
    from megatron_lightseq.kernels.math import MathKernel

    assert "from ..distattn import dist_attn" in (PACKAGE / "megatron" / "core_attention.py").read_text()
    seen = []
    forward = MathKernel.forward

    def spy(self, *args, **kwargs):
        seen.append([f.frame.f_globals.get("__name__", "") for f in inspect.stack()])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MathKernel, "forward", spy)
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    mls.dist_attn(q, q, q, kernel="math")
    stack = seen[0]
    calls = stack[:next(i for i, m in enumerate(stack) if m == "megatron_lightseq.distattn.api") + 1]
    modules = {m for m in calls if m.startswith("megatron_lightseq.")}
    assert len(modules) <= 5 and "megatron_lightseq.distattn.run.executor" in modules, sorted(modules)
