"""Prefect 3 flows: thin wrappers over `arft_core.stages`, plus the pipeline flow that drives `dvc repro`."""

import arft_core  # noqa: F401  (sets telemetry defaults before Prefect is imported)
