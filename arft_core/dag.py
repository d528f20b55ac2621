"""The pipeline DAG is `dvc.yaml`; this module reads it (through DVC) so no other stage list exists."""

from __future__ import annotations

from pathlib import Path

import yaml


def stage_order(root: Path) -> list[str]:
    """Stage names in dependency order; ties keep dvc.yaml's order."""
    import networkx as nx
    from dvc.repo import Repo

    written = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    with Repo(str(root)) as repo:
        graph = repo.index.graph.reverse()  # DVC's edges point from a stage to its dependencies
        names = {s: s.name for s in graph.nodes}  # addressing is relative to the cwd
        ordered = nx.lexicographical_topological_sort(graph, key=lambda s: written.index(names[s]))
        return [names[s] for s in ordered]


def stage_deps(root: Path, stage: str) -> list[str]:
    """Dependency paths of `stage` as DVC resolves them (params.yaml interpolated), relative to `root`."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            if s.name == stage:
                return [d.def_path for d in s.deps]
    raise KeyError(f"no stage {stage!r} in {root / 'dvc.yaml'}")


def changed_stages(root: Path) -> dict[str, list[str]]:
    """`dvc status`: {stage: what changed (deps, params, outs)} for every stage that would rerun; empty when the
    last run is up to date."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc status failed in {root}:\n{proc.stderr.strip()}")
    status = json.loads(proc.stdout or "{}")
    changes: dict[str, list[str]] = {}
    for name, entries in status.items():
        stage = name.rsplit(":", 1)[-1]
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed"
                changes.setdefault(stage, []).append(entry)
                continue
            for kind, what in entry.items():
                items = [f"{path} ({state})" if isinstance(state, str) else f"{path} ({', '.join(state)})"
                         for path, state in what.items()] if isinstance(what, dict) else [str(what)]
                changes.setdefault(stage, []).append(f"{kind}: {'; '.join(items)}")
    return changes


# ---------------------------------------------------------------- what a stage's code really is
# Files the code reads by path instead of importing them (the sandbox runs its worker as a script).
READ_BY_PATH = {"arft_core.sandbox.pool": ["arft_core/sandbox/worker.py"]}


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(root: Path, module: str, nodes: list, package: str) -> set[str]:
    """Project modules named by the import statements among `nodes` (module `module`, in `package`)."""
    import ast

    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                parts = (module if _module_file(root, module).name == "__init__.py" else
                         module.rpartition(".")[0]).split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import name` imports pkg, and pkg.name too when that is a module
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == package and _module_file(root, n)}
    return found


def module_imports(root: Path, module: str, package: str = "arft_core") -> set[str]:
    """Project modules that `module` imports anywhere in its file (top level or inside functions)."""
    import ast

    return _imported(root, module, list(ast.walk(ast.parse(_module_file(root, module).read_text()))), package)


def import_closure(root: Path, module: str, function: str | None = None, package: str = "arft_core") -> set[str]:
    """Project files (relative to `root`) on the code path of `module` or of one of its functions.

    Imports anywhere in a file count (stage code imports lazily inside functions), and a module brings the
    `__init__` of every package above it, except the entry module's own package (the stage registry, which
    names every stage, is not part of any one stage's code). For a `function`, only the entry module's
    top-level imports, the function's own and those of the module's functions it calls are followed."""
    import ast

    entry = ast.parse(_module_file(root, module).read_text())
    if function is None:
        todo = module_imports(root, module, package)
    else:
        defs = {n.name: n for n in entry.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if function not in defs:
            raise KeyError(f"{module} has no top-level function {function!r}")
        nodes, seen_defs, stack = [n for n in entry.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))], \
            set(), [function]
        while stack:  # the function and, transitively, the module's functions it names
            name = stack.pop()
            if name in seen_defs:
                continue
            seen_defs.add(name)
            body = list(ast.walk(defs[name]))
            nodes += body
            stack += [n.id for n in body if isinstance(n, ast.Name) and n.id in defs]
        todo = _imported(root, module, nodes, package)
    registry = module.rpartition(".")[0]
    done: set[str] = {module}
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        parents = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))} - {registry}
        todo |= (module_imports(root, name, package) | parents) - done
    files = {_module_file(root, name).relative_to(root).as_posix() for name in done}
    return files | {f for name in done for f in READ_BY_PATH.get(name, [])}


def stage_code(root: Path, entry) -> set[str]:
    """The project files a stage function's code path imports or reads (see `import_closure`)."""
    return import_closure(root, entry.__module__, entry.__name__)


def undeclared_code(root: Path, stage: str, code: set[str]) -> tuple[list[str], list[str]]:
    """(code files no dvc.yaml dep of `stage` covers, project code deps that cover none of `code`): both must be
    empty. A dep covers a file when it is that file or a folder above it (a whole package is fine)."""
    deps = [d for d in stage_deps(root, stage) if d.split("/")[0] in ("arft_core", "flows")]
    covers = lambda dep, f: f == dep or f.startswith(dep.rstrip("/") + "/")  # noqa: E731
    missing = sorted(f for f in code if not any(covers(d, f) for d in deps))
    stale = sorted(d for d in deps if not any(covers(d, f) for f in code))
    return missing, stale


def code_deps(root: Path, code: set[str], package: str = "arft_core") -> list[str]:
    """dvc.yaml deps for `code`: a package folder where the stage imports all of it, else each file."""
    chosen: list[str] = []
    for folder in sorted((p for p in (root / package).rglob("*") if p.is_dir() and p.name != "__pycache__"),
                         key=lambda p: len(p.parts)):
        rel = folder.relative_to(root).as_posix()
        if any(rel.startswith(c + "/") for c in chosen):
            continue
        files = {p.relative_to(root).as_posix() for p in folder.rglob("*.py")}
        if files and files <= code:
            chosen.append(rel)
    rest = [f for f in code if not any(f.startswith(c + "/") for c in chosen)]
    return sorted(chosen + rest)


def write_code_deps(root: Path, stages: dict) -> list[str]:
    """Rewrite the code deps of every stage in dvc.yaml from its import closure (`stages`: name -> stage function),
    keeping its data deps and the file's comments; returns the stages whose deps changed."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.width = 4096
    yaml_rt.indent(mapping=2, sequence=4, offset=2)  # the file's own style
    path = root / "dvc.yaml"
    doc = yaml_rt.load(path.read_text())
    changed = []
    for name, spec in doc["stages"].items():
        old = list(spec.get("deps", []))
        data = [d for d in old if str(d).split("/")[0] not in ("arft_core", "flows")]
        new = code_deps(root, stage_code(root, stages[name])) + data
        if new != old:
            spec["deps"] = new
            changed.append(name)
    if changed:
        import io

        out = io.StringIO()
        yaml_rt.dump(doc, out)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(out.getvalue())
        tmp.replace(path)
    return changed
