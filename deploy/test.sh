#!/usr/bin/env bash
# Run the whole MetaStack test suite on a Debian 12 machine: installs what it
# needs first (deploy/setup.sh: Debian packages, .venv), then pytest.
# Extra arguments go to pytest, e.g. bash deploy/test.sh -k cli
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
bash deploy/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -q --durations=10 tests "$@"
