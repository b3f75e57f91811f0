#!/usr/bin/env bash
# Build what benchmarks/gpu_check.sh needs on the lent GPU machine and its image lacks, into one folder:
# wheels for DeepSpeed (a source archive on PyPI: built here), hjson, pydantic (+ core, for CPython 3.12
# there), datasets, evaluate, rouge-score, nltk, ... at the versions this .venv runs, plus SmolLM2's
# tokenizer files (the 98 MB GGUF does not travel; a random-weight shape needs only the tokenizer).
# The image already has pyarrow, xxhash, pandas, fsspec, huggingface-hub, msgpack, ninja, psutil,
# py-cpuinfo, einops, absl-py, regex, joblib, click (/work/.library/device/KINDS.md), so they stay out.
#
#   benchmarks/build_gpu_wheels.sh [DIR]        # default .gpu_wheels (about 16 MiB)
#
# DIR ignores itself (DIR/.gitignore holds '*'): never committed; the device tool takes it with
# carry: [".gpu_wheels"]. gpu_check.sh installs it there with
#   python3 -m pip install --no-index --no-deps --no-compile DIR/*.whl
# (--no-deps: every missing package is named here, none is fetched; nothing can be fetched there).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
echo '*' >"$DIR/.gitignore"
rm -f "$DIR"/*.whl
ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pin() { for p in "$@"; do echo "$p==$(ver "$p")"; done; }

# Pure-Python wheels from PyPI.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" \
    $(pin hjson annotated-types pydantic typing-inspection typing-extensions datasets dill evaluate nltk defusedxml)
# Compiled or per-Python-version wheels, for the device's CPython 3.12 on x86-64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DIR" $(pin pydantic-core multiprocess)
# Source archives, built here into pure-Python wheels (DeepSpeed JIT-builds its ops where it runs;
# --no-build-isolation: its setup.py imports the torch of this .venv instead of fetching one).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" $(pin deepspeed rouge-score)

# SmolLM2's tokenizer files (the embedded model, converted into $GIST_DIST_CACHE by bootstrap / first use).
SRC=${GIST_DIST_CACHE:-$PWD/.cache}/smollm2-135m-instruct
[ -f "$SRC/tokenizer.json" ] || { echo "no $SRC/tokenizer.json: run make setup (or any gist-dist run with smollm2) first" >&2; exit 1; }
rm -rf "$DIR/tokenizer"
"$PY" -c "import sys; from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])" \
    "$SRC" "$DIR/tokenizer"
ls -l "$DIR"
echo "total: $(du -sh "$DIR" | cut -f1) in $DIR (limit for everything that travels: 64 MiB)"
