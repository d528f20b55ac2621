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
        names = {s: s.addressing for s in graph.nodes}
        ordered = nx.lexicographical_topological_sort(graph, key=lambda s: written.index(names[s]))
        return [names[s] for s in ordered]


def stage_deps(root: Path, stage: str) -> list[str]:
    """Dependency paths of `stage` as DVC resolves them (params.yaml interpolated), relative to `root`."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for s in repo.index.stages:
            if s.addressing == stage:
                return [d.def_path for d in s.deps]
    raise KeyError(f"no stage {stage!r} in {root / 'dvc.yaml'}")
