"""The code tool: model-written Python/OpenCV runs in warm, isolated fork-servers (see pool.py, worker.py)."""

from arft_core.sandbox.pool import SandboxError, SandboxPool, SandboxResult, SandboxUnavailable

__all__ = ["SandboxError", "SandboxPool", "SandboxResult", "SandboxUnavailable"]
