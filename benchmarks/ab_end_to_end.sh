#!/usr/bin/env bash
# Old against new slipstream, end to end on the GPU, in one process order per model: old, new (then
# again if ROUNDS=2). The old revision is unpacked in old/ (docs/developing.md says how); results of
# every run are appended to one markdown file, since only a few files come back from a device call.
#
# Usage (repo root): bash benchmarks/ab_end_to_end.sh OUT.md MODELS [CONFIGS] [EXTRA end_to_end.py ARGS...]
#   e.g. bash benchmarks/ab_end_to_end.sh $OUT/e2e.md gpt2,bert eager,all --steps 8 --rounds 3 --warmup 2
set -uo pipefail
out=$1; models=$2; configs=${3:-eager,all}; shift 3 || shift $#
pairs=${ROUNDS:-1}
for model in ${models//,/ }; do
  for pair in $(seq 1 "$pairs"); do
    for side in old new; do
      path=.; [ "$side" = old ] && path=old:.
      tmp=$(mktemp)
      echo "## $model, $side code, pair $pair" >>"$out"
      PYTHONPATH=$path:${EXTRA_PYTHONPATH:-} timeout "${RUN_TIMEOUT:-240}" python benchmarks/end_to_end.py \
        --models "$model" --configs "$configs" --out "$tmp" "$@" >"$tmp.log" 2>&1 \
        || { echo "(failed, rc $?)"; tail -5 "$tmp.log"; } >>"$out"
      grep -v '^# ' "$tmp" >>"$out" 2>/dev/null
      echo >>"$out"
    done
  done
done
