"""Data for prompt tuning: seqio preprocessors, postprocessors, metrics and registration helpers.

The task registrations themselves live in the top-level `tasks` package; this package holds the
reusable pieces and `file_tasks` (tasks from your own JSONL/TSV files, no code needed).
"""
