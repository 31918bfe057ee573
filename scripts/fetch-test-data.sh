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
  # The sdist's address comes from PyPI's simple index; it is downloaded as a
  # plain file (`pip download` of an sdist would build its build dependencies,
  # cmake among them, from source just to read its metadata).
  "$PY" - "$tmp/$SDIST" "$SDIST" "$SHA256" <<'PYEOF' >&2
import re, sys, urllib.request
dest, name, sha = sys.argv[1:4]
index = "https://pypi.org/simple/llama-cpp-python/"
html = urllib.request.urlopen(index, timeout=120).read().decode()
urls = [u for u in re.findall(r'href="([^"]+)"', html) if u.split("#")[0].endswith("/" + name)]
if not urls:
    sys.exit(f"error: {name} is not listed at {index}")
with urllib.request.urlopen(urls[0].split("#")[0], timeout=600) as r, open(dest, "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
PYEOF
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
