#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer and chat-template test data (data files only, no code)
# and prints the directory holding them.
#
# Source: the PyPI source package llama-cpp-python==0.3.36, which vendors llama.cpp.
# From it only these members are extracted, into $DEST/models/:
#   vendor/llama.cpp/models/ggml-vocab-*.gguf{,.inp,.out}  vocab-only GGUFs with
#       llama.cpp's expected tokenizations (read by tests/tokenizer_vocab.rs)
#   vendor/llama.cpp/models/templates/*                    real chat templates
# DEST is $BRIGADE_LLAMACPP_DATA, default ~/.cache/brigade/llamacpp-0.3.36. Idempotent:
# once the data is extracted (the marker file .complete exists) nothing is fetched, and
# a downloaded source package whose sha256 matches is reused.
set -euo pipefail
VERSION="0.3.36"
SDIST="llama_cpp_python-$VERSION.tar.gz"
SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DEST="${BRIGADE_LLAMACPP_DATA:-$HOME/.cache/brigade/llamacpp-$VERSION}"
MODELS="$DEST/models"

if [ -f "$DEST/.complete" ]; then
  echo "$MODELS"
  exit 0
fi

mkdir -p "$DEST"
verify() { echo "$SHA256  $1" | sha256sum --check --status; }
if ! { [ -f "$DEST/$SDIST" ] && verify "$DEST/$SDIST"; }; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  PY=$(command -v python3 || command -v python)
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check \
    -d "$tmp" "llama-cpp-python==$VERSION" >&2
  if ! verify "$tmp/$SDIST"; then
    echo "error: sha256 mismatch for $SDIST (expected $SHA256)" >&2
    exit 1
  fi
  mv "$tmp/$SDIST" "$DEST/$SDIST"
fi

rm -rf "$MODELS"
mkdir -p "$MODELS"
# --strip-components=4 drops llama_cpp_python-$VERSION/vendor/llama.cpp/models/.
tar -xzf "$DEST/$SDIST" -C "$MODELS" --strip-components=4 --wildcards \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*.gguf" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*.gguf.inp" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*.gguf.out" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/*"
if ! ls "$MODELS"/ggml-vocab-*.gguf >/dev/null 2>&1 || [ ! -d "$MODELS/templates" ]; then
  echo "error: $SDIST did not hold the expected vocab files and templates" >&2
  exit 1
fi
touch "$DEST/.complete"
echo "$MODELS"
