"""The one exception type that means "this round cannot be aggregated", not "this code is broken".

A rule that needs more rows than the round has (Krum/Bulyan with too few replies, a trimmed mean
that would trim every row, every row non-finite) raises :class:`AggregationRefused`; the strategy
then skips the round (model and memory unchanged, the reason in metrics.csv's ``skipped`` column,
the count in summary.json's ``skipped_rounds``). Any other exception from an aggregator, selector,
strategy or attack is a bug and fails the run. A custom aggregator refuses a round the same way:
``raise fedbgmd.core.AggregationRefused("why")``.
"""

from __future__ import annotations

__all__ = ["AggregationRefused"]


class AggregationRefused(ValueError):
    """This round's rows cannot be aggregated by the rule (the round is skipped, not failed).

    A ValueError, so code that caught ValueError for these cases keeps working."""
