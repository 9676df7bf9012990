"""Fused sweeps: many runs of one sweep advanced in lockstep as one batched computation.

Why: one run of the seed's setup (32 clients x batch 16, a 1.16M-parameter CNN, H = 1) leaves a
GPU nearly idle; a corruption sweep is dozens of such runs. Here the runs that can advance
together (same data, model, clients, rounds and client optimiser; free to differ in strategy,
aggregator, block step, attack, fraction, seed and the client's SGD settings: learning rate and
its schedule, momentum, weight decay) share every round:

* models, momentum buffers and residual memories are stacked along a leading run axis R;
* all runs' clients compute their gradient in one nested ``vmap`` (runs x clients) of
  ``grad(loss ∘ functional_call)``: with H = 1 every client of run r starts from x_r, so this is
  per-client gradients of one model per run;
* GM (full, or on the BGMD block) runs as one batched Gram-space Weiszfeld over all runs
  (:func:`fedbgmd.core.batched_geometric_median`); the BGMD block step (column norms, top-k,
  memory) is batched over the runs that share its block size, selector and memory;
* other aggregators, update and omniscient attacks are called per run on views, through the same
  plug-in objects as a single run; one host read per round collects every run's diagnostics;
* evaluation of all runs is one batched forward pass per test chunk.

What each job keeps from its single run (same seeds, same derivation from (seed, round, client)):
client sampling, the Byzantine set, partitions, every client's mini-batch indices, data-attack
batches (the attack's own ``corrupt_batch`` with the client's generator), update-attack noise,
block selection randomness, the omniscient adversary's generator, the learning-rate schedule,
model initialisation, reply validation (non-finite or over-norm rows rejected with their reason,
the round then handled through the single-run core functions), divergence handling and the run
folder (config.yaml, metrics.csv, metrics.jsonl, summary.json, plots). What differs: dropout masks
(drawn for the whole group; the batched in-process engine's also differ from the per-client loop,
see :mod:`fedbgmd.batched`) and float rounding of batched kernels. tests/test_fused.py compares
fused jobs with the same jobs run alone, with the tolerance and its reason.

Not fused (the job runs alone on its configured engine, and the log says why): a custom
strategy class, local_steps != 1 or local epochs, a non-SGD client optimiser, quantized
messages, message attacks, non-omniscient attacks that train extra local updates (ALIE/IPM),
models with buffers (BatchNorm), the deployment engine, resume.

The modules, by job: :mod:`~fedbgmd.fused.grouping` (which jobs fuse, and with which),
:mod:`~fedbgmd.fused.jobs` (running a sweep's jobs: groups, and the jobs that run alone),
:mod:`~fedbgmd.fused.group` (the stacked runs and their round: clients, reply checks, server
step, evaluation), :mod:`~fedbgmd.fused.aggregate` (the batched GM and block step, and the
single-run path), :mod:`~fedbgmd.fused.planner` (mini-batch planning in forked workers),
:mod:`~fedbgmd.fused.runs` (one job's pieces and its run folder) and
:mod:`~fedbgmd.fused.launcher` (``hydra/launcher=fused``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the type checker; at run time, __getattr__ below
    from fedbgmd.fused.group import FusedGroup as FusedGroup
    from fedbgmd.fused.grouping import Unfusable as Unfusable
    from fedbgmd.fused.grouping import fuse_reason as fuse_reason
    from fedbgmd.fused.grouping import group_key as group_key
    from fedbgmd.fused.grouping import plan_groups as plan_groups
    from fedbgmd.fused.jobs import run_jobs as run_jobs
    from fedbgmd.fused.jobs import set_aside_partial as set_aside_partial

# The public names, imported from their modules on first use (PEP 562): the CLI imports
# fedbgmd.fused.launcher at every start to register hydra/launcher=fused, and the engine
# (torch.func; flwr, through the strategies) must not slow a start that runs nothing, such as
# a bad config's exit 2 (by about a second here).
_MODULE_OF = {
    "FusedGroup": "group",
    "Unfusable": "grouping",
    "fuse_reason": "grouping",
    "group_key": "grouping",
    "plan_groups": "grouping",
    "run_jobs": "jobs",
    "set_aside_partial": "jobs",
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
