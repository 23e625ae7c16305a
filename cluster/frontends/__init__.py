"""Frontends: the one validation + streaming facade (service.py) and the gRPC and
OpenAI-compatible HTTP servers over it."""
