#!/usr/bin/env bash
# Sets up a virtual environment (idempotent) and runs the main job or the tests.
#   bash run.sh demo [pomvid demo options]   # set up, then run the end-to-end demo
#   bash run.sh test [pytest options]        # set up, then run the test suite
#   bash run.sh setup                        # only set up (what infra/docker/Dockerfile runs)
set -euo pipefail
cd "$(dirname "$0")"
venv="${POMVID_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac  # POMVID_VENV may be absolute
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# Reinstall only when the project's dependencies change.
stamp="$venv/.pomvid-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e ".[dev]"
  rm -f "$venv"/.pomvid-installed-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"

what="${1:-}"; shift || true
case "$what" in
  demo) exec pomvid demo "$@" ;;
  test) exec python -m pytest "$@" ;;
  setup) echo "pomvid is installed in $venv" ;;
  *) echo "usage: bash run.sh demo|test|setup [options]" >&2; exit 2 ;;
esac
