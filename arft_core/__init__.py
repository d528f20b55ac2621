"""arft: Visual Agentic Reinforcement Fine-Tuning pipeline library."""

import os

# Telemetry off before Prefect/DVC/GX load (it also avoided a Prefect "database is locked" error; see
# environment-notes.md). Prefect's temporary server gets 120 s to start instead of 20: on a loaded 2-core machine
# its first start took longer, and standalone stage commands failed. setdefault: a user's explicit setting wins.
for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                     "GX_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
