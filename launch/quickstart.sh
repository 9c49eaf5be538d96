#!/usr/bin/env bash
# The README's two commands. Each sets up .venv on first use (Python >= 3.10), then:
#   bash launch/quickstart.sh demo          # the demo job: a tiny generated model, example prompts, CPU
#   bash launch/quickstart.sh test [ARGS]   # the test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${KVRELAY_VENV:-.venv}
PY=${PYTHON:-python3}

need_apt() {  # install Debian/Ubuntu packages when we are root, else say what is missing
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "quickstart: missing system packages: $* (install them with: sudo apt-get install $*)" >&2
    exit 1
  fi
}

setup() {
  command -v "$PY" >/dev/null || need_apt python3
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "quickstart: kvrelay needs Python >= 3.10, $PY is $("$PY" --version 2>&1)" >&2; exit 1; }
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || need_apt python3-venv
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.kvrelay-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    # A torch already in the venv is kept; else the CPU-sized release this project is tested with.
    "$VENV/bin/python" -c 'import torch' 2>/dev/null || "${pip[@]}" "torch==2.13.0" || "${pip[@]}" "torch>=2.4"
    "${pip[@]}" -e ".[test,mpich]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  demo)
    setup
    exec "$VENV/bin/kvrelay" demo "${@:2}"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "${@:2}"
    ;;
  *)
    echo "usage: bash launch/quickstart.sh demo|test [args]" >&2
    exit 2
    ;;
esac
