#!/usr/bin/env bash
# The prepared GPU check: under 8 minutes on one GPU; writes OUT_DIR/gpu_check.json and
# OUT_DIR/gpu_check.log (default OUT_DIR: $OUT, the device tool's folder that comes back).
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# On the GPU it runs the `gpu`-marked tests, then on a random ~1.07B LLaMA shape (configs/models/llama-1b.yaml,
# bf16, SmolLM2's tokenizer, ZeRO-3 on 1 rank): a gist train with activation checkpointing off and on, a
# distill train, an eval with the gist cache checked against the uncached generator, and a compress +
# generate; it prints tokens/s, MFU against the bf16 matmul peak it measures, and peak memory per
# variant (what each step does: benchmarks/gpu_check.py). --dry-run: the same steps on CPU with the
# tiny shape in fp32 and 2 steps (CI, tests/test_gpu_check.py).
#
# The device image lacks DeepSpeed, datasets, evaluate, rouge-score (and gist-dist itself): build the
# wheels here once, then carry them with the working tree (about 11 MiB; 64 MiB travel at most):
#   benchmarks/build_gpu_wheels.sh              # -> .gpu_wheels/ (ignored by its own .gitignore)
#   device run: carry [".gpu_wheels"], command "benchmarks/gpu_check.sh", timeout_s 600
# Here that installs them with pip install --no-index --no-deps DIR/*.whl (set GPU_WHEELS=DIR for
# another folder) and gist-dist with pip install --no-index --no-deps --no-build-isolation -e .
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=()
if [ "${1:-}" = --dry-run ]; then DRY=(--dry-run); shift; fi
OUT_DIR=${1:-${OUT:-}}
if [ -z "$OUT_DIR" ]; then echo "usage: $0 [--dry-run] OUT_DIR (or set OUT)" >&2; exit 2; fi
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
export GIST_DIST_CACHE=${GIST_DIST_CACHE:-$PWD/.cache} HF_HOME=${HF_HOME:-$PWD/.cache/hf} HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false
WHEELS=${GPU_WHEELS:-.gpu_wheels}
if [ ${#DRY[@]} -eq 1 ]; then
    PY=${PYTHON:-$PWD/.venv/bin/python}
else
    PY=${PYTHON:-python3}
    if ! "$PY" -c "import deepspeed, datasets, evaluate, rouge_score" 2>/dev/null; then
        ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check: no wheels in $WHEELS: run benchmarks/build_gpu_wheels.sh here and carry it"; exit 2; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl || exit 2
    fi
    "$PY" -c "import deepspeed, datasets, evaluate, rouge_score, transformers, pyarrow, torch
print('versions:', *(f'{m.__name__} {m.__version__}' for m in (torch, transformers, deepspeed, datasets, evaluate, pyarrow)))" || exit 2
    BIN=$("$PY" -c "import sys, os; print(os.path.dirname(sys.executable))")
    if [ ! -x "$BIN/gist-dist" ]; then  # the tests call the console script
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# SmolLM2's tokenizer for the check and the gpu tests (the device has no embedded model to take it from)
if [ -d "$WHEELS/tokenizer" ]; then export GPU_CHECK_TOKENIZER=$(cd "$WHEELS" && pwd)/tokenizer; fi
"$PY" benchmarks/gpu_check.py "${DRY[@]}" "$OUT_DIR"
