"""flatten_state / unflatten_state round trip."""

from __future__ import annotations

import pytest
import torch

from fedbgmd.core import flatten_state, stack_rows, unflatten_state


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(4, 3)
    )


def test_round_trip_exact_with_passthrough() -> None:
    m = _model()
    m(torch.randn(2, 1, 6, 4)) if False else None
    state = m.state_dict()
    state["1.num_batches_tracked"] = torch.tensor(7)
    flat, spec = flatten_state(state)
    assert flat.ndim == 1 and flat.numel() == spec.numel
    assert spec.numel == sum(v.numel() for v in state.values() if v.is_floating_point())
    assert "1.num_batches_tracked" in spec.passthrough
    out = unflatten_state(flat, spec)
    assert list(out) == list(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v)
    out2 = unflatten_state(flat, spec, passthrough={"1.num_batches_tracked": torch.tensor(9)})
    assert int(out2["1.num_batches_tracked"]) == 9
    m.load_state_dict(out)


def test_mixed_precision_promotes_and_restores() -> None:
    state = {"a": torch.randn(3).half(), "b": torch.randn(2, 2)}
    flat, spec = flatten_state(state)
    assert flat.dtype == torch.float32
    out = unflatten_state(flat, spec)
    assert out["a"].dtype == torch.float16 and torch.equal(out["a"], state["a"])


def test_unflatten_validation() -> None:
    flat, spec = flatten_state({"w": torch.randn(4)})
    with pytest.raises(ValueError):
        unflatten_state(flat[:3], spec)
    with pytest.raises(ValueError):
        unflatten_state(flat, spec, passthrough={"w": torch.zeros(4)})
    with pytest.raises(ValueError):
        flatten_state({"n": torch.tensor(1)})


def test_stack_rows_of_one_matrix_is_a_view_else_a_copy() -> None:
    m = torch.randn(4, 6)
    rows = [m[i] for i in range(4)]
    out = stack_rows(rows)
    assert torch.equal(out, m) and out.data_ptr() == m.data_ptr()  # no copy
    for picked in ([m[0], m[2]], [m[1], m[0]], [m[0], m[1].clone()], [m[1], m[2], m[3]][:2]):
        out = stack_rows(picked)
        assert torch.equal(out, torch.stack(picked))
    assert stack_rows([m[1], m[2]]).data_ptr() == m[1].data_ptr()  # consecutive, offset start
    assert stack_rows([m[0], m[2]]).data_ptr() != m.data_ptr()  # a gap: copied
    t = torch.randn(6, 4).t()  # rows with stride != 1
    assert torch.equal(stack_rows([t[0], t[1]]), torch.stack([t[0], t[1]]))
    with pytest.raises(ValueError, match="no rows"):
        stack_rows([])
