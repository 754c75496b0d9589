"""The house rules, checked: dependencies point one way (noise contract -> kernels -> optim ->
sparsity/tasks/storage -> run -> cli/hf), no module imports itself back through any chain (lazy
and TYPE_CHECKING imports counted, inside a package too), the Philox stream words are unique, and
every package imports on its own."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (import prefix, layer); the longest matching prefix wins. Same layer = siblings, which must
# not import each other (except a package importing itself).
LAYERS = [
    ("zoengine.hwsim", 0),  # numpy-only leaf: imports nothing else from zoengine
    ("zoengine.faults", 0),  # crash points for recovery tests: stdlib only
    ("zoengine.checks", 0),  # the configurations' value checks: stdlib only
    ("zoengine.extras", 0),  # optional dependencies and their error: stdlib only
    ("zoengine.architectures", 0),
    ("zoengine.hashing", 0),  # a file's SHA-256: stdlib only  # what each architecture calls its parts: stdlib only
    ("zoengine.kernels", 1),
    ("zoengine.noise", 2),  # the contract's public face: generate() over the kernels
    ("zoengine.optim", 2),
    ("zoengine.sparsity", 3),
    ("zoengine.tasks", 3),
    ("zoengine.models", 3),
    ("zoengine.loading", 3),  # model folders read with one copy of the weights
    ("zoengine.journal", 3),
    ("zoengine.storage", 3),  # run folders on disk: imports only zoengine.faults, .hashing
    ("zoengine.distributed", 3),
    ("zoengine.run", 4),
    ("zoengine.hf", 5),
    ("zoengine.cli", 5),
    ("zoengine.__main__", 6),
]
SOURCE_DIRS = {"zoengine": "zoengine"}


def _layer(module: str) -> tuple[str, int] | None:
    best = None
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best


def _modules():
    for folder, package in SOURCE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def _imports(path: pathlib.Path, module: str) -> list[str]:
    """Every zoengine module ``path`` imports, at top level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0)
                                        or None]
                base = ".".join(pkg + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]  # `from zoengine import run`
    return [m for m in out if m.startswith("zoengine")]


def _violations():
    bad = []
    for module, path in _modules():
        own = _layer(module)
        if own is None:
            continue
        for target in _imports(path, module):
            other = _layer(target)
            if other is None or other[0] == own[0]:
                continue
            if other[1] > own[1] or (other[1] == own[1]):
                bad.append(f"{module} (layer {own[1]}) imports {target} (layer {other[1]})")
    return bad


def _import_graph(modules: dict) -> dict:
    """module -> the zoengine modules it imports (each target resolved to the longest known
    module: ``from zoengine.run.job import f`` -> ``zoengine.run.job``). The implicit import of
    a parent package is not an edge: Python runs ``zoengine.run``'s __init__ before
    ``zoengine.run.job`` whatever job imports, and that is not a cycle of ours."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for target in _imports(path, module):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # an ancestor package has run its __init__ before this module: importing a name
            # from it (`from zoengine.kernels import reference`) adds no edge to the __init__
            if target and target != module and not module.startswith(target + "."):
                targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycle_anywhere():
    """No module reaches itself again through imports, lazy ones inside functions and
    ``if TYPE_CHECKING:`` ones included, within a package as well as across packages."""
    assert _cycles(_import_graph(dict(_modules()))) == []


def test_cycle_check_catches_a_lazy_cycle_inside_a_package(tmp_path):
    # the check itself must be able to fail: a -> b at top level, b -> c -> a inside functions
    files = {"a": "from zoengine.pkg.b import f\n",
             "b": "def f():\n    from zoengine.pkg import c\n",
             "c": "def g():\n    import zoengine.pkg.a\n",
             "d": "from zoengine.pkg.a import x\n"}
    modules = {}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
        modules[f"zoengine.pkg.{name}"] = tmp_path / f"{name}.py"
    assert _cycles(_import_graph(modules)) == [["zoengine.pkg.a", "zoengine.pkg.b",
                                                 "zoengine.pkg.c"]]


def test_every_module_has_a_layer():
    unplaced = [m for m, _ in _modules() if _layer(m) is None and m != "zoengine"]
    assert unplaced == []


def test_imports_only_point_down():
    assert _violations() == []


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    # the check itself must be able to fail: a kernels module importing the CLI is caught
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from zoengine.cli import main\n")
    assert "zoengine.cli" in _imports(fake, "zoengine.kernels.bad")
    own, other = _layer("zoengine.kernels.bad"), _layer("zoengine.cli")
    assert other[1] > own[1]


def test_stream_words_are_unique_and_used_from_the_table():
    from zoengine.kernels import philox

    words = philox.STREAM_WORDS
    assert len(set(words.values())) == len(words)
    assert all(isinstance(v, int) and 0 <= v < 2**32 for v in words.values())
    # no module defines its own stream-word constant any more
    for _, path in _modules():
        if path.name == "philox.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id.lstrip("_").startswith("STREAM"):
                        assert not isinstance(node.value, ast.Constant), (
                            f"{path.name} defines {t.id} = {node.value.value}: take it from "
                            "zoengine.kernels.philox.STREAM_WORDS")


@pytest.mark.parametrize("package", ["zoengine.kernels", "zoengine.optim", "zoengine.sparsity",
                                     "zoengine.tasks", "zoengine.storage", "zoengine.run",
                                     "zoengine.hwsim", "zoengine.cli"])
def test_each_package_imports_in_a_fresh_process(package):
    # a cycle shows up as an ImportError only when a package is the first one imported
    r = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_public_names_resolve():
    import zoengine

    for name in zoengine.__all__:
        assert getattr(zoengine, name) is not None
    for package in ("zoengine.sparsity", "zoengine.tasks", "zoengine.run"):
        mod = importlib.import_module(package)
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"{package}.{name}"


def test_small_rooms():
    """One job per module: files <= 400 lines, functions <= 60 (the house rule of docs/design.md)."""
    big = []
    for module, path in _modules():
        src = path.read_text()
        if src.count("\n") > 400:
            big.append(f"{module}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    big.append(f"{module}.{node.name}: {n} lines")
    assert big == []
