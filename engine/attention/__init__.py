"""Attention backends behind the AttentionBackend protocol."""

from engine.attention.backend import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata"]
