#!/usr/bin/env bash
# Set up cfb in .venv and run the main job on the embedded default (SQLite, MovieLens 100k):
# ingest, train, show similar items, publish the questionnaire, onboard a new user, recommend.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0          # (fastai's torchvision then moves it to the torch it needs)
.venv/bin/pip install -q -e '.[test]'
cfb() { .venv/bin/cfb --db "sqlite:///$PWD/.cfb/demo.db" "$@"; }
mkdir -p .cfb && rm -f .cfb/demo.db .cfb/demo.db-wal .cfb/demo.db-shm
DATA=../shared/data/ml-100k
[ -f "$DATA/u.data" ] || DATA=$(CFB_HOME="$PWD/.cfb" .venv/bin/cfb data download movielens-100k)
set -x
cfb ingest movielens "$DATA"
cfb retrain --full
cfb similar "Star Wars (1977)" -n 5
cfb questionnaire --budget 5
cfb onboard --answers examples/questionnaire.json
cfb recommend alice 1 -n 5
