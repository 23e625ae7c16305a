"""Hand-made step-time tables with simple analytic answers, shared by the simulator tests."""

from __future__ import annotations

from cluster.tools.sim.model import ProfileTable, StepTimeModel


def flat_table(
    prefill_s: float = 0.1,
    decode_s: float = 0.01,
    num_layers: int = 4,
    kv_bytes_per_token: int = 1000,
    block_size: int = 16,
    num_blocks: int = 1000,
    budget: int = 2048,
    max_seqs: int = 256,
) -> ProfileTable:
    """Every prefill step takes ``prefill_s`` and every decode step ``decode_s``, whatever the size."""
    return ProfileTable(
        prefill_tokens=(1, 4096),
        prefill_s=(prefill_s, prefill_s),
        decode_batch_sizes=(1, 512),
        decode_context_lens=(1, 1 << 20),
        decode_s=((decode_s, decode_s), (decode_s, decode_s)),
        num_layers=num_layers,
        kv_bytes_per_token=kv_bytes_per_token,
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        source="test: flat",
    )


def linear_table(num_blocks: int = 4096, budget: int = 512, max_seqs: int = 64) -> ProfileTable:
    """Step time grows with tokens, batch and context (a small GPU-like shape)."""
    return ProfileTable(
        prefill_tokens=(16, 64, 256, 1024),
        prefill_s=(0.004, 0.006, 0.014, 0.05),
        decode_batch_sizes=(1, 8, 64),
        decode_context_lens=(16, 256, 2048),
        decode_s=((0.003, 0.0032, 0.004), (0.0035, 0.004, 0.007), (0.006, 0.01, 0.03)),
        num_layers=8,
        kv_bytes_per_token=8192,
        block_size=16,
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        source="test: linear",
    )


def model(table: ProfileTable) -> StepTimeModel:
    return StepTimeModel(table)
