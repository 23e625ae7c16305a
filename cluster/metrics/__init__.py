"""Prometheus metrics: the registry of request-level series (registry.py) and the collector
of worker-side series from the workers' load reports (workers.py)."""
