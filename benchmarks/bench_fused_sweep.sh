#!/usr/bin/env bash
# Wall time of one 24-job synthetic sweep, run (a) with Hydra's default basic launcher (jobs one
# after the other in one process) and (b) with `hydra/launcher=fused` (jobs that can advance in
# lockstep run as one batched computation; data=synthetic depends on the seed, so the 24 jobs form
# 2 fused groups of 12, one per seed). Target of the issue: fused >= 2x faster on a 2-core CPU.
#
# Usage, from the repo root:
#   bash benchmarks/bench_fused_sweep.sh
# Knobs (environment): ROUNDS (num_rounds, default 30), REPEATS (timed repeats, default 2),
#   ROOT (where the sweep folders go, default a fresh mktemp -d; each variant and repeat gets its
#   own fresh folder, since the fused launcher skips folders that already hold completed runs),
#   EXTRA (more overrides, space-separated, applied to both variants), FEDBGMD (the CLI).
#
# The sweep (4 strategies x 3 attacks x 2 seeds = 24 jobs):
#   fedbgmd -m experiment=smoke client.local_steps=1 engine.batched=true \
#     strategy=fedavg,cm,gm,fedbgmd attack=none,bit_flip,gaussian seed=0,1 num_rounds=$ROUNDS \
#     plots=false progress=false hydra.sweep.dir=<fresh dir> [hydra/launcher=fused]
# smoke keeps engine.num_threads=1 (one intra-op thread: the tiny MLP is fastest so); both
# launchers apply it. FUSED_1T=1 adds a third variant, the fused launcher under
# OMP_NUM_THREADS=1 (kept from when the fused launcher ignored engine.num_threads).
#
# Measured (2-core Xeon, torch 2.14.1, quiet machine, 2026-12-04, commit 1a79838 + the memo):
#   ROUNDS=30:  basic 18.6 / 18.5 s wall, fused 11.5 / 11.6 s: 1.62x / 1.60x wall, 2.01x / 1.95x
#               on the runs' own time; fixed start-up ~10.3 s (basic) and ~7.4 s (fused)
#   ROUNDS=100: basic 32.2 s, fused 17.6 s: 1.83x wall, 2.11x runs; final accuracies equal
#
# What it prints, per repeat and variant:
#   wall      the whole command, process start to exit (Python/torch import, Hydra composition of
#             24 jobs, the runs, writing the run folders);
#   runs      the sum of the jobs' own wall_time_s (summary.json). For the fused launcher every
#             job of a group reports the group's wall time, so "runs" sums, over fused groups
#             (fedbgmd.fused.group_key of each job's config), the largest wall_time_s in the group;
#   overhead  wall - runs (start-up, composition, per-job setup outside the timed run);
# (the 1-min load average around each variant is printed: other processes on the 2 cores skew it);
# then the speedup basic/fused for both, and the largest |final_accuracy(basic) -
# final_accuracy(fused)| over the 24 jobs (fused jobs equal the jobs run alone up to float
# rounding for models without dropout; smoke uses the MLP).
set -euo pipefail
cd "$(dirname "$0")/.."
fedbgmd="${FEDBGMD:-$PWD/.venv/bin/fedbgmd}"
python="${PYTHON:-$(dirname "$fedbgmd")/python}"
rounds="${ROUNDS:-30}"
repeats="${REPEATS:-2}"
fused_1t="${FUSED_1T:-0}"
root="${ROOT:-$(mktemp -d /tmp/bench_fused_sweep.XXXXXX)}"
mkdir -p "$root"
# shellcheck disable=SC2206
extra=(${EXTRA:-})
sweep=(experiment=smoke client.local_steps=1 engine.batched=true
  strategy=fedavg,cm,gm,fedbgmd attack=none,bit_flip,gaussian seed=0,1
  "num_rounds=$rounds" plots=false progress=false "${extra[@]}")
export PYTHONUNBUFFERED=1

