#!/usr/bin/env bash
# The peer to beat, in its own venv (its pins must not touch ours). torch first, pinned.
set -euo pipefail
VENV=${1:-.bench_venvs/llmcompressor}
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet llmcompressor torch==2.13.0
"$VENV/bin/pip" install --quiet -e . torch==2.13.0   # modelpress: same windows and evaluation
echo "$VENV/bin/python bench/peers/llmcompressor_gptq.py"
