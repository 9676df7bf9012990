"""Malformed messages (kind ``"message"``): the outgoing named arrays are broken on purpose.

The honest message is a ``dict[str, np.ndarray]`` shaped like the model's state dict (the update
per parameter). SPEC §4: the server must reject or neutralise such messages with a logged reason,
never crash or poison the model. Modes (one key ``k`` is picked uniformly by the generator where a
mode needs one):

* ``"wrong_shape"``: ``arrays[k]`` gets one extra element along its last axis (a 0-d array becomes
  shape (2,)): both the shape and the element count differ; values are N(0, 1);
* ``"wrong_dtype"``: ``arrays[k]`` is cast to ``dtype`` (default ``"int64"``; ``"complex128"`` if
  the array already has that dtype);
* ``"missing_key"``: ``k`` is dropped;
* ``"extra_key"``: a key ``extra_key_name`` (made unique) holding 8 N(0, 1) float32 values is added;
* ``"huge"``: a key ``huge_key_name`` holding ``min(huge_factor · Σ numel, huge_max_elements)``
  float32 ones is added (default 100× the model size, capped at 10⁷ elements = 40 MB);
* ``"empty"``: ``{}``;
* ``"random"``: one of the above, drawn per call by the generator.

Arrays not touched are copied, so the output never aliases the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedbgmd.attacks.base import ClientAttack, check_choice, check_int, check_positive

__all__ = ["MALFORMED_MODES", "MalformedAttack"]

MALFORMED_MODES: tuple[str, ...] = (
    "wrong_shape",
    "wrong_dtype",
    "missing_key",
    "extra_key",
    "huge",
    "empty",
)


def _randint(generator: np.random.Generator | torch.Generator, n: int) -> int:
    """An integer uniform in ``range(n)`` from a numpy or torch generator."""
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(n))
    return int(torch.randint(n, (1,), generator=generator, device=generator.device).item())


def _normal(generator: np.random.Generator | torch.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float64 numbers of ``shape`` from a numpy or torch generator."""
    if isinstance(generator, np.random.Generator):
        return generator.standard_normal(shape)
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return z.cpu().numpy()


def _unique_key(arrays: dict[str, np.ndarray], base: str) -> str:
    key, i = base, 0
    while key in arrays:
        i += 1
        key = f"{base}_{i}"
    return key


@dataclass(frozen=True)
class MalformedAttack(ClientAttack):
    """Send a malformed message; ``mode`` ∈ :data:`MALFORMED_MODES` ∪ {"random"} (default
    "random"). See the module docstring for each mode and the other parameters.
    """

    name: ClassVar[str] = "malformed"
    kind: ClassVar[str] = "message"

    mode: str = "random"
    dtype: str = "int64"
    huge_factor: float = 100.0
    huge_max_elements: int = 10_000_000
    extra_key_name: str = "__malicious__"
    huge_key_name: str = "__huge__"

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, (*MALFORMED_MODES, "random"))
        try:
            np.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"dtype must be a numpy dtype name, got {self.dtype!r}") from err
        check_positive("huge_factor", self.huge_factor)
        check_int("huge_max_elements", self.huge_max_elements, minimum=1)
        for field in ("extra_key_name", "huge_key_name"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{field} must be a non-empty string, got {value!r}")

    def resolve_mode(self, generator: np.random.Generator | torch.Generator) -> str:
        """The concrete mode of one call (draws from ``generator`` only when mode is "random")."""
        if self.mode != "random":
            return self.mode
        return MALFORMED_MODES[_randint(generator, len(MALFORMED_MODES))]

    def corrupt_arrays(
        self,
        arrays: dict[str, np.ndarray],
        *,
        generator: np.random.Generator | torch.Generator,
    ) -> dict[str, np.ndarray]:
        mode = self.resolve_mode(generator)
        out = {k: np.array(v, copy=True) for k, v in arrays.items()}
        if mode == "empty":
            return {}
        if mode == "extra_key":
            out[_unique_key(out, self.extra_key_name)] = _normal(generator, (8,)).astype(np.float32)
            return out
        if mode == "huge":
            total = sum(int(v.size) for v in arrays.values())
            size = max(1, min(int(self.huge_factor * total), self.huge_max_elements))
            out[_unique_key(out, self.huge_key_name)] = np.ones(size, dtype=np.float32)
            return out
        if not out:  # nothing to break key-wise: an empty message is the closest malformation
            return out
        keys = list(out)
        key = keys[_randint(generator, len(keys))]
        if mode == "missing_key":
            del out[key]
        elif mode == "wrong_dtype":
            target = np.dtype(self.dtype)
            if out[key].dtype == target:
                target = np.dtype(np.complex128)
            out[key] = out[key].astype(target)
        else:  # wrong_shape
            shape = out[key].shape
            new_shape = (*shape[:-1], shape[-1] + 1) if shape else (2,)
            out[key] = _normal(generator, new_shape).astype(out[key].dtype, copy=False)
        return out
