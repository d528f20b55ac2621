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
