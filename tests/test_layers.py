"""The library's structure: imports flow one way, in at most 9 layers, and each concept has one home.

The module graph is read from the source with ``ast``, counting imports inside functions (what a call pulls in
is a dependency too) and leaving out those under ``if TYPE_CHECKING:`` (annotations only, never run). A *unit*
is a top-level module of ``muva_core`` or a subpackage (``muva_core.train``); its layer is 1 + the deepest
layer it imports, so no import can go from a lower layer to a higher one unless there is a circle.
"""
from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "muva_core"
MAX_LAYERS = 9


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = getattr(test, "id", None) or getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped.update(id(x) for stmt in node.body for x in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def _targets(module: str, node: ast.AST) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) pairs within muva_core."""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if not source.startswith("muva_core"):
            return []
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            out.append((sub, None) if sub in MODULES else (source, alias.name))
    else:
        out = [(alias.name, None) for alias in node.names if alias.name.startswith("muva_core")]
    return [(m, n) for m, n in out if m in MODULES]


@functools.lru_cache(maxsize=None)
def module_graph() -> dict[str, dict[str, set[str]]]:
    """``{module: {imported module: {names}}}`` over muva_core."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for module, path in MODULES.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            for target, name in _targets(module, node):
                if target != module:
                    graph[module][target].add(name or "")
    return graph


def unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def unit_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for a, targets in module_graph().items():
        for b in targets:
            if unit(a) != unit(b):
                edges[unit(a)].add(unit(b))
    return edges


def layers() -> dict[str, int]:
    edges = unit_edges()

    @functools.lru_cache(maxsize=None)
    def depth(u: str) -> int:
        return 1 + max((depth(w) for w in edges.get(u, ())), default=0)

    return {u: depth(u) for u in {unit(m) for m in MODULES}}


def test_no_import_circle_between_modules():
    edges = {a: set(t) for a, t in module_graph().items()}
    cycles = _cycles(edges)
    detail = [f"{a} -> {b}" for c in cycles for a in c for b in edges.get(a, ()) if b in c]
    assert not cycles, f"import circles: {cycles}\n" + "\n".join(detail)


def test_no_import_circle_between_packages_and_at_most_nine_layers():
    edges = unit_edges()
    cycles = _cycles(edges)
    assert not cycles, f"circles between packages: {cycles}"
    depth = layers()
    by_layer = defaultdict(list)
    for u, d in depth.items():
        by_layer[d].append(u)
    assert max(depth.values()) <= MAX_LAYERS, {d: sorted(us) for d, us in sorted(by_layer.items())}
    # the orchestration sits above what it orchestrates
    assert depth["muva_core.cli"] == max(depth.values())
    assert depth["muva_core.runs"] > max(depth["muva_core.train"], depth["muva_core.pretrain"], depth["muva_core.checks"])
    assert depth["muva_core.paths"] == 1, "paths.py imports nothing of the project"


def test_no_private_name_is_imported_across_modules():
    private = [f"{a} imports {n} from {b}" for a, targets in module_graph().items() for b, names in targets.items()
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)


def test_run_file_names_are_written_in_paths_only():
    from muva_core.paths import RUN_ARTEFACTS, RunFiles

    names = {n for n in (*RUN_ARTEFACTS, RunFiles.CONFIG) if "." in n}   # the files (folder names are common words)
    found = []
    for module, path in MODULES.items():
        if module == "muva_core.paths":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                value = node.value
                if value in names or any(value.endswith("/" + n) or value.startswith(n + "/") for n in names):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {value!r}")
    assert not found, "run file names written outside muva_core/paths.py (use RunFiles):\n" + "\n".join(found)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The reader counts a function's import: runs.open_run imports the preflight inside the function."""
    assert "muva_core.checks" in module_graph()["muva_core.runs"]
    assert "muva_core.pretrain.provision" in module_graph()["muva_core.runs"]


def test_every_committed_run_folder_keeps_its_name():
    """Moving the configuration's identity (config.py) changed no hash: each committed run folder is still named
    by the hash of its own config.yaml."""
    from muva_core.config import RunConfig, config_hash

    folders = sorted((PACKAGE.parent / "reports").glob("**/run-*/config.yaml"))
    assert len(folders) >= 100  # the evidence page's runs and the demo
    wrong = [f"{p.parent}: run-{config_hash(RunConfig.from_yaml(p))}" for p in folders
             if p.parent.name != f"run-{config_hash(RunConfig.from_yaml(p))}"]
    assert not wrong, "\n".join(wrong)


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update(t.id for t in targets if isinstance(t, ast.Name))
    return out


def test_library_modules_import_names_from_their_homes_not_from_re_exports():
    """A package's ``__init__`` may offer its names to users and notebooks; inside the library each name is
    imported from the module that defines it."""
    wrong = []
    for module, targets in module_graph().items():
        for target, names in targets.items():
            if MODULES[target].name != "__init__.py" or target == module:
                continue
            defined = _defined_names(MODULES[target])
            wrong += [f"{module} imports {n} from {target}" for n in names if n and n not in defined]
    assert not wrong, "\n".join(wrong)
