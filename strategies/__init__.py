"""fedbgmd.strategies (folder `strategies/`, importable only as `fedbgmd.strategies`)."""
