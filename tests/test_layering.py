"""The layers of docs/architecture.md: imports point downwards only, and no import cycle."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Module (or package) -> layer, as docs/architecture.md's table lists them; anything else is layer 1.
LAYERS = {"phijax.cli": 5, "phijax.__main__": 5, "phijax.train": 5, "phijax.compile_check": 5, "phijax.bench": 5,
          "data_gen.bench": 5, "phijax.serve.server": 5, "phijax.serve.__main__": 5, "phijax.recipe": 5,
          "phijax.train_setup": 4, "phijax.gin_bindings": 4, "phijax.train_eval": 4, "data_gen": 4,
          "phijax.evaluate": 3, "phijax.serve": 3,
          "phijax.train_step": 2, "phijax.decode": 2, "phijax.convert": 2,
          "phijax.util": 0}


def _modules():
    return {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__"): p
            for d in ("phijax", "data_gen") for p in (ROOT / d).rglob("*.py")}


def _layer(m):
    keys = [k for k in LAYERS if m == k or m.startswith(k + ".")]
    return LAYERS[max(keys, key=len)] if keys else 1


def _imports(mods):
    """module -> the project modules it imports (function-level imports included)."""
    out = {}
    for m, p in mods.items():
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != m and not m.startswith(n + "."):  # a package's own __init__ aside
                    found.add(n)
        out[m] = found
    return out


def test_imports_point_downwards_only():
    mods = _modules()
    up = sorted(f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
                for m, ns in _imports(mods).items() for n in ns if _layer(n) > _layer(m))
    assert not up, "\n".join(up)


def test_no_import_cycle():
    graph = _imports(_modules())

    def reach(a, seen):
        for b in graph[a] - seen:
            seen.add(b)
            reach(b, seen)
        return seen
    cyclic = sorted(m for m in graph if m in reach(m, set()))
    assert not cyclic, cyclic


def test_the_checks_see_a_cycle_and_an_upward_import():
    # The two checks above can fail: a planted upward import makes both find it.
    mods = _modules()
    real = _imports(mods)
    real["phijax.util.files"].add("phijax.train")  # layer 0 -> 5, and train reaches util.files
    assert _layer("phijax.train") > _layer("phijax.util.files")
    seen, stack = set(), ["phijax.train"]
    while stack:
        for b in real[stack.pop()] - seen:
            seen.add(b)
            stack.append(b)
    assert "phijax.train" in seen


def test_data_gen_imports_neither_jax_nor_tensorflow():
    code = ("import sys, data_gen.ingest, data_gen.dedup, data_gen.annotate, data_gen.filter, "
            "data_gen.quality_filter, data_gen.generator, data_gen.textbook, data_gen.exercises, phijax.util.cli; "
            "bad = [m for m in ('jax', 'tensorflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
