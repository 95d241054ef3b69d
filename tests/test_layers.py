"""The layers of kvsim (docs/architecture.md draws them): every import, at module level or inside a
function, goes from a module to one in its own layer or a lower one; no two modules import each other,
directly or through others; kvsim never imports the profiler; and the module map in docs/architecture.md
names every module there is and no other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: lowest first; a module belongs to the layer of its longest matching prefix
LAYERS = [
    ("base", ["kvsim", "kvsim.errors", "kvsim.work", "kvsim.outputs"]),
    ("inputs", ["kvsim.config", "kvsim.specs", "kvsim.workload", "kvsim.transfer"]),
    ("methods", ["kvsim.methods"]),
    ("cost", ["kvsim.cost"]),
    ("engine", ["kvsim.engine"]),
    ("metrics", ["kvsim.metrics"]),
    ("build", ["kvsim.build"]),
    ("replay", ["kvsim.replay"]),
    ("tools", ["kvsim.compare", "kvsim.bench", "kvsim.validate", "kvsim.plan", "kvsim.cost.calibrate",
               "kvsim.cost.method_fit"]),
    ("api", ["kvsim.api"]),
    ("cli", ["kvsim.cli", "kvsim.pd_published"]),
    ("profiler", ["profiler"]),
]


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("kvsim", "profiler") for p in sorted((REPO / top).rglob("*.py"))}


def _type_checking_block(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if _type_checking_block(node) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in ("kvsim", "profiler"))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g = {}
    for name, path in mods.items():
        deps = set()
        for n in imports(path, known):
            while n not in known and "." in n:
                n = n.rsplit(".", 1)[0]
            if n in known and n != name:
                deps.add(n)
        g[name] = deps
    return g


def test_imports_never_go_up_a_layer():
    bad = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
           for m, deps in graph().items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
            sccs.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in sccs if len(c) > 1]
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_simulator_never_imports_the_profiler():
    assert not [f"{m} -> {d}" for m, deps in graph().items() if m.startswith("kvsim") for d in deps
                if d.startswith("profiler")]


def test_the_module_map_in_the_docs_matches_the_code():
    """docs/architecture.md lists every module as ``path/to/module.py`` (packages as ``path/``) in its map."""
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:kvsim|profiler)/[\w/]+\.py)`", text))
    real = {str(p.relative_to(REPO)) for p in modules().values()}
    real = {r for r in real if not r.endswith("__main__.py")}
    assert not sorted(real - named), f"modules the map does not name: {sorted(real - named)}"
    assert not sorted(named - real), f"the map names modules that do not exist: {sorted(named - real)}"


#: a sequence's block state (kvsim.engine.sequence): only the KV cache manager and the block pool write it
BLOCK_STATE = ("blocks", "shared_hashes", "reserved", "hash_keys")
KV_OWNERS = {"kvsim.engine.kv_cache_manager", "kvsim.engine.block_manager", "kvsim.engine.sequence"}


def test_only_the_kv_cache_manager_writes_block_state():
    bad = []
    for name, path in modules().items():
        if name in KV_OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in BLOCK_STATE and not (
                        isinstance(t.value, ast.Name) and t.value.id == "self"):
                    bad.append(f"{name}:{node.lineno}: {ast.unparse(t)}")
    assert not bad, "\n".join(bad)


def test_no_module_reaches_into_the_kv_pool_or_the_simpy_internals():
    """The KV manager's capacity is read through its public methods; SimPy's private attributes only in
    kvsim.engine.clock (simpy pinned to the range tests/test_clock.py runs)."""
    bad = []
    simpy_private = re.compile(r"\.(_queue|_eid|_now|_target|_resume|_ok|_value)\b")
    for name, path in modules().items():
        if not name.startswith("kvsim"):
            continue
        text = path.read_text()
        if name != "kvsim.engine.kv_cache_manager" and re.search(r"\bkv\.pool\b", text):
            bad.append(f"{name}: kv.pool")
        if name != "kvsim.engine.clock" and simpy_private.search(text):
            bad.append(f"{name}: {simpy_private.search(text).group(0)}")
        for m in re.finditer(r"\bkv\._\w+", text):
            bad.append(f"{name}: {m.group(0)}")
    assert not bad, "\n".join(bad)
