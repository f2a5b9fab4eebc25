#!/usr/bin/env bash
# Create bench/.venv-litellm with LiteLLM's proxy, the comparison target of bench/run.py.
#
# LiteLLM is pinned to 1.100.5: newer releases may need dependency versions the package
# registry does not carry. The venv lives inside bench/ and is ignored by ruff and git.
#
# Usage: bash bench/setup_litellm.sh [python-interpreter]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-litellm"
py="${1:-}"
if [[ -z "$py" ]]; then
    # Same interpreter as the project venv when there is one, else python3.
    if [[ -x "$here/../.venv/bin/python" ]]; then
        py="$("$here/../.venv/bin/python" -c 'import sys; print(sys._base_executable)')"
    else
        py="python3"
    fi
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install 'litellm[proxy]==1.100.5'

# Smoke check: the CLI entry point imports.
LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/litellm" --version
echo "LiteLLM proxy installed in $venv"
