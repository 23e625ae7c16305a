"""KV-transfer faults for tests: what a sender's ``fault_hook`` returns in place of a chunk."""

from __future__ import annotations

import dataclasses

import torch

from kv_transfer.base import KVChunk


def flipped(chunk: KVChunk) -> KVChunk:
    """``chunk`` with the first byte of its payload inverted (a copy; its checksum is the
    original's, so the receiver must fail it)."""
    payload = chunk.payload.clone()
    payload.reshape(-1).view(torch.uint8)[0] ^= 0xFF
    return dataclasses.replace(chunk, payload=payload)
