#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install this project with its test extras (idempotent).
# megatron-core >= 0.17 needs Python 3.12; on 3.11 pip would silently pick an old megatron-core.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  local c v
  for c in "${PYTHON:-}" python3.12 python3.13 python3 \
           "$HOME"/.pyenv/versions/3.12*/bin/python3 "$HOME"/.pyenv/versions/3.13*/bin/python3; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    v=$("$c" -c 'import sys; print(int(sys.version_info >= (3, 12)))' 2>/dev/null) || continue
    [ "$v" = 1 ] && { echo "$c"; return 0; }
  done
  return 1
}
if [ ! -x .venv/bin/python ]; then
  py=$(find_python) || { echo "setup.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "setup.sh: creating .venv with $py ($("$py" --version))"
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import qwen3_next_mcore, megatron.core, torch; print('setup.sh: ready (torch', torch.__version__, ')')"
