#!/usr/bin/env bash
# Install NVRTC (the CUDA run-time compiler, no GPU or driver needed) from the PyPI wheel
# nvidia-cuda-nvrtc 13.0.x into <repo>/.nvrtc/, so that tests/cuda_kernels.rs can compile every
# kernel for sm_80 and sm_90 on a machine without CUDA. 13.0 matches the 580 driver the CUDA
# backend targets (cudarc's cuda-13000 bindings).
# The wheel is downloaded and unpacked (as tools/fetch_model.sh does), not pip-installed, so an
# externally managed system Python is no obstacle. Idempotent; works from any cwd. Prints the
# directory holding libnvrtc.so.13 on stdout (add it to LD_LIBRARY_PATH); progress on stderr.
set -euo pipefail

WHEEL_SPEC="nvidia-cuda-nvrtc==13.0.*"
PYTHON="${PYTHON:-python3}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TARGET="$REPO_ROOT/.nvrtc"
LIB_DIR="$TARGET/nvidia/cu13/lib"
# libnvrtc dlopens libnvrtc-builtins while compiling, so both must be in the same directory.
LIBS=(libnvrtc.so.13 libnvrtc-builtins.so.13.0)

present() {
    for lib in "${LIBS[@]}"; do
        [[ -e "$LIB_DIR/$lib" ]] || return 1
    done
}

if ! present; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    echo "downloading $WHEEL_SPEC (wheel, ~40 MB) ..." >&2
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q "$WHEEL_SPEC" -d "$TMP" >&2
    WHEEL="$(ls "$TMP"/nvidia_cuda_nvrtc-*.whl | head -n1)"
    # Unpack into a temporary directory and rename, so an interrupted run leaves nothing half-done.
    rm -rf "$TARGET.part"
    "$PYTHON" - "$WHEEL" "$TARGET.part" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1:3]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("nvidia/cu13/lib/")]
    if not members:
        sys.exit(f"{wheel} has no nvidia/cu13/lib/ (not a CUDA 13 NVRTC wheel?)")
    z.extractall(dest, members)
PY
    rm -rf "$TARGET"
    mv "$TARGET.part" "$TARGET"
fi

present || { echo "the wheel did not provide ${LIBS[*]} in $LIB_DIR" >&2; exit 1; }
echo "$LIB_DIR"
