#!/usr/bin/env bash
# Runs the example on http://127.0.0.1:8000 from a virtualenv of its own,
# with the quotad client installed from clients/python. Run it from the
# directory where quotad runs (its default socket is ./quotad.sock there),
# or set QUOTAD_SOCKET.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$repo/clients/python[fastapi]"
exec "$venv/bin/uvicorn" --app-dir "$here" app:app --host 127.0.0.1 --port "${PORT:-8000}"
