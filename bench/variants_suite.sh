#!/usr/bin/env bash
# The steering-variants measurement of docs/results.md (issue: "steering that personalises
# without breaking the text"): both real pairs, greedy, 64 new tokens, the llama.cpp backend,
# 40 CoGenesis rows and 40 rows of helpsteer / personal_preference_eval for concise and verbose.
#   bash bench/variants_suite.sh [OUT_ROOT] [ROWS] [TOKENS]
# Resumable: rerun the same command after an interruption. Then: python bench/collect_variants.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/variants}
ROWS=${2:-40}
TOKENS=${3:-64}
DATA=../shared/datasets
COSTEER=${COSTEER:-.venv/bin/costeer}
METHODS=llm,slm_context,costeer,costeer_trust,costeer_guarded,costeer_matched
[ -d "$DATA" ] || { echo "error: $DATA not found (the shared evaluation inputs)" >&2; exit 2; }
for pair in smollm2 gemma; do
  llm=smollm2-135m-instruct; [ "$pair" = gemma ] && llm=gemma3-270m
  run() { "$COSTEER" eval --data "$DATA" --limit "$ROWS" --max-new-tokens "$TOKENS" --device cpu --backend llamacpp \
            --llm "$llm" --slm smollm2-135m-instruct --methods "$METHODS" "$@" > /dev/null; }
  run --task cogenesis --out "$OUT/$pair/cogenesis"
  for task in helpsteer personal_preference_eval; do
    for pref in concise verbose; do
      run --task "$task" --preference "$pref" --out "$OUT/$pair/$task-$pref"
    done
  done
done
echo "done: $OUT/*/*/report.md"
