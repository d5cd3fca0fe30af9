#!/usr/bin/env bash
# The gradient_aligned verdict: uniform, temporal and gradient_aligned from their shipped recipes
# at W4A8 and W4A32 over several algorithm seeds, FID of 2,000 samples against all 10,000 MNIST test digits,
# then every algorithm against uniform seed by seed (paired t-test, Wilcoxon) with the group-gradient conflict.
# Reproduces: docs/benchmarks.md, "The algorithms compared".
#
#   benchmarks/verdict.sh                                  # CPU, one job at a time (hours; resumable)
#   benchmarks/verdict.sh --device cuda --jobs 8           # a GPU machine: 8 jobs side by side
#   benchmarks/verdict.sh --seeds "0 1 2" --bits w4a8 --out runs/verdict-small
#   benchmarks/verdict.sh --device cuda --jobs 12 --sample-only   # a GPU box without the FID network: quantize and sample,
#   benchmarks/verdict.sh --from-images                           # then score those samples where the network is
#
# Resumable: a folder with report.json (and eval.json of the same sample count) is reused, so an interrupted
# run goes on where it stopped. Logs per job in OUT/logs; the table in OUT/verdict.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cpu JOBS=1 SEEDS="0 1 2 3 4" BITS="w4a8 w4a32" ALGOS="uniform temporal gradient_aligned" OUT=runs/verdict N=2000 MODE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --bits) BITS=$2; shift 2 ;;
    --algorithms) ALGOS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --samples) N=$2; shift 2 ;;
    --sample-only|--from-images) MODE=$1; shift ;;
    *) echo "verdict.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT/logs"
THREADS=$(( $(nproc) / JOBS )); [ "$THREADS" -ge 1 ] || THREADS=1
one() {  # algorithm bits seed
  OMP_NUM_THREADS=$THREADS python benchmarks/algorithms.py --algorithms "$1" --bits "$2" --seeds "$3" --fid "$N" --reuse $MODE \
    --device "$DEVICE" --out "$OUT" > "$OUT/logs/$1-$2-s$3.log" 2>&1 && echo "done $1 $2 seed $3" || echo "FAILED $1 $2 seed $3 (see $OUT/logs/$1-$2-s$3.log)"
}
export -f one; export N DEVICE OUT THREADS MODE
first_bits=${BITS%% *} first_seed=${SEEDS%% *}
# alone first: fills the calibration and FID-reference caches once (sampling alone needs no reference)
[ "$MODE" = --sample-only ] || one uniform "$first_bits" "$first_seed"
# seed by seed, so that a run cut short leaves whole seeds to compare
for seed in $SEEDS; do for bits in $BITS; do for algo in $ALGOS; do echo "$algo $bits $seed"; done; done; done |
  xargs -P "$JOBS" -L 1 bash -c 'one "$0" "$1" "$2"'
[ "$MODE" = --sample-only ] && exit 0
python benchmarks/summarize.py "$OUT"/*-s* --reference-n 10000 --paired uniform | tee "$OUT/verdict.md"
