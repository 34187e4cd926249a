#!/usr/bin/env bash
# The peer's own virtualenv for benchmarks/llm_quantization.py: llm-compressor with its pinned stack,
# kept apart from qapframe's (it brings its own transformers and compressed-tensors versions).
# Usage: bash benchmarks/peers/setup_llmcompressor.sh [DIR]   (default .venv-llmcompressor)
set -euo pipefail
dir="${1:-.venv-llmcompressor}"
python3 -m venv "$dir"
"$dir/bin/python" -m pip install -q --upgrade pip
"$dir/bin/python" -m pip install -q torch==2.13.0   # first: an unpinned torch pulls a multi-GB CUDA build
"$dir/bin/python" -m pip install -q llmcompressor
"$dir/bin/python" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|llmcompressor|compressed-tensors) "
echo "peer python: $dir/bin/python"
