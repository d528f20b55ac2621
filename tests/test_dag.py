"""dvc.yaml declares what each stage really reads: its deps cover the import closure of the stage's code, its params
cover the config sections the stage reads; and the closure tool itself follows what Python would import."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from arft_core.dag import import_closure, stage_code, undeclared_code

ROOT = Path(__file__).resolve().parents[1]


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_closure_follows_lazy_relative_and_package_imports(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/stages/__init__.py": "from pkg.stages import a, b\n",  # the registry: names every stage
        "pkg/stages/a.py": "import json\nfrom pkg import util\n\n\ndef helper():\n    from pkg.deep.x import f\n\n\n"
                           "def stage_a():\n    helper()\n    from .. import lazy\n\n\n"
                           "def other():\n    import pkg.unused\n",
        "pkg/stages/b.py": "def stage_b():\n    import pkg.only_b\n",
        "pkg/util.py": "", "pkg/lazy.py": "", "pkg/unused.py": "", "pkg/only_b.py": "",
        "pkg/deep/__init__.py": "from pkg.deep import y\n", "pkg/deep/x.py": "def f(): pass\n", "pkg/deep/y.py": "",
    })
    got = import_closure(tmp_path, "pkg.stages.a", "stage_a", package="pkg")
    # helper() is called, so its lazy import counts; other() is not; the registry package and b are not on the path
    assert got == {"pkg/stages/a.py", "pkg/util.py", "pkg/lazy.py", "pkg/deep/x.py", "pkg/deep/__init__.py",
                   "pkg/deep/y.py", "pkg/__init__.py"}
    assert "pkg/unused.py" in import_closure(tmp_path, "pkg.stages.a", package="pkg")  # the whole module
    assert import_closure(tmp_path, "pkg.stages.b", "stage_b", package="pkg") == {
        "pkg/stages/b.py", "pkg/only_b.py", "pkg/__init__.py"}


def test_the_sandbox_worker_script_counts_as_read():
    assert "arft_core/sandbox/worker.py" in import_closure(ROOT, "arft_core.sandbox.pool")


def _stages():
    from arft_core.stages import STAGES

    return STAGES


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_declared_code_deps_are_the_real_ones(stage):
    code = stage_code(ROOT, _stages()[stage].run)
    missing, stale = undeclared_code(ROOT, stage, code)
    assert not missing, f"dvc.yaml stage {stage!r} does not declare code it imports: {missing}"
    assert not stale, f"dvc.yaml stage {stage!r} declares code it never imports: {stale}"


def test_no_import_cycle_in_arft_core():
    """Not at module level, nor through a lazy import inside a function: each would tie two concepts together."""
    from arft_core.dag import module_imports

    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "arft_core").rglob("*.py")}
    graph = {m: module_imports(ROOT, m) - {m} for m in modules}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_declared_params_are_the_sections_the_stage_reads(stage):
    """dvc.yaml's params (a section or some of its keys) name exactly the registry's sections of the stage; the
    pipeline test checks those against what each stage really read."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage].get("params", [])
    assert {p.split(".")[0] for p in declared} == set(_stages()[stage].sections)
