"""Prefect 3 flows: thin wrappers over `arft_core.stages`, plus the pipeline flow that drives `dvc repro`."""

import os

# Telemetry off before Prefect is imported (it also avoided a "database is locked" error; environment-notes.md).
for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                     "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_key, _value)
