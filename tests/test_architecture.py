"""The package's shape: dependencies run one way, bits -> codecs -> codebook -> wire -> plan ->
exchange -> {horovod, simulate} (alloc beside plan, feeding the exchange's reallocation step; optim,
the optimizers, beside bits: pure torch), and
nothing outside ``hvd_gradq/horovod/`` imports Horovod or mpi4py. Read from the source with ``ast``
(function-level imports included)."""
import ast
import subprocess
import sys
from pathlib import Path

import hvd_gradq

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hvd_gradq"
#: the layer of each top-level part of the package; a module may import its own part or lower layers
LAYERS = {"checks": 0, "optim": 1, "bits": 1, "codecs": 2, "codebook": 3, "wire": 4, "plan": 5, "alloc": 5,
          "settings": 6, "exchange": 7, "horovod": 8, "simulate": 8}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue  # the public surface re-exports from every layer
        yield rel.parts[0].removesuffix(".py"), path


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
            if node.module == "hvd_gradq":
                out += [f"hvd_gradq.{a.name}" for a in node.names]
    return out


def test_every_part_of_the_package_has_a_layer():
    parts = {part for part, _ in modules()}
    assert parts == set(LAYERS), f"new or gone parts: {parts ^ set(LAYERS)} (give each a layer here)"


def test_only_the_horovod_package_imports_horovod_or_mpi4py():
    bad = [f"{path.relative_to(ROOT)} imports {m}" for part, path in modules() for m in imports(path)
           if part != "horovod" and m.split(".")[0] in ("horovod", "mpi4py")]
    assert not bad, bad


def test_dependencies_run_one_way():
    bad = []
    for part, path in modules():
        for m in imports(path):
            names = m.split(".")
            if names[0] != "hvd_gradq" or len(names) < 2:
                continue
            target = names[1]
            if target != part and LAYERS[target] >= LAYERS[part]:
                bad.append(f"{path.relative_to(ROOT)} ({part}, layer {LAYERS[part]}) imports {m} "
                           f"(layer {LAYERS[target]})")
    assert not bad, "\n".join(bad)


def test_the_pure_layers_and_the_simulation_load_without_horovod():
    code = ("import sys, hvd_gradq, hvd_gradq.simulate, hvd_gradq.exchange.engine, hvd_gradq.plan.planner, "
            "hvd_gradq.settings; bad = [m for m in sys.modules if m.split('.')[0] in ('horovod', 'mpi4py')]; "
            "assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0, run.stderr


def test_no_module_of_the_package_is_over_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long


def test_dir_lists_every_public_name():
    assert set(hvd_gradq.__all__) <= set(dir(hvd_gradq))
    for name in hvd_gradq.__all__:
        assert getattr(hvd_gradq, name) is not None
