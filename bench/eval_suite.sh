#!/usr/bin/env bash
# The evaluation benchmark run of docs/results.md: the default pair, greedy, all six methods,
# 24 CoGenesis rows and 24 rows of each preference dataset for `concise` and `verbose`.
#   bash bench/eval_suite.sh [OUT_ROOT] [ROWS] [TOKENS]
# Resumable: rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/eval-suite}
ROWS=${2:-24}
TOKENS=${3:-64}
DATA=../shared/datasets
COSTEER=${COSTEER:-.venv/bin/costeer}
[ -d "$DATA" ] || { echo "error: $DATA not found (the shared evaluation inputs)" >&2; exit 2; }
run() { "$COSTEER" eval --data "$DATA" --limit "$ROWS" --max-new-tokens "$TOKENS" --device cpu "$@" > /dev/null; }
run --task cogenesis --out "$OUT/cogenesis"
for task in helpsteer personal_preference_eval truthfulqa ultrachat; do
  for pref in concise verbose; do
    run --task "$task" --preference "$pref" --out "$OUT/$task-$pref"
  done
done
echo "done: $OUT/*/report.md"
