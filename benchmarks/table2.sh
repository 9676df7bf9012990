#!/usr/bin/env bash
# Run the Fashion-MNIST rows of the seed's Table 2 as Hydra multiruns over seeds, then report.
#   bash benchmarks/table2.sh paper|as_run [OUT_DIR] [extra Hydra overrides...]
# e.g. a reduced budget: bash benchmarks/table2.sh paper multirun/t2-short num_rounds=1170
# Rows are the presets conf/table2/<variant>_<row>.yaml (attack, psi, attack strength, BGMD beta:
# one place for them). Strategies: SGD (mean), CMD (cm), BGMD (fedbgmd), GMD (gm); seeds 0,1,2.
# Needs a GPU to finish in reasonable time. Subsets:
#   ROWS="clean bitflip20" STRATEGIES=fedbgmd,gm SEEDS=0,1,2 bash benchmarks/table2.sh ...
# LAUNCHER=fused runs the chosen rows as one fused sweep into OUT_DIR/fused (docs/fused.md).
set -euo pipefail
variant="${1:?usage: table2.sh paper|as_run [OUT_DIR] [overrides...]}"
out="${2:-multirun/table2-$variant}"
shift $(( $# >= 2 ? 2 : 1 ))
case "$variant" in
  paper|as_run) ;;
  *) echo "variant must be paper or as_run" >&2; exit 2 ;;
esac
all_rows="clean bitflip20 bitflip40 additive20 additive40 impulse20 impulse40 featnoise20 featnoise40 backdoor20 backdoor40"
rows="${ROWS:-$all_rows}"
strategies="${STRATEGIES:-fedavg,cm,fedbgmd,gm}"
seeds="${SEEDS:-0,1,2}"
if [[ "${LAUNCHER:-}" == fused ]]; then
  presets="$(for r in $rows; do printf '%s_%s,' "$variant" "$r"; done)"
  fedbgmd -m "+table2=${presets%,}" "strategy=$strategies" "seed=$seeds" \
    "hydra.sweep.dir=$out/fused" hydra/launcher=fused "$@" || echo "some jobs failed" >&2
else
  for name in $rows; do
    fedbgmd -m "+table2=${variant}_$name" "strategy=$strategies" "seed=$seeds" \
      "hydra.sweep.dir=$out/$name" "$@" || echo "row $name: some jobs failed (see $out/$name)" >&2
  done
fi
fedbgmd report "$out"
