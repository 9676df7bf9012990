"""Run folders and reports over them.

- :mod:`~fedbgmd.reporting.writer`: a run folder's files (metrics.csv/.jsonl, summary.json), the
  RunWriter that writes them and the readers;
- :mod:`~fedbgmd.reporting.summary`: what summary.json says (metrics summary, outcome, segments,
  versions);
- :mod:`~fedbgmd.reporting.setting`: what defines a setting (one rule, for summaries and reports);
- :mod:`~fedbgmd.reporting.runs`: the runs below a sweep folder, grouped by setting;
- :mod:`~fedbgmd.reporting.stats`, :mod:`~fedbgmd.reporting.reference`,
  :mod:`~fedbgmd.reporting.tables`, :mod:`~fedbgmd.reporting.plots`: statistics over seeds,
  reference numbers, report.md/.csv tables, figures;
- :mod:`~fedbgmd.reporting.report`: ``fedbgmd report DIR`` (build_report, main).

Importing this package loads nothing: writers (the server) do not pay for numpy or matplotlib.
"""
