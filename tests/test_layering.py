"""The package's import graph, read from the source (AST): layers only import downwards, no
import cycles, and function-local imports only for optional or heavy dependencies."""

import ast
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def package_map() -> dict[str, Path]:
    """The installed package's folders as pyproject maps them (`package-dir`), plus the benchmark
    scripts, which sit on top of everything."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {pkg: ROOT / d for pkg, d in dirs.items() if pkg != "marl_sd.configs"}
    out["benchmarks"] = ROOT / "benchmarks"
    return out


PACKAGES = package_map()

# bottom to top; a module may import its own layer and the ones below
LAYERS = [
    ("foundation", ("marl_sd", "marl_sd.config", "marl_sd.contract", "marl_sd.runs", "marl_sd.model")),
    ("envs", ("marl_sd.envs",)),
    ("agents", ("marl_sd.agents",)),
    ("export", ("marl_sd.bundle", "marl_sd.export")),
    ("serving", ("marl_sd.serving",)),
    ("application", ("marl_sd.app",)),
    ("scripts", ("benchmarks",)),
]
# imported inside functions on purpose: optional extras, or heavy imports a caller may not need
LAZY_OK = {"sionna", "matplotlib", "transformers", "onnxruntime", "scipy", "torch", "tensorflow", "ray"}
# the few package-internal lazy imports, each with its reason
LAZY_INTERNAL_OK = {
    "marl_sd.app.cli": "each subcommand imports its own stack, so `marl-sd --help` starts in a second",
    "marl_sd.agents.train": "the BenchMARL backend is an optional extra, imported only when a config selects it",
    "marl_sd.serving.controller": "heuristics are torch code; the bundle path of the controller stays torch-free",
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, d in PACKAGES.items():
        for p in d.rglob("*.py"):
            parts = list(p.relative_to(d).with_suffix("").parts)
            if pkg == "marl_sd" and parts[0] in ("envs", "agents", "configs"):
                continue
            name = ".".join([pkg, *parts]).removesuffix(".__init__")
            out[name] = p
    return out


MODULES = modules()


def layer_of(mod: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best:
                best, rank = len(pre), i
    return rank


def imports(name: str, path: Path):
    """(target, lineno, is_function_local) for every import in the module."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
            mod = (
                (base.rsplit(".", node.level - 1)[0] + ("." + node.module if node.module else "")) if node.level else node.module
            )
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            yield t, node.lineno, id(node) not in top


def internal_edges() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for t, _, _ in imports(m, p):
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != m:
                edges[m].add(t)
    return edges


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) < 0] == []


def test_no_upward_imports():
    bad = []
    for m, p in MODULES.items():
        for t, line, _ in imports(m, p):
            if t.startswith("marl_sd") and layer_of(t) > layer_of(m):
                bad.append(f"{p.relative_to(ROOT)}:{line} {m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert bad == [], "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = internal_edges()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_function_local_imports_only_for_heavy_or_optional_dependencies():
    bad = []
    for m, p in MODULES.items():
        for t, line, local in imports(m, p):
            if not local:
                continue
            if t.startswith("marl_sd"):
                ok = m in LAZY_INTERNAL_OK
            else:
                ok = t.split(".")[0] in LAZY_OK
            if not ok:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {t} inside a function")
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("module", ["marl_sd.contract", "marl_sd.bundle", "marl_sd.serving.controller"])
def test_torch_free_modules_do_not_import_torch_at_load(module):
    """What the live controller loads with a policy bundle must not pull torch in."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
