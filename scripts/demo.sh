#!/usr/bin/env bash
# Set up layerwise in a fresh virtual environment and run the demo (about two minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .
layerwise demo "$@"
