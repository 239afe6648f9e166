#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 (found on this machine, never downloaded) and installs
# ttt-jax with its test extra. Safe to run again: it reuses the venv.
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  local candidates=(python3.13 python3.12)
  local root
  root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
  for v in "$root"/versions/3.1[2-9]*/bin/python3; do candidates+=("$v"); done
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] ||
   ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  if ! PY="$(find_python)"; then
    echo "install.sh: ttt-jax needs Python >= 3.12 (jax >= 0.11 requires it), and none was found" >&2
    echo "  on PATH (python3.12, python3.13) or under pyenv ($(pyenv root 2>/dev/null || echo ~/.pyenv)/versions)." >&2
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
