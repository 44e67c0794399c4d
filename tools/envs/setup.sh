#!/usr/bin/env bash
# Install the benchmark bridges' Python environment: ScienceWorld and TextWorldExpress from PyPI.
# Both wheels bundle their simulator jars (scienceworld.jar, textworld-express.jar) and py4j's jar,
# so nothing is downloaded after this script: the bridges run offline. Needs Java >= 17.
#
#   tools/envs/setup.sh [VENV_DIR]      (default: .venv-envs in the repository root)
#
# Idempotent: an existing environment with the pinned versions is left as it is.
set -euo pipefail

SCIENCEWORLD_VERSION=1.2.3
TWX_VERSION=1.1.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-envs}"
PYTHON="${PYTHON:-python3}"

# Java: ScienceWorld 1.2 needs 17 or later.
if ! command -v java >/dev/null 2>&1; then
    echo "error: java not found; ScienceWorld and TextWorldExpress need Java 17 or later on PATH" >&2
    echo "       (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)" >&2
    exit 1
fi
JAVA_VERSION_LINE="$(java -version 2>&1 | head -n 1)"
JAVA_MAJOR="$(echo "$JAVA_VERSION_LINE" | sed -E 's/.*version "([0-9]+)(\.[0-9]+)*.*/\1/')"
if [ "$JAVA_MAJOR" = "1" ]; then  # "1.8.0_x" style
    JAVA_MAJOR="$(echo "$JAVA_VERSION_LINE" | sed -E 's/.*version "1\.([0-9]+).*/\1/')"
fi
if ! [[ "$JAVA_MAJOR" =~ ^[0-9]+$ ]] || [ "$JAVA_MAJOR" -lt 17 ]; then
    echo "error: Java 17 or later is needed, found: $JAVA_VERSION_LINE" >&2
    exit 1
fi
echo "java: $JAVA_VERSION_LINE"

# Python >= 3.8 for the libraries.
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)' || {
    echo "error: $PYTHON is older than 3.8" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
VENV="$(cd "$VENV" && pwd)"

installed() {
    "$VENV/bin/python" - "$SCIENCEWORLD_VERSION" "$TWX_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("scienceworld"), version("textworld_express")) == (sys.argv[1], sys.argv[2]) else 1)
EOF
}

if installed; then
    echo "scienceworld $SCIENCEWORLD_VERSION and textworld-express $TWX_VERSION already installed"
else
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "scienceworld==$SCIENCEWORLD_VERSION" "textworld-express==$TWX_VERSION"
fi

# The simulators must be inside the installed packages (no download at run time).
"$VENV/bin/python" - <<'EOF'
import os, sys
import scienceworld.constants as sw
import textworld_express.constants as twx
import py4j
missing = [p for p in (sw.JAR_PATH, twx.JAR_PATH) if not os.path.isfile(p)]
jars = [os.path.join(sys.prefix, "share", "py4j", f) for f in os.listdir(os.path.join(sys.prefix, "share", "py4j"))
        if f.endswith(".jar")] if os.path.isdir(os.path.join(sys.prefix, "share", "py4j")) else []
if missing or not jars:
    sys.exit(f"error: simulator jars missing: {missing or 'py4j jar'}")
for p in (sw.JAR_PATH, twx.JAR_PATH, jars[0]):
    print(f"bundled: {p} ({os.path.getsize(p) // 1024} KiB)")
EOF

echo "ok. Bridges:"
echo "  $VENV/bin/python tools/envs/scienceworld_bridge.py   # ScienceWorld"
echo "  $VENV/bin/python tools/envs/twx_bridge.py            # TextWorldExpress"
echo "python to use (last line, for scripts: PY=\$(tools/envs/setup.sh | tail -n 1)):"
echo "$VENV/bin/python"
