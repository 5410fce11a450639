"""The code's layout rules (README "How the code is laid out"): every script imports, llm/ has no import cycles,
the launcher's environment is read in one module, and modules stay small enough to read."""
import ast
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
ENTRY_POINTS = [ROOT / "llm" / f"{n}.py" for n in ("pretrain", "sft", "classify")] + sorted((ROOT / "tools").glob("*.py"))


def library_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted((ROOT / "llm").rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The llm modules `path` imports anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for d in ("llm", "tools", "bench")
                                        for p in (ROOT / d).rglob("*.py")))
def test_every_script_and_module_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str((ROOT / path).parent))  # as when run as a script: its folder first on sys.path
    runpy.run_path(str(ROOT / path), run_name="imported_by_test")  # the __main__ block does not run


def test_llm_has_no_import_cycles():
    modules = library_modules()
    graph = {m: imports_of(p, set(modules)) - {m} for m, p in modules.items()}
    for m in graph:  # a package's __init__ re-exporting its own submodules is not a cycle
        graph[m] = {d for d in graph[m] if not (modules[d].name == "__init__.py" and m.startswith(d + "."))}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_only_llm_train_dist_reads_the_launcher_environment():
    readers = []
    for p in [*(ROOT / "llm").rglob("*.py"), *(ROOT / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and node.value in LAUNCHER_ENV:
                readers.append(str(p.relative_to(ROOT)))
    assert set(readers) <= {"llm/train/dist.py", "llm/cli.py"}, readers  # cli.py only sets LOCAL_RANK from argv


def test_modules_and_entry_points_stay_short():
    long_modules = {str(p.relative_to(ROOT)): n for p in (ROOT / "llm").rglob("*.py")
                    if (n := len(p.read_text().splitlines())) > 450}
    long_entries = {str(p.relative_to(ROOT)): n for p in ENTRY_POINTS if (n := len(p.read_text().splitlines())) > 150}
    assert not long_modules and not long_entries, (long_modules, long_entries)
