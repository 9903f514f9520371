#!/usr/bin/env bash
# The GPU verification in one command, for whoever has a CUDA machine:
#
#   bash bench/gpu_check.sh            (PYTHON=/path/to/python to use another interpreter)
#
# Runs the CUDA tests (marker `gpu`: fp16 loading, the flash-attn shim on real CUDA, the decode engine's
# start-up canary eager and compiled) and `bench_decode.py gpu` (base <OD> latency and VRAM, large
# throughput, with and without --compile), prints everything and appends a dated section with the
# machine, versions, commands and their output to bench/RESULTS.md. Exit status: the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
section=$(mktemp)
{
  echo
  echo "## GPU check, $(date -u '+%Y-%m-%d %H:%M UTC') (bench/gpu_check.sh)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
  "$PY" -c 'import platform, torch, transformers; print("python", platform.python_version(), "torch", torch.__version__,
"cuda", torch.version.cuda, "transformers", transformers.__version__, "cuda available", torch.cuda.is_available())'
  echo '```'
} | tee "$section"
echo -e "\n\$ $PY -m pytest -q -m gpu tests/test_gpu.py\n" | tee -a "$section"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 40 | tee -a "$section.tests"
tests=${PIPESTATUS[0]}
{ echo '```'; cat "$section.tests"; echo '```'; } >> "$section"
echo -e "\n\$ $PY bench/bench_decode.py gpu\n" | tee -a "$section"
"$PY" bench/bench_decode.py gpu 2>&1 | tail -n 60 | tee "$section.bench"
{ echo '```'; cat "$section.bench"; echo '```'; } >> "$section"
cat "$section" >> bench/RESULTS.md
rm -f "$section" "$section.tests" "$section.bench"
echo "appended to bench/RESULTS.md (tests exit status $tests)"
exit "$tests"
