#!/usr/bin/env bash
# The seed's Fashion-MNIST Table 2 at full budget (50 epochs) as ONE fused sweep on one GPU:
# 11 rows x 4 strategies x 3 seeds = 132 jobs (hydra/launcher=fused), then the results packed.
# On the device machine, from the repo root, with `carry: [".whl", ".data"]` (see gpu_check.sh):
#   BUDGET=500 bash benchmarks/gpu_fused_table2.sh
# Rehearsal on a CPU (a few rounds, a subset):
#   SKIP_INSTALL=1 DEVICE=cpu ROUNDS=2 SEEDS=0 ROWS='as_run_clean,as_run_bitflip20' \
#     bash benchmarks/gpu_fused_table2.sh
# Writes to $OUT (or ./gpu-fused): the log and runs.jsonl.gz (benchmarks/pack_sweep.py).
set -uo pipefail
out="${OUT:-gpu-fused}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
device="${DEVICE:-cuda}"
variant="${VARIANT:-as_run}"
rows="${ROWS:-glob(${variant}_*)}"
seeds="${SEEDS:-0,1,2}"
strategies="${STRATEGIES:-fedavg,cm,fedbgmd,gm}"
budget="${BUDGET:-540}"
workers="${WORKERS:-12}"
sweep="${SWEEP_DIR:-/tmp/fused-table2-$variant}"
extra=()
[[ -n "${ROUNDS:-}" ]] && extra+=("num_rounds=$ROUNDS" "eval_every=1")
[[ -d .data/fashion-mnist ]] && extra+=("data.root=$PWD/.data/fashion-mnist")
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site  # before building: the carried setuptools (>= 77) builds it
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site . || exit 1
fi
{
  echo "== $(date +%T) versions"
  python3 -c "import torch, flwr, hydra; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-'); print('flwr', flwr.__version__, 'hydra', hydra.__version__)"
  [[ "$device" == cuda* ]] && nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
  echo "== $(date +%T) fused sweep: rows $rows, strategies $strategies, seeds $seeds (budget ${budget}s)"
  start=$(date +%s)
  timeout --signal=INT "$budget" python3 -c "from fedbgmd.cli import entry; entry()" -m \
    "+table2=$rows" "strategy=$strategies" "seed=$seeds" "device=$device" plots=false \
    progress=false "hydra.sweep.dir=$sweep" hydra/launcher=fused \
    "hydra.launcher.workers=$workers" "${extra[@]}"
  echo "== $(date +%T) sweep exit $? after $(( $(date +%s) - start )) s"
  python3 -c "from fedbgmd.report import main; import sys; sys.exit(main(['$sweep']))" \
    > "$out/report.txt" 2>&1
  tail -40 "$out/report.txt"
} 2>&1 | tee "$out/gpu-fused.log"
python3 benchmarks/pack_sweep.py "$sweep" "$out/runs.jsonl.gz"
ls -la "$out"
