#!/usr/bin/env bash
# The demo: a local fake relay that drops the connection every 7 messages,
# mailerd on a state dir in ./demo-run, a 1,000-recipient campaign, live
# progress until done, the final report; then everything is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mailerd.demo "$@"
