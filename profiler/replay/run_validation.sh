#!/usr/bin/env bash
# Issue 7 point 4: measure `kvprof replay` on one GPU and validate kvsim against every measured case.
#
#   none + five methods (fp8, kivi, h2o, streamingllm, snapkv; kvsim's default knobs) at two request
#   rates, on the first N=1000 requests of the Azure LLM inference trace 2023 (conversation), time-scaled
#   to a light rate and a near-saturation rate. The rates are fractions of the capacity this engine
#   measures itself: a probe serves the first PROBE_N requests all at once with `none` (saturated
#   throughput, req/s); light = LIGHT_FRAC x capacity, near = NEAR_FRAC x capacity, the same offered
#   load for every method. Then `kvsim validate` replays each case.
#
# Usage (repository root, venv with torch + CUDA active):
#   bash profiler/replay/run_validation.sh
# Environment overrides: TRACE N OUT MODEL METHODS RATES LIGHT_FRAC NEAR_FRAC PROBE_N ENGINE_ARGS CAPACITY
#   RATES="light" or "near" runs one rate; METHODS="none h2o" a subset; CAPACITY=7.5 skips the probe.
#   Plumbing check on a CPU: REQUIRE_CUDA=0 VALIDATE=0 EXTRA_ARGS="--tiny --device cpu" N=4 PROBE_N=4 \
#     TRACE=traces/sample.jsonl bash profiler/replay/run_validation.sh
# Resumable: a case whose measured.csv exists is not run again (delete its folder to redo it).
# Runtime: about N / rate per case plus the drain, e.g. ~6-9 min at 2-3 req/s; 12 cases in all.
set -euo pipefail

TRACE=${TRACE:-../shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv}
N=${N:-1000}
OUT=${OUT:-out/replay-validation}
MODEL=${MODEL:-llama-3.1-8b}
METHODS=${METHODS:-"none fp8 kivi h2o streamingllm snapkv"}
RATES=${RATES:-"light near"}
LIGHT_FRAC=${LIGHT_FRAC:-0.35}
NEAR_FRAC=${NEAR_FRAC:-0.9}
PROBE_N=${PROBE_N:-400}
ENGINE_ARGS=${ENGINE_ARGS:-"--max-num-seqs 256 --max-num-batched-tokens 2048 --block-size 16 --gpu-memory-utilization 0.9 --seed 0"}
EXTRA_ARGS=${EXTRA_ARGS:-}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
VALIDATE=${VALIDATE:-1}

mkdir -p "$OUT/cases"
if [ "$REQUIRE_CUDA" = 1 ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures on a GPU')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi

# the trace's own rate over the first N requests (req/s)
NATIVE=$(python - "$TRACE" "$N" <<'EOF'
import itertools, sys
from kvsim.workload.readers import read_trace
rs = list(itertools.islice(read_trace(sys.argv[1]), int(sys.argv[2])))
print(f"{(len(rs) - 1) / (rs[-1].arrival_time_s - rs[0].arrival_time_s):.6f}")
EOF
)
echo "trace: $TRACE, first $N requests at $NATIVE req/s"

# capacity probe: PROBE_N requests arriving at once (rate-scale 1e6), method none
if [ -z "${CAPACITY:-}" ]; then
  PROBE="$OUT/probe"
  if [ ! -f "$PROBE/summary.json" ]; then
    # shellcheck disable=SC2086
    kvprof replay "$TRACE" --model "$MODEL" --method none --limit "$PROBE_N" --rate-scale 1e6 --out "$PROBE" $ENGINE_ARGS $EXTRA_ARGS
  fi
  CAPACITY=$(python -c "import json; print(json.load(open('$PROBE/summary.json'))['request_throughput'])")
fi
echo "saturated capacity (none): $CAPACITY req/s"

declare -A FRAC=([light]=$LIGHT_FRAC [near]=$NEAR_FRAC)
CASES=()
for rate in $RATES; do
  SCALE=$(python -c "print(f'{${FRAC[$rate]} * $CAPACITY / $NATIVE:.6f}')")
  for m in $METHODS; do
    tag=$(echo "$m" | tr ':,=' '_.-')
    dir="$OUT/cases/azure-conv-${N}_${MODEL}_${tag}_${rate}"
    CASES+=("$dir")
    if [ -f "$dir/measured.csv" ]; then
      echo "== $dir exists, skipped"
      continue
    fi
    echo "== $m at $rate (rate-scale $SCALE = $(python -c "print(f'{$SCALE * $NATIVE:.3f}')") req/s) -> $dir"
    # shellcheck disable=SC2086
    kvprof replay "$TRACE" --model "$MODEL" --method "$m" --limit "$N" --rate-scale "$SCALE" --out "$dir" \
      --case-id "$(basename "$dir")" $ENGINE_ARGS $EXTRA_ARGS
  done
done

# kvsim against every case (its profile for llama-3.1-8b x the GPU when one is committed, else the roofline)
if [ "$VALIDATE" = 1 ]; then
  kvsim validate "${CASES[@]}" --out "$OUT/validate"
  echo "validation tables: $OUT/validate/errors.md, per case: $OUT/validate/<case>/"
fi
