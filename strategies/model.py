"""GlobalModel: the server's copy of x_t as one flat float32 tensor on the aggregation device.

One job: convert between Flower's ArrayRecord (a state dict) and the flat vector the algorithm
works on, and hand the model to in-process clients by reference (``DEVICE_STORE``) instead of
serialising it. Non-float buffers (e.g. BatchNorm's counters) pass through unchanged.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedbgmd.core import FlatSpec, all_finite, flatten_state, unflatten_state
from fedbgmd.wire import DEVICE_STORE


class GlobalModel:
    """x_t (flat, on ``device``) and how to turn it back into a state dict / ArrayRecord."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.x: torch.Tensor | None = None
        self.spec: FlatSpec | None = None
        self.passthrough: dict[str, torch.Tensor] = {}
        self.nbytes = 0  # the model's payload (bytes_down per client)

    @property
    def ready(self) -> bool:
        """True once the layout is known (the first round, or after a resume's first round)."""
        return self.x is not None and self.spec is not None

    @property
    def dim(self) -> int:
        assert self.x is not None
        return int(self.x.numel())

    def adopt(self, arrays: ArrayRecord) -> None:
        """Learn the layout from ``arrays``; take its values unless x is already set (resume)."""
        state = arrays.to_torch_state_dict()
        flat, self.spec = flatten_state(state)
        self.passthrough = {k: v for k, v in state.items() if not v.is_floating_point()}
        self.nbytes = sum(v.numel() * v.element_size() for v in state.values())
        if self.x is None:
            self.x = flat.to(self.device, torch.float32)

    def finite(self) -> bool:
        return self.x is not None and all_finite(self.x)

    def state(self) -> dict[str, torch.Tensor]:
        """The global model as a state dict of views into x (read only)."""
        assert self.x is not None and self.spec is not None
        return unflatten_state(self.x.detach(), self.spec, passthrough=self.passthrough)

    def to_arrays(self) -> ArrayRecord:
        assert self.x is not None and self.spec is not None
        state = unflatten_state(self.x.detach().cpu(), self.spec, passthrough=self.passthrough)
        return ArrayRecord(state)

    def share(self) -> str:
        """A DEVICE_STORE reference to x for this round's in-process clients."""
        assert self.x is not None
        return DEVICE_STORE.share(self.x)
