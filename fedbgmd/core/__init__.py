"""fedbgmd.core — pure-torch math of FL-BGMD: geometric median, aggregators, block selection,
residual memory, the block step, quantization and model flattening.

Imports only torch and the standard library (no flwr, no hydra). See docs/core.md.
"""

from fedbgmd.core.aggregation import (
    AGGREGATORS,
    AggregationResult,
    Aggregator,
    available_aggregators,
    get_aggregator,
    register_aggregator,
)
from fedbgmd.core.bgmd import BlockStep, BlockStepResult, bgmd_step
from fedbgmd.core.counts import block_size, fraction_ceil, fraction_floor
from fedbgmd.core.errors import AggregationRefused
from fedbgmd.core.flatten import FlatSpec, flatten_state, stack_rows, unflatten_state
from fedbgmd.core.geometric_median import GMResult, geometric_median
from fedbgmd.core.memory import MEMORIES, MeanMemory, Memory, NoMemory, PerClientMemory, make_memory
from fedbgmd.core.nonfinite import all_finite, all_finite_each, drop_nonfinite_rows
from fedbgmd.core.quantization import QUANTIZERS, QuantizedTensor, dequantize, quantize
from fedbgmd.core.registry import Registry
from fedbgmd.core.selection import (
    SELECTORS,
    available_selectors,
    column_sq_norms,
    register_selector,
    select_block,
)
from fedbgmd.core.server_opt import ServerOptimizer

__all__ = [
    "AGGREGATORS",
    "MEMORIES",
    "QUANTIZERS",
    "SELECTORS",
    "AggregationRefused",
    "AggregationResult",
    "Aggregator",
    "BlockStep",
    "BlockStepResult",
    "FlatSpec",
    "GMResult",
    "MeanMemory",
    "Memory",
    "NoMemory",
    "PerClientMemory",
    "QuantizedTensor",
    "Registry",
    "ServerOptimizer",
    "all_finite",
    "all_finite_each",
    "available_aggregators",
    "available_selectors",
    "bgmd_step",
    "block_size",
    "column_sq_norms",
    "dequantize",
    "drop_nonfinite_rows",
    "flatten_state",
    "fraction_ceil",
    "fraction_floor",
    "geometric_median",
    "get_aggregator",
    "make_memory",
    "quantize",
    "register_aggregator",
    "register_selector",
    "select_block",
    "stack_rows",
    "unflatten_state",
]
