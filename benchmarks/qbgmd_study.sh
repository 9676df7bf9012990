#!/usr/bin/env bash
# QBGMD study (issue 18 item 6): BGMD (fedbgmd) and GMD (gm) on Fashion-MNIST, Table 2 rows clean
# and bitflip20 (as_run presets), client QSGD with bits in {2,4,8} x bucket in {128,512,none}, plus
# unquantized: 2 strategies x 2 rows x 10 settings = 40 runs, one seed, a reduced budget.
#   bash benchmarks/qbgmd_study.sh [OUT_DIR] [extra Hydra overrides...]
#   ROUNDS=10 SEED=0 ROWS="clean bitflip20" STRATEGIES=fedbgmd,gm bash benchmarks/qbgmd_study.sh
# The budget: ROUNDS rounds of 32 clients x batch 16 (117 rounds = 1 epoch of Fashion-MNIST),
# the first EVAL_SAMPLES test samples (default 5000 of 10000) evaluated after round 0 and the last. As run for docs/RESULTS.md (a
# 2-core CPU shared with other users), the two rows as two concurrent streams:
#   ROWS=clean bash benchmarks/qbgmd_study.sh OUT & ROWS=bitflip20 bash benchmarks/qbgmd_study.sh OUT
# Default launcher: the fused launcher refuses quantized clients (fedbgmd.fused.fuse_reason).
# Table and plot:
#   python benchmarks/qbgmd_summary.py OUT docs/results/qbgmd
set -euo pipefail
out="${1:-multirun/qbgmd-study}"
shift $(( $# >= 1 ? 1 : 0 ))
rounds="${ROUNDS:-10}"
seed="${SEED:-0}"
rows="${ROWS:-clean bitflip20}"
strategies="${STRATEGIES:-fedbgmd,gm}"
threads="${THREADS:-1}"
eval_samples="${EVAL_SAMPLES:-5000}"
budget=("num_rounds=$rounds" "eval_every=$rounds" "seed=$seed" "engine.num_threads=$threads"
        "max_eval_samples=$eval_samples"
        progress=false plots=false)
for row in $rows; do
  # unquantized reference first (cheap)
  fedbgmd -m "+table2=as_run_$row" client.quantization.method=none "strategy=$strategies" \
    "${budget[@]}" "hydra.sweep.dir=$out/$row-none" "$@" \
    || echo "row $row, unquantized: some jobs failed (see $out/$row-none)" >&2
  # QSGD: bucket x bits (null: one norm for the whole update); strategy varies fastest, the bucket
  # slowest, so a sweep cut short has every bit width at bucket 128 (then without buckets)
  fedbgmd -m "+table2=as_run_$row" client.quantization.method=qsgd \
    client.quantization.bucket_size=128,null,512 client.quantization.bits=2,8,4 \
    "strategy=$strategies" "${budget[@]}" "hydra.sweep.dir=$out/$row-qsgd" "$@" \
    || echo "row $row, qsgd: some jobs failed (see $out/$row-qsgd)" >&2
done
