#!/usr/bin/env bash
# Refit the measured method implementations and the LMDeploy engine baseline on the seed paper's data
# (../shared/reference/seed-lmdeploy), regenerate this folder, and install the terms kvsim ships.
set -euo pipefail
cd "$(dirname "$0")/../.."
kvsim fit-methods --out results/method-costs
cp results/method-costs/method_terms.yaml kvsim/methods/data/method_terms.yaml
