#!/usr/bin/env bash
# Everything the speed and Table 2 issues need a GPU for, in one device call, timed:
#   1. the CUDA-only tests, 2. the pure-torch round (per-client loop and batched),
#   3. a full 50-epoch Fashion-MNIST cell through the framework (in-process engine, batched,
#      FL-BGMD, 32 clients x batch 16, test evaluation every epoch) -> the "<= 2 minutes" target.
# Prepare .whl/ and .data/ first (bash benchmarks/gpu_prepare.sh); on the device machine, from
# the repo root, with `carry: [".whl", ".data"]`:
#   .whl  = flwr, hydra-core, omegaconf, antlr4 and their missing needs as wheels (see
#           /work/.library/device/README.md); .data/fashion-mnist = the four idx files.
# Results go to $OUT (or ./gpu-check): the log, two JSON files and the run's metrics, summary, config.
# Inside the project's own environment (no wheels to install): SKIP_INSTALL=1 bash benchmarks/gpu_check.sh
# Dry run on a CPU (a few rounds): DEVICE=cpu ROUNDS=20 SKIP_INSTALL=1 bash benchmarks/gpu_check.sh
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
device="${DEVICE:-cuda}"
rounds="${ROUNDS:-5850}"
data_root=()  # the carried idx files if present, else the usual search (Debian's package, ...)
[[ -d .data/fashion-mnist ]] && data_root=(data.root=.data/fashion-mnist)
cell="$(mktemp -d)/cell"  # outside $OUT: only a few files come back from the device machine
# PYTHONSAFEPATH: from the repo root `python3 -c` would import the source folder fedbgmd/ (no
# conf/ inside: "Primary config module 'fedbgmd.conf' not found"), not the installed package
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
if [[ -z "${SKIP_INSTALL:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site  # before building: the carried setuptools (>= 77) builds it
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site . || exit 1
fi
step() { echo "== $1 ($(date +%T))"; }
{
  step "versions"
  python3 -c "import torch, flwr, hydra; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-'); print('flwr', flwr.__version__, 'hydra', hydra.__version__)"
  if [[ "$device" == cuda* ]]; then
    step "CUDA tests"
    python3 -m pytest -q -m "" -p no:cacheprovider -k "cuda or CUDA" tests 2>&1 | tail -5
  fi
  step "pure-torch round, per-client loop"
  python3 benchmarks/bench_round.py --device "$device" --rounds 20 --out "$out/round-loop.json"
  step "pure-torch round, batched"
  python3 benchmarks/bench_round.py --device "$device" --rounds 20 --batched --out "$out/round-batched.json"
  step "framework: $rounds rounds of the seed's Fashion-MNIST setup (FL-BGMD, batched, bit flip 20% x5)"
  start=$(date +%s.%N)
  python3 -c "from fedbgmd.cli import entry; entry()" experiment=fmnist_table2_as_run \
    strategy=fedbgmd strategy.weighted=false attack=bit_flip attack.fraction=0.2 \
    attack.params.scale=5 "num_rounds=$rounds" "device=$device" "${data_root[@]}" \
    plots=false progress=false "hydra.run.dir=$cell" 2>&1 | tail -3
  python3 - "$cell" "$start" <<'PY'
import statistics as st
import sys
import time

from fedbgmd.reporting.writer import read_metrics, read_summary

run, start = sys.argv[1], float(sys.argv[2])
rows = read_metrics(run)[1:]
plain = [r for r in rows if r["test_accuracy"] is None] or rows
med = lambda k: 1000 * st.median(r[k] or 0.0 for r in plain)  # noqa: E731
over = [r["round_time_s"] - sum(r[k] or 0.0 for k in ("client_time_s", "agg_time_s", "eval_time_s")) for r in plain]
s = read_summary(run)
print(f"process wall {time.time() - start:.1f} s; run wall {s.get('wall_time_s')} s; rounds {len(rows)}; "
      f"final accuracy {s.get('final_accuracy')}")
print(f"median round {med('round_time_s'):.2f} ms (client {med('client_time_s'):.2f}, agg "
      f"{med('agg_time_s'):.2f}, overhead {1000 * st.median(over):.2f}); evaluation "
      f"{sum(r['eval_time_s'] or 0 for r in rows):.1f} s in all")
PY
  step "done"
} 2>&1 | tee "$out/gpu-check.log"
for f in metrics.csv summary.json config.yaml; do cp "$cell/$f" "$out/cell-$f" 2>/dev/null; done
