"""revjax benchmarks: scripts whose results (JSON + PNG) live in benchmarks/results/."""
