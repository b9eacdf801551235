#!/usr/bin/env bash
# The searches of research/dfs/four_seeds.py: per seed PS, DFS, then PS+DFS (which merges that seed's PS
# best_recipe.yaml into its run directory). Runs already finished are skipped. Usage: run_seeds.sh OUT SEED...
set -euo pipefail
out=$1; shift
mkdir -p "$out/logs"
for seed in "$@"; do
  for name in ps dfs psdfs; do
    run="$out/runs/$name-s$seed"
    [ -f "$run/model/config.json" ] && continue
    start=$(date +%s)
    nice -n 5 .venv/bin/vlm-merge evolve "$out/configs/$name-s$seed.yaml" --out "$run" --force > "$out/logs/$name-s$seed.log" 2>&1
    echo "$name-s$seed $(( $(date +%s) - start )) s" | tee -a "$out/logs/wall.txt"
  done
done
