"""The packages' layering, read from the source: no import circle (imports inside functions
count), grafit_core never imports Ray or MLflow, no module is imported by name at run time."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("grafit_core", "orchestrator")


def modules() -> dict:
    """{dotted module name: parsed source} of both packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    out[name] = ast.parse(open(path).read(), path)
    return out


def imports(tree: ast.AST, known: set) -> set:
    """Every module this tree imports anywhere (top level or inside a function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names}
    return out


def graph() -> dict:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imports(tree, known) if m in known and m != name} for name, tree in mods.items()}


def find_cycle(edges: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = ast.parse("def f():\n    from orchestrator import journal\n    import grafit_core.config\n")
    assert imports(tree, {"orchestrator.journal"}) == {"orchestrator.journal", "grafit_core.config"}


def test_no_import_circle_in_either_package():
    edges = graph()
    assert len(edges) > 30 and "orchestrator.cli" in edges
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


# orchestrator/, bottom to top, as the README's code layout lists it
LAYERS = ["job", "tracking", "journal", "figures", "workers", "prepare", "train", "trials", "searchers", "sweep",
          "matrix", "submit", "search", "report", "tools", "cli"]


def test_orchestrator_modules_import_only_the_layers_below_them():
    edges = graph()
    assert sorted(LAYERS) == sorted(m.split(".")[1] for m in edges if m.startswith("orchestrator."))
    for name in LAYERS:
        below = {f"orchestrator.{m}" for m in LAYERS[:LAYERS.index(name)]}
        above = {m for m in edges[f"orchestrator.{name}"] if m.startswith("orchestrator.")} - below
        assert not above, f"orchestrator.{name} imports {sorted(above)}, above it"


def test_arrows_go_one_way_and_the_core_knows_neither_ray_nor_mlflow():
    mods = modules()
    for name, tree in mods.items():
        if name.startswith("grafit_core"):
            found = {m.split(".")[0] for m in imports(tree, set(mods))}
            assert not found & {"ray", "mlflow", "orchestrator"}, (name, found & {"ray", "mlflow", "orchestrator"})


def test_no_module_of_ours_is_imported_by_name_at_run_time():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if fn in ("import_module", "__import__"):
                    args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                    assert not any(str(a).startswith(PACKAGES) for a in args) and args, (name, ast.dump(node))


def test_no_line_of_python_is_wider_than_120_columns():
    import subprocess
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:                                  # not a git checkout (an unpacked copy): every file here
        tracked = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                   if f.endswith(".py") and ".venv" not in d]
    wide = [f"{path}:{i}" for path in tracked for i, line in enumerate(open(os.path.join(ROOT, path)), 1)
            if len(line.rstrip("\n")) > 120]
    assert not wide, wide
