"""Let PyPI's torchvision import on a CPU-only machine inside the vLLM environment (see cpu_env.sh).

PyPI ships torchvision linked against CUDA; on a CPU machine its C++ ops (nms, roi_align, ...) do not load, and
`torchvision/_meta_registrations.py` then fails at import registering fake kernels for them (`operator
torchvision::nms does not exist`). vLLM's Qwen2.5-VL path imports torchvision only for its image transforms, which
need none of those ops, so each fake-kernel registration is made conditional on the op existing. Idempotent.
"""

from __future__ import annotations

import sys
from pathlib import Path

GUARD = '''

def _register_fake_if_loaded(name):
    """torch.library.register_fake, skipped when torchvision's C++ ops did not load (CPU-only machine)."""
    def wrapper(fn):
        try:
            return torch.library.register_fake(name)(fn)
        except RuntimeError:
            return fn
    return wrapper
'''


def main() -> None:
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchvision is not installed in this environment")
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if "_register_fake_if_loaded" in text:
        print(f"{path}: already patched")
        return
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        raise SystemExit(f"{path}: unexpected layout, not patched")
    head, sep, rest = text.partition(anchor)
    patched = head + sep + GUARD + rest.replace("@torch.library.register_fake(", "@_register_fake_if_loaded(")
    path.write_text(patched)
    print(f"{path}: fake-kernel registrations guarded")


if __name__ == "__main__":
    sys.exit(main())
