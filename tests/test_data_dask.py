"""MAT-Coding generation on a Dask cluster (`data.executor: dask`): the engine's batches run as Prefect tasks on
prefect-dask's DaskTaskRunner, here on a local cluster of 2 worker processes, and the data are byte-identical to
the single-machine path (the engine chooses items by k, whatever finishes first)."""

import hashlib
from pathlib import Path

from arft_core.config import Config
from arft_core.data.mat_coding import generate

DATA = {"n_train": 6, "n_test": 3, "workers": 2, "sources": {"synthetic": 0, "easy_vqa": 1}}


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dask_executed_data_stage_equals_the_single_machine_output(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client

    from flows.cluster import generate_on_dask

    local = Config.from_dict({"data": DATA, "paths": {"mat_coding": "local"}}, root=tmp_path)
    on_dask = Config.from_dict({"data": {**DATA, "executor": "dask"}, "paths": {"mat_coding": "dask"}},
                               root=tmp_path)
    generate(local.data, local.path("mat_coding"), local.root, local.sandbox)
    seen = []
    report = generate_on_dask(on_dask, seen.append)
    assert report["manifests"]["train"]["n"] == 6 and report["manifests"]["test"]["n"] == 3 and sum(seen) == 9
    a, b = digests(tmp_path / "local"), digests(tmp_path / "dask")
    assert any(name.startswith("images/") for name in a) and {"train.json", "test.json"} <= set(a)
    assert a == b  # every manifest and image, byte for byte

    # The batches were task runs of the flow, on the Dask task runner.
    import asyncio

    async def runs():
        async with get_client() as client:
            flows = await client.read_flow_runs()
            tasks = await client.read_task_runs()
            return flows, tasks

    flows, tasks = asyncio.run(runs())
    flow = next(f for f in flows if f.name and f.state and f.state.is_completed()
                and any(t.flow_run_id == f.id for t in tasks if t.name.startswith("mat-coding-batch")))
    batches = [t for t in tasks if t.flow_run_id == flow.id and t.name.startswith("mat-coding-batch")]
    assert len(batches) >= 2 and all(t.state.is_completed() for t in batches)
