#!/usr/bin/env bash
# The seed's Fashion-MNIST Table 2 at full budget (50 epochs) as fused sweeps on one GPU:
# 11 rows x 4 strategies x 3 seeds = 132 jobs through hydra/launcher=fused, then packed.
# The rows go in SWEEPS, fused sweeps separated by ';' and run one after the other within
# BUDGET seconds in all (a sweep still running then is stopped with SIGINT: its jobs record the
# rounds they reached, all alike since they advance in lockstep, with status "failed").
# Prepare .whl/ and .data/ here first: bash benchmarks/gpu_prepare.sh. Then on the device machine,
# from the repo root, with `carry: [".whl", ".data"]`:
#   BUDGET=520 bash benchmarks/gpu_fused_table2.sh
# Rehearsal on a CPU (a few rounds, a subset):
#   SKIP_INSTALL=1 DEVICE=cpu ROUNDS=2 SEEDS=0 SWEEPS='as_run_clean;as_run_bitflip20' \
#     EXTRA='max_eval_samples=200' bash benchmarks/gpu_fused_table2.sh
# Writes to $OUT (or ./gpu-fused): the log and runs-<k>.jsonl.gz (benchmarks/pack_sweep.py).
set -uo pipefail
out="${OUT:-gpu-fused}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
device="${DEVICE:-cuda}"
v="${VARIANT:-as_run}"
sweeps="${SWEEPS:-${v}_clean,${v}_bitflip20,${v}_bitflip40,${v}_additive20,${v}_additive40,${v}_impulse20;${v}_impulse40,${v}_featnoise20,${v}_featnoise40,${v}_backdoor20,${v}_backdoor40}"
seeds="${SEEDS:-0,1,2}"
strategies="${STRATEGIES:-fedavg,cm,fedbgmd,gm}"
budget="${BUDGET:-520}"
workers="${WORKERS:-12}"
root="${SWEEP_DIR:-/tmp/fused-table2-$v}"
extra=()
[[ -n "${ROUNDS:-}" ]] && extra+=("num_rounds=$ROUNDS" "eval_every=1")
[[ -d .data/fashion-mnist ]] && extra+=("data.root=$PWD/.data/fashion-mnist")
# shellcheck disable=SC2206
[[ -n "${EXTRA:-}" ]] && extra+=($EXTRA)
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
start=$(date +%s)
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site  # before building: the carried setuptools (>= 77) builds it
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site . 2>&1 | grep -v "already exists" || true
fi
IFS=';' read -r -a groups <<<"$sweeps"
{
  echo "== $(date +%T) versions (install took $(( $(date +%s) - start )) s)"
  python3 -c "import torch, flwr, hydra; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-'); print('flwr', flwr.__version__, 'hydra', hydra.__version__)"
  [[ "$device" == cuda* ]] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  if [[ "$device" == cuda* && -z "${SKIP_CHECK:-}" ]]; then
    echo "== $(date +%T) fused on CUDA vs the same jobs alone (tests/test_fused.py -k cuda)"
    timeout 150 python3 -m pytest -q -m "" -p no:cacheprovider -k cuda tests/test_fused.py 2>&1 | tail -4
  fi
  for k in "${!groups[@]}"; do
    left=$(( budget - ($(date +%s) - start) ))
    if (( left < 30 )); then echo "== no time left for sweep $k (${groups[$k]})"; continue; fi
    echo "== $(date +%T) sweep $k: rows ${groups[$k]}; strategies $strategies; seeds $seeds; ${left}s left"
    t0=$(date +%s)
    timeout -k 30 --signal=INT "$left" python3 -c "from fedbgmd.cli import entry; entry()" -m \
      "+table2=${groups[$k]}" "strategy=$strategies" "seed=$seeds" "device=$device" \
      plots=false progress=false "hydra.sweep.dir=$root/$k" hydra/launcher=fused \
      "hydra.launcher.workers=$workers" hydra.launcher.on_group_failure=fail "${extra[@]}"
    echo "== $(date +%T) sweep $k exit $? after $(( $(date +%s) - t0 )) s"
  done
} 2>&1 | tee "$out/gpu-fused.log"
for k in "${!groups[@]}"; do
  [[ -d "$root/$k" ]] && python3 benchmarks/pack_sweep.py "$root/$k" "$out/runs-$k.jsonl.gz"
done
ls -la "$out"
