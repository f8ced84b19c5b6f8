"""Local infrastructure for the pipeline: `python -m infra.stack up|down|status|env` (see docs/stack.md)."""