echo "machine: $(nproc) CPU cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "torch $("$python" -c 'import torch; print(torch.__version__)'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "sweep: fedbgmd -m ${sweep[*]} hydra.sweep.dir=<dir> [hydra/launcher=fused]"
echo "folders under $root"

run_variant() {  # name, dir, extra overrides... (environment for the command: the array envs)
  local name=$1 dir=$2
  shift 2
  [[ -e "$dir" ]] && { echo "$dir exists; need a fresh folder" >&2; exit 1; }
  local t0 t1 load0
  load0=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  if ! env "${envs[@]}" "$fedbgmd" -m "${sweep[@]}" "hydra.sweep.dir=$dir" "$@" >"$dir.log" 2>&1; then
    echo "$name failed; see $dir.log" >&2
    tail -20 "$dir.log" >&2
    exit 1
  fi
  t1=$(date +%s.%N)
  echo "$t0 $t1" >"$dir.time"
  local fusing
  fusing=$(grep -o 'fusing [0-9]* jobs into one computation' "$dir.log" | tr '\n' ';' || true)
  echo "  $name: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s${fusing:+ ($fusing)}; 1-min load avg before $load0, after $(cut -d' ' -f1 /proc/loadavg)"
}

for ((rep = 1; rep <= repeats; rep++)); do
  echo "repeat $rep/$repeats"
  envs=()
  run_variant basic "$root/basic-$rep"
  run_variant fused "$root/fused-$rep" hydra/launcher=fused
  if [[ "$fused_1t" == 1 ]]; then
    envs=(OMP_NUM_THREADS=1)
    run_variant fused-1t "$root/fused-1t-$rep" hydra/launcher=fused
  fi
done

"$python" - "$root" "$repeats" <<'EOF'
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fedbgmd.fused import group_key
from fedbgmd.reporting.writer import read_summary

root, repeats = Path(sys.argv[1]), int(sys.argv[2])


def load(d: Path):
    jobs = {}
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name.isdigit()):
        s = read_summary(sub)
        if s.get("status") != "completed":
            sys.exit(f"{sub}: status {s.get('status')!r}")
        jobs[int(sub.name)] = (s, sub)
    if len(jobs) != 24:
        sys.exit(f"{d}: {len(jobs)} jobs, expected 24")
    t0, t1 = map(float, Path(f"{d}.time").read_text().split())
    return jobs, t1 - t0


def runs_time(jobs, fused: bool) -> tuple[float, int]:
    if not fused:
        return sum(s["wall_time_s"] for s, _ in jobs.values()), len(jobs)
    groups: dict[str, float] = {}
    for s, sub in jobs.values():
        key = group_key(OmegaConf.load(sub / ".hydra" / "config.yaml"))
        groups[key] = max(groups.get(key, 0.0), s["wall_time_s"])
    return sum(groups.values()), len(groups)


print()
print(f"{'repeat':>6} {'variant':>8} {'wall s':>8} {'runs s':>8} {'overhead s':>10} {'units':>5}")
for rep in range(1, repeats + 1):
    b, bw = load(root / f"basic-{rep}")
    bt, bn = runs_time(b, False)
    print(f"{rep:>6} {'basic':>8} {bw:8.1f} {bt:8.1f} {bw - bt:10.1f} {bn:>5} (jobs)")
    for name in ("fused", "fused-1t"):
        if not (root / f"{name}-{rep}").is_dir():
            continue
        f, fw = load(root / f"{name}-{rep}")
        ft, fn = runs_time(f, True)
        engines = ",".join(sorted({str(s.get("engine")) for s, _ in f.values()}))
        print(f"{rep:>6} {name:>8} {fw:8.1f} {ft:8.1f} {fw - ft:10.1f} {fn:>5} (groups; engine {engines})")
        diffs = {j: abs(b[j][0]["final_accuracy"] - f[j][0]["final_accuracy"]) for j in b}
        worst = max(diffs, key=diffs.get)
        w = b[worst][0]
        print(f"{'':>6} speedup basic/{name}: wall {bw / fw:.2f}x, runs {bt / ft:.2f}x; max "
              f"|final_accuracy diff| {diffs[worst]:.4g} (job {worst}: {w['strategy']}/"
              f"{w['attack']}/seed {w['seed']}), {sum(d > 0 for d in diffs.values())}/24 jobs differ")
EOF
