#!/usr/bin/env bash
# Regenerate every profile in kvsim/profiles/imported/ from the published reference data.
#
# The data is read in place (never copied into the repo) from $SHARED/reference/{vidur,llmservingsim}/,
# $SHARED defaulting to the "shared" folder next to the repository root. Run from anywhere:
#     kvsim/profiles/imported/regenerate.sh
# Needs the kvsim package importable (the venv) and no GPU or torch. Output is deterministic.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$repo"
SHARED="${SHARED:-../shared}"               # relative to the repository root, so provenance stays portable
VIDUR="$SHARED/reference/vidur"
LSS="$SHARED/reference/llmservingsim/perf"
OUT=kvsim/profiles/imported
PY="${PYTHON:-python}"

kvprof() { "$PY" -m profiler.cli "$@"; }

for d in "$VIDUR" "$LSS"; do
  [ -d "$d" ] || { echo "regenerate.sh: $d not found (set SHARED=/path/to/shared)" >&2; exit 2; }
done

# --- Vidur (microsoft/vidur data/profiling): per-op medians, fp16, TP 1/2/4/8 -----------------------
# a100/h100: linear ops only (no attention.csv in the snapshot) + all_reduce from <dev>_dgx for TP > 1.
# a40: linear + attention at TP 1; TP > 1 linear only (no a40 all_reduce data).
for tp in 1 2 4 8; do
  kvprof import vidur "$VIDUR" --hardware a100 --model llama-2-7b --tp $tp --out $OUT/a100__llama-2-7b__tp$tp.json
  kvprof import vidur "$VIDUR" --hardware a100 --model llama-3-8b --tp $tp --out $OUT/a100__llama-3-8b__tp$tp.json
  kvprof import vidur "$VIDUR" --hardware h100 --model llama-2-7b --tp $tp --out $OUT/h100__llama-2-7b__tp$tp.json
  kvprof import vidur "$VIDUR" --hardware a40  --model llama-2-7b --tp $tp --out $OUT/a40__llama-2-7b__tp$tp.json
done

# --- LLMServingSim (casys-kaist/LLMServingSim profiler/perf): vLLM 0.19 per-module means, bf16 ---------
kvprof import llmservingsim "$LSS" --hardware rtx-4090     --model llama-3.1-8b  --tp 1 --out $OUT/rtx-4090__llama-3.1-8b__tp1.json
for tp in 1 2; do
  kvprof import llmservingsim "$LSS" --hardware rtx-pro-6000 --model llama-3.1-8b  --tp $tp --out $OUT/rtx-pro-6000__llama-3.1-8b__tp$tp.json
  kvprof import llmservingsim "$LSS" --hardware rtx-pro-6000 --model qwen3-32b     --tp $tp --out $OUT/rtx-pro-6000__qwen3-32b__tp$tp.json
  kvprof import llmservingsim "$LSS" --hardware rtx-pro-6000 --model qwen3-30b-a3b --tp $tp --out $OUT/rtx-pro-6000__qwen3-30b-a3b__tp$tp.json
done
