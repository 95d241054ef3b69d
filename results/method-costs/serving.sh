#!/usr/bin/env bash
# The measured implementations at the serving level, on a real trace (the Azure LLM 2023 conversation
# trace in ../shared): what the fixed-batch findings become once a scheduler, memory and output lengths
# are in the loop. Writes compare.csv/.md/.png per setting (the per-method replay folders are dropped).
set -euo pipefail
cd "$(dirname "$0")/../.."
TRACE=../shared/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv
OUT=results/method-costs/serving
run() {  # name, then kvsim compare arguments
  local name=$1; shift
  kvsim compare "$TRACE" --out "$OUT/$name" --quiet "$@" > /dev/null
  find "$OUT/$name" -mindepth 1 -maxdepth 1 -type d -exec rm -r {} +
}
# the seed paper's setup: Llama-2-7B, LMDeploy 0.6 on the 48 GB Ampere card, its settings of each method,
# the trace at a quarter of its rate (about 1.4 req/s, near what the FP16 engine sustains)
A6000=(--model llama-2-7b --hardware rtx-a6000 --engine lmdeploy-0.6 --block-size 64 --rate-scale 0.25
       --methods none,kivi:bits=4,gear,h2o:budget=512,window=448,streamingllm:sink=64,window=448,snapkv:budget=512,window=32)
run a6000-lmdeploy "${A6000[@]}"
run a6000-lmdeploy-trace-lengths "${A6000[@]}" --lengths trace
# vLLM on an H100 with Llama-3.1-8B at the trace's own rate: memory is not short
H100=(--model llama-3.1-8b --hardware h100
      --methods none,fp8,kivi:bits=4,kivi:bits=2,gear,h2o,streamingllm,snapkv)
run h100-vllm "${H100[@]}"
run h100-vllm-trace-lengths "${H100[@]}" --lengths trace
