#!/usr/bin/env bash
# Install NVRTC (the CUDA run-time compiler, no GPU or driver needed) from the PyPI wheel
# nvidia-cuda-nvrtc 13.0.x into <repo>/.nvrtc/, so that tests/cuda_kernels.rs can compile every
# kernel for sm_80 and sm_90 on a machine without CUDA. 13.0 matches the 580 driver the CUDA
# backend targets (cudarc's cuda-13000 bindings).
# Idempotent; works from any cwd. Prints the directory holding libnvrtc.so.13 on stdout (add it
# to LD_LIBRARY_PATH); progress goes to stderr.
set -euo pipefail

WHEEL_SPEC="nvidia-cuda-nvrtc==13.0.*"
PYTHON="${PYTHON:-python3}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TARGET="$REPO_ROOT/.nvrtc"
LIB_DIR="$TARGET/nvidia/cu13/lib"

if [[ ! -e "$LIB_DIR/libnvrtc.so.13" || ! -e "$LIB_DIR/libnvrtc-builtins.so.13.0" ]]; then
    echo "installing $WHEEL_SPEC into $TARGET ..." >&2
    rm -rf "$TARGET.part"
    "$PYTHON" -m pip install --no-deps --disable-pip-version-check -q --target "$TARGET.part" "$WHEEL_SPEC" >&2
    rm -rf "$TARGET"
    mv "$TARGET.part" "$TARGET"
fi

# libnvrtc dlopens libnvrtc-builtins at compile time, so both must be in this directory.
for lib in libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
    [[ -e "$LIB_DIR/$lib" ]] || { echo "the wheel did not provide $LIB_DIR/$lib" >&2; exit 1; }
done
echo "$LIB_DIR"
