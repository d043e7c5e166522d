#!/usr/bin/env bash
# The long form of the model-based test (tests/model.rs): many seeds, long random sequences,
# real browsers through a real sidecar. Prints the figures (seeds, steps, browsers, requests,
# disagreements); a disagreement fails with the seed and step that reproduce it.
#   bash scripts/model.sh [SEEDS] [STEPS] [BROWSERS] [FIRST_SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_SEEDS="${1:-40}" MODEL_STEPS="${2:-1000}" MODEL_BROWSERS="${3:-6}" MODEL_FIRST_SEED="${4:-1000}" \
  cargo test --release --locked --test model -- --nocapture 2>&1 | grep -E -A3 'model:|panicked|^test result'
