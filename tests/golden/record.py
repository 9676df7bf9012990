"""Record the per-round metrics that tests/test_golden.py pins (run once, on the code before a refactor).

    python tests/golden/record.py        # rewrites tests/golden/metrics.json

The pinned numbers are the in-process engine's outputs for fixed seeds, recorded before the
architecture refactor (issue 20); a refactor that means to keep the numbers keeps this file as is.
Re-record only for a change that is meant to move the numbers, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Several strategies, attacks, block selectors, memories, quantizers and server steps; each a
# seconds-long synthetic run (experiment=smoke: 5 clients).
CASES: dict[str, list[str]] = {
    "fedbgmd_clean": [],
    "fedbgmd_bitflip_momentum": [
        "attack=bit_flip",
        "attack.fraction=0.4",
        "client.optimizer.momentum=0.9",
    ],
    "fedbgmd_topk_mean_memory": [
        "strategy.block.selector=topk",
        "strategy.block.memory=mean",
        "attack=sign_flip",
        "attack.fraction=0.2",
    ],
    "fedbgmd_uniform_no_memory_qsgd4": [
        "strategy.block.selector=uniform",
        "strategy.block.memory=none",
        "client.quantization.method=qsgd",
        "client.quantization.bits=4",
    ],
    "fedbgmd_server_momentum_sign": [
        "strategy.server_lr=0.5",
        "strategy.server_momentum=0.9",
        "client.quantization.method=sign",
        "client.quantization.bits=1",
        "attack=gaussian",
        "attack.fraction=0.2",
    ],
    "gm_alie_omniscient": ["strategy=gm", "attack=alie_omniscient", "attack.fraction=0.4"],
    "cm_label_flip": ["strategy=cm", "attack=label_flip", "attack.fraction=0.4"],
    "krum_ipm_omniscient": ["strategy=krum", "attack=ipm_omniscient", "attack.fraction=0.2"],
    "cclip_history_sign_flip": ["strategy=cclip", "attack=sign_flip", "attack.fraction=0.2"],
    "fedavg_malformed": ["strategy=fedavg", "attack=malformed", "attack.fraction=0.2"],
    "ctm_partial_participation": [
        "strategy=ctm",
        "strategy.clients_per_round=3",
        "attack=bit_flip",
        "attack.fraction=0.2",
    ],
    "norm_filter_nonfinite": ["strategy=norm_filter", "attack=nonfinite", "attack.fraction=0.2"],
}
COMMON = ["experiment=smoke", "num_rounds=4", "seed=7"]
# Columns that are outcomes of the algorithm (timings and host facts are not).
KEYS = (
    "round",
    "epoch",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "replies_accepted",
    "replies_rejected",
    "bytes_up",
    "bytes_down",
    "relative_residual",
    "memory_norm",
    "gm_iterations",
    "gm_converged",
)


def run_case(overrides: list[str], folder: Path) -> list[dict]:
    from fedbgmd.cli import check_config
    from fedbgmd.config import compose_config
    from fedbgmd.engine import run_inprocess
    from fedbgmd.results import read_metrics

    cfg = compose_config([*COMMON, *overrides])
    check_config(cfg)  # raises on a config the CLI would refuse
    # one thread, whatever the process had: the order of float reductions depends on it, and
    # tests before this one change it (cli.run applies engine.num_threads, smoke's is 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_inprocess(cfg, folder)
    finally:
        torch.set_num_threads(threads)
    return [{k: row[k] for k in KEYS if k in row} for row in read_metrics(folder)]


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            out[name] = run_case(overrides, Path(tmp) / name)
            print(name, out[name][-1], file=sys.stderr)
    (HERE / "metrics.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
