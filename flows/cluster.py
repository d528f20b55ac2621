"""MAT-Coding generation on a Dask cluster: the engine's batches as Prefect tasks on prefect-dask's DaskTaskRunner
(`data.executor: dask`). The engine (`arft_core.data.mat_coding.generate`) is unchanged; it is handed a `submit`
that turns each batch into a task run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefect import flow, task
from prefect.cache_policies import NONE

from arft_core.config import Config
from arft_core.data.mat_coding import build_batch

# Never cached: a batch writes its images into the freshly emptied output folder.
build_batch_task = task(build_batch, name="mat-coding-batch", cache_policy=NONE, persist_result=False)


def task_runner(cfg: Config):
    from prefect_dask import DaskTaskRunner

    if cfg.data.dask_address:
        return DaskTaskRunner(address=cfg.data.dask_address)
    # A local cluster: one single-threaded process per worker, like the process path.
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.data.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def generate_on_dask(cfg: Config, progress: Callable[[int], None]) -> dict:
    """`generate` for `cfg.data` with each batch a Prefect task on the configured Dask cluster."""
    from arft_core.data.mat_coding import generate

    @flow(name="arft-data-dask", task_runner=task_runner(cfg), log_prints=True)
    def data_on_dask() -> dict:
        return generate(cfg.data, cfg.path("mat_coding"), cfg.root, cfg.sandbox, progress,
                        submit=build_batch_task.submit)

    return data_on_dask()
