"""The package's import structure: no import circles (module-level or inside functions), and the layers point one
way: configuration and data below the engine and the models, losses pure functions of tensors."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kd_engine")


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = "kd_engine." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def _is_main_guard(node) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(t, ast.Compare) and getattr(t.left, "id", "") == "__name__"


def import_graph():
    """module -> the kd_engine modules it imports anywhere (functions included; ``if __name__ == '__main__'`` not)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        skip = {id(n) for g in ast.walk(tree) if _is_main_guard(g) for n in ast.walk(g)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = m.split(".") if is_pkg else m.split(".")[:-1]
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                elif (node.module or "").startswith("kd_engine"):
                    base = node.module
                else:
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("kd_engine")]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_detector_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def _imports_of(graph, prefix):
    return {(m, t) for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".") for t in ts}


def test_layers_point_one_way():
    g = import_graph()
    # configuration never reaches into the engine (it reads the method registry for each method's Options: the
    # plugins' option classes are part of the configuration)
    assert {(m, t) for m, t in _imports_of(g, "kd_engine.config") if t.startswith("kd_engine.engine")} == set()
    assert {(m, t) for m, t in _imports_of(g, "kd_engine.data")
            if t.startswith(("kd_engine.models", "kd_engine.engine", "kd_engine.methods"))} == set()
    assert {(m, t) for m, t in _imports_of(g, "kd_engine.losses")
            if t.startswith(("kd_engine.models", "kd_engine.engine", "kd_engine.methods", "kd_engine.data"))} == set()
    assert "kd_engine.engine.trainer" not in g["kd_engine.engine.context"]
