#!/usr/bin/env bash
# Run the test suite on the CPU (sets up .venv first). Extra arguments go to pytest, e.g. `-k cache` or `-m "not slow"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
exec python -m pytest "$@"
