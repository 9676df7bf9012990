#!/usr/bin/env bash
# Round cost of the working tree against an older revision, through the framework, same config.
#   bash benchmarks/ab_revisions.sh REV [REPEATS] [hydra overrides...]
# e.g. bash benchmarks/ab_revisions.sh 924aec7 2 experiment=fmnist_table2_as_run strategy=fedbgmd
# REV is installed (not editable) into a temporary folder and put first on PYTHONPATH, so both
# versions run from the same virtual environment. Prints median round / client / aggregation /
# overhead (round - client - agg - eval) per run, over the rounds without a test evaluation.
set -euo pipefail
rev="${1:?usage: ab_revisions.sh REV [REPEATS] [overrides...]}"
repeats="${2:-2}"
shift $(( $# >= 2 ? 2 : 1 ))
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'git -C "$root" worktree remove --force "$tmp/src" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -q --detach "$tmp/src" "$rev"
python -m pip install -q --no-deps --no-build-isolation --target "$tmp/pkg" "$tmp/src" >/dev/null
defaults=(num_rounds=25 eval_every=25 max_eval_samples=2000 plots=false progress=false)
for rep in $(seq 1 "$repeats"); do
  for version in "$rev" working-tree; do
    pp=""; [[ "$version" == "$rev" ]] && pp="$tmp/pkg"
    out="$tmp/run-$version-$rep"
    start=$(date +%s.%N)
    PYTHONPATH="$pp" python -c "from fedbgmd.cli import entry; entry()" "${defaults[@]}" "$@" \
      "hydra.run.dir=$out" >/dev/null
    wall=$(python -c "import time; print(f'{time.time() - $start:.1f}')")
    python - "$out" "$version" "$rep" "$wall" <<'PY'
import statistics as st
import sys

from fedbgmd.reporting.writer import read_metrics

out, version, rep, wall = sys.argv[1:]
rows = [r for r in read_metrics(out)[1:] if r["test_accuracy"] is None]
med = lambda f: 1000 * st.median(f(r) for r in rows)  # noqa: E731
parts = ("client_time_s", "agg_time_s", "eval_time_s")
print(
    f"{version} #{rep}: wall {wall} s, round {med(lambda r: r['round_time_s']):.1f} ms, "
    f"client {med(lambda r: r['client_time_s'] or 0):.1f}, agg {med(lambda r: r['agg_time_s'] or 0):.1f}, "
    f"overhead {med(lambda r: r['round_time_s'] - sum(r[k] or 0 for k in parts)):.1f} ms "
    f"({len(rows)} rounds)"
)
PY
  done
done
