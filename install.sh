#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 (found on this machine, never downloaded) and installs
# ttt-jax with its test extra. Safe to run again: it reuses the venvs.
#
#   bash install.sh            # .venv: the library, its tests' tools
#   bash install.sh --oracle   # also .venv-oracle: PyTorch 2.13.0 (CPU) + diffusers, the
#                              # test-only parity oracles, run by the tests in a subprocess
#
# Why a second venv: the only CPU build of torch 2.13.0 these machines hold is for Python 3.11,
# and jax >= 0.11 needs 3.12; on 3.12 pip would download the multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")"
ORACLE=0
for arg in "$@"; do
  case "$arg" in
    --oracle) ORACLE=1 ;;
    *) echo "install.sh: unknown argument $arg (use --oracle or nothing)" >&2; exit 2 ;;
  esac
done

PYENV_VERSIONS="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")/versions"

# find_python GLOB CHECK: the first Python on PATH or under pyenv whose version passes CHECK.
find_python() {
  local candidates=($1)
  for v in "$PYENV_VERSIONS"/$2*/bin/python3; do candidates+=("$v"); done
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c "import sys; sys.exit(not ($3))" 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] ||
   ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  if ! PY="$(find_python "python3.13 python3.12" "3.1[2-9]" "sys.version_info >= (3, 12)")"; then
    echo "install.sh: ttt-jax needs Python >= 3.12 (jax >= 0.11 requires it), and none was found" >&2
    echo "  on PATH (python3.12, python3.13) or under pyenv ($PYENV_VERSIONS)." >&2
    echo "  Install one (e.g. 'pyenv install 3.12') and run this script again." >&2
    exit 1
  fi
  echo "install.sh: creating .venv with $PY ($("$PY" --version))"
  rm -rf .venv
  "$PY" -m venv .venv
fi
# pip's notes about this machine's missing local index folders are noise; its exit code counts.
quiet() { { "$@" 2>&1; } | { grep -v "^WARNING: Location" || true; }; }
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c 'import jax, flax; print(f"install.sh: ready (jax {jax.__version__}, flax {flax.__version__})")'

if [ "$ORACLE" = 1 ]; then
  if [ ! -x .venv-oracle/bin/python ] ||
     ! .venv-oracle/bin/python -c 'import torch, diffusers, sentencepiece' 2>/dev/null; then
    if ! OPY="$(find_python "python3.11 python3" "3.11" "sys.version_info[:2] == (3, 11)")"; then
      echo "install.sh --oracle: the PyTorch parity oracle needs Python 3.11 (torch 2.13.0's CPU" >&2
      echo "  wheel on this machine is cp311), and none was found on PATH or under $PYENV_VERSIONS." >&2
      echo "  Install one (e.g. 'pyenv install 3.11') or run the tests with TTT_JAX_ORACLE=skip." >&2
      exit 1
    fi
    echo "install.sh: creating .venv-oracle with $OPY ($("$OPY" --version))"
    rm -rf .venv-oracle
    "$OPY" -m venv .venv-oracle
    # torch pinned exactly: a looser pin makes pip fetch a CUDA build of several GB.
    quiet .venv-oracle/bin/python -m pip install -q torch==2.13.0
    quiet .venv-oracle/bin/python -m pip install -q torch==2.13.0 diffusers==0.42.1 \
      transformers==5.24.0 safetensors numpy sentencepiece
  fi
  .venv-oracle/bin/python -c 'import torch, diffusers; print(f"install.sh: oracle ready (torch {torch.__version__}, diffusers {diffusers.__version__})")'
fi
