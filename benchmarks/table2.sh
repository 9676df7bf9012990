#!/usr/bin/env bash
# Run the Fashion-MNIST rows of the seed's Table 2 as Hydra multiruns over seeds, then report.
#   bash benchmarks/table2.sh paper|as_run [OUT_DIR] [extra Hydra overrides...]
# e.g. a reduced budget: bash benchmarks/table2.sh paper multirun/t2-short num_rounds=1170
# Strategies: SGD (mean), CMD (cm), BGMD (fedbgmd), GMD (gm); seeds 0,1,2. Needs a GPU to finish
# in reasonable time (about a minute per cell on an H200 with the batched engine).
# Subsets: ROWS="clean bitflip20" STRATEGIES=fedbgmd,gm SEEDS=0,1,2 bash benchmarks/table2.sh ...
set -euo pipefail
variant="${1:?usage: table2.sh paper|as_run [OUT_DIR] [overrides...]}"
out="${2:-multirun/table2-$variant}"
shift $(( $# >= 2 ? 2 : 1 ))
case "$variant" in
  paper)  preset=fmnist_table2;        flip=100; impulse=0.9 ;;
  as_run) preset=fmnist_table2_as_run; flip=5;   impulse=0.95 ;;
  *) echo "variant must be paper or as_run" >&2; exit 2 ;;
esac
# row name | attack overrides | BGMD block size beta
rows=(
  "clean|attack=none|0.05"
  "bitflip20|attack=bit_flip attack.fraction=0.2 attack.params.scale=$flip|0.1"
  "bitflip40|attack=bit_flip attack.fraction=0.4 attack.params.scale=$flip|0.1"
  "additive20|attack=gaussian attack.fraction=0.2|0.1"
  "additive40|attack=gaussian attack.fraction=0.4|0.2"
  "impulse20|attack=impulse attack.fraction=0.2 attack.params.p=$impulse|0.1"
  "impulse40|attack=impulse attack.fraction=0.4 attack.params.p=$impulse|0.1"
  "featnoise20|attack=feature_noise attack.fraction=0.2|0.1"
  "featnoise40|attack=feature_noise attack.fraction=0.4|0.1"
  "backdoor20|attack=backdoor attack.fraction=0.2 attack.params.target=0|0.1"
  "backdoor40|attack=backdoor attack.fraction=0.4 attack.params.target=0|0.1"
)
strategies="${STRATEGIES:-fedavg,cm,fedbgmd,gm}"
seeds="${SEEDS:-0,1,2}"
for row in "${rows[@]}"; do
  IFS='|' read -r name attack beta <<<"$row"
  if [[ -n "${ROWS:-}" && " $ROWS " != *" $name "* ]]; then continue; fi
  # shellcheck disable=SC2086
  fedbgmd -m "experiment=$preset" "strategy=$strategies" "seed=$seeds" \
    strategy.weighted=false $attack "strategy.block.beta=$beta" \
    "hydra.sweep.dir=$out/$name" "$@" || echo "row $name: some jobs failed (see $out/$name)" >&2
done
fedbgmd report "$out"
