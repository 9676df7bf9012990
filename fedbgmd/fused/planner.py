"""Planning a fused group's rounds on the CPU: every run's sampled clients, mini-batch indices
and data-attacked batches, inline or in forked worker processes that work ahead of the device
through pipes and shared memory (:class:`_Planner`)."""

from __future__ import annotations

import multiprocessing as mp
import signal
from typing import Any

import torch
from torch import Tensor


def _plan_round(state: dict[str, Any], rnd: int) -> tuple[Tensor, Any, list[list[int]]]:
    """Every run's sampled clients, their mini-batch indices (global, (R, n, b)) and the
    data-attacked batches [(run, client position, x, y)], exactly as the single-run clients
    draw them (fedbgmd.clients.honest: generator(seed, round, pid, "batches"/"data", ...))."""
    from fedbgmd.components import generator
    from fedbgmd.training import batch_indices

    b = state["batch_size"]
    train = state["train"]
    out_idx, attacked, sampled = [], [], []  # attacked: (run, client position, x, y)
    for r, (seed, parts, byz, data_attack, strategy) in enumerate(state["runs"]):
        ids = strategy.sample_partitions(rnd)
        sampled.append(ids)
        rows = []
        for c, pid in enumerate(ids):
            part = parts[pid]
            g = generator(seed, rnd, pid, "batches", "honest")
            local = next(batch_indices(len(part), b, 1, None, g))
            gi = part[local]
            if len(gi) < b:  # a client smaller than the batch: not fusable
                raise NotImplementedError(
                    f"partition {pid} holds {len(part)} samples < batch_size {b}"
                )
            rows.append(gi)
            if data_attack is not None and pid in byz:
                gd = generator(seed, rnd, pid, "data", "honest", device="cpu")
                xa, ya = data_attack.corrupt_batch(
                    train.x[gi], train.y[gi], generator=gd, num_classes=state["num_classes"]
                )
                attacked.append((r, c, xa, ya))
        out_idx.append(torch.stack(rows))
    packed = None
    if attacked:  # one tensor each: one host-to-device copy per round
        packed = (
            torch.tensor([a[0] for a in attacked]),
            torch.tensor([a[1] for a in attacked]),
            torch.stack([a[2] for a in attacked]),
            torch.stack([a[3] for a in attacked]),
        )
    return torch.stack(out_idx), packed, sampled


def _plan_into_slot(
    state: dict[str, Any], bufs: dict[str, Tensor], rnd: int, slot: int
) -> tuple[list[list[int]], int]:
    """Plan ``rnd`` into the shared slot; return the small parts (sampled ids, attacked count)."""
    idx, attacked, sampled = _plan_round(state, rnd)
    bufs["idx"][slot].copy_(idx)
    count = 0
    if attacked is not None:
        count = len(attacked[0])
        for name, t in zip(("run", "client", "x", "y"), attacked):
            bufs[name][slot, :count].copy_(t)
    return sampled, count


def _planner_worker(conn: Any, state: dict[str, Any], bufs: dict[str, Tensor]) -> None:
    """A forked planner: (round, slot) in, (round, sampled, count) or an error out, one pipe.

    It ignores SIGINT: a Ctrl-C reaches the whole process group, and the main process, which
    handles it and writes every job's summary, then kills its planners itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        rnd, slot = task
        try:
            conn.send((rnd, *_plan_into_slot(state, bufs, rnd, slot)))
        except Exception as err:
            conn.send((rnd, err, None))


class _Planner:
    """Rounds' plans on ``device``, computed inline or by forked workers working ahead.

    Workers write into shared-memory slots (mini-batch indices and the data-attacked batches:
    tens of MB a round for a full Table 2 sweep, too much to pickle) and return only the sampled
    client ids. Round r goes to worker (r − 1) mod W through that worker's own pipe (no lock is
    shared, so killing a worker can never leave one held: multiprocessing.Pool's shared task
    queue could, and its shutdown then hung); at most DEPTH rounds per worker are in flight, so
    a slot is rewritten only after the device copy of the round it held.
    """

    DEPTH = 2

    def __init__(
        self, state: dict[str, Any], num_rounds: int, workers: int, device: torch.device
    ) -> None:
        self.state, self.num_rounds, self.device = state, num_rounds, device
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        if workers <= 0 or "fork" not in mp.get_all_start_methods():
            return
        runs = state["runs"]
        n = max(1, len(runs[0][4].sample_partitions(1)))
        b = state["batch_size"]
        shape = tuple(state["train"].x.shape[1:])
        attacked_max = sum(len(byz) for _, _, byz, attack, _ in runs if attack is not None)
        self.slots = workers * self.DEPTH
        k, a = self.slots, max(1, attacked_max)
        self.bufs = {
            "idx": torch.zeros(k, len(runs), n, b, dtype=torch.int64).share_memory_(),
            "run": torch.zeros(k, a, dtype=torch.int64).share_memory_(),
            "client": torch.zeros(k, a, dtype=torch.int64).share_memory_(),
            "x": torch.zeros(k, a, b, *shape, dtype=state["train"].x.dtype).share_memory_(),
            "y": torch.zeros(k, a, b, dtype=state["train"].y.dtype).share_memory_(),
        }
        ctx = mp.get_context("fork")
        for _ in range(workers):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_planner_worker, args=(there, state, self.bufs), daemon=True)
            proc.start()
            there.close()
            self.procs.append(proc)
            self.conns.append(here)
        for rnd in range(1, min(num_rounds, self.slots) + 1):
            self._submit(rnd)

    def _conn(self, rnd: int) -> Any:
        return self.conns[(rnd - 1) % len(self.conns)]

    def _submit(self, rnd: int) -> None:
        self._conn(rnd).send((rnd, (rnd - 1) % self.slots))

    def get(self, rnd: int) -> tuple[Tensor, Any, list[list[int]]]:
        dev = self.device
        if not self.procs:
            idx, attacked, sampled = _plan_round(self.state, rnd)
            if attacked is not None:
                attacked = tuple(t.to(dev) for t in attacked)
            return idx.to(dev), attacked, sampled
        try:
            got, sampled, count = self._conn(rnd).recv()  # a worker's rounds come in order
        except EOFError as err:
            raise RuntimeError(f"the planner process for round {rnd} died") from err
        if isinstance(sampled, Exception):
            raise sampled
        assert got == rnd, (got, rnd)
        slot = (rnd - 1) % self.slots
        idx = self.bufs["idx"][slot].to(dev)
        attacked = None
        if count:
            attacked = tuple(
                self.bufs[k][slot, :count].to(dev) for k in ("run", "client", "x", "y")
            )
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # the slot is read before reuse
        if rnd + self.slots <= self.num_rounds:
            self._submit(rnd + self.slots)
        return idx, attacked, sampled

    def close(self) -> None:
        """Stop the workers at once (SIGKILL: they hold nothing the main process needs)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc, conn in zip(self.procs, self.conns):
            proc.join(timeout=10)
            conn.close()
        self.procs, self.conns = [], []
