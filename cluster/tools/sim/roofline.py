"""Roofline estimates of step times for hardware we cannot profile here (ILLUSTRATIVE).

``roofline_table(Hardware, DenseModel)`` fills a ProfileTable from peak compute and memory
bandwidth: a step takes ``max(flops / (peak * compute_eff), bytes / (bandwidth * memory_eff))
+ overhead``. Prefill of T tokens: ``2 * params * T`` matmul FLOPs plus ``2 * layers *
hidden * T^2`` causal-attention FLOPs, weights read once. Decode of B sequences over C
tokens of context: ``2 * params * B + 4 * layers * hidden * B * C`` FLOPs, weights plus the
batch's KV read once. Real kernels lose more at small shapes, so treat the output as a
plausible shape, not a measurement; the table is marked ``illustrative``.

``python -m cluster.tools.sim.roofline`` rewrites ``cluster/tools/sim/data/a100_llama7b_example.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.tools.sim.model import ProfileTable
from cluster.tools.sim.workload import DATA_DIR

EXAMPLE_PATH = DATA_DIR / "a100_llama7b_example.json"


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense fp16/bf16 FLOP/s
    mem_bandwidth: float  # bytes/s
    mem_bytes: float  # device memory
    compute_eff: float = 0.55  # achieved fraction of peak FLOP/s in large matmuls
    memory_eff: float = 0.75  # achieved fraction of peak bandwidth when streaming weights/KV
    step_overhead_s: float = 0.0025  # launches, sampling, scheduling per step
    memory_utilization: float = 0.9  # share of device memory the engine takes
    activation_bytes: float = 2e9  # reserved for activations and workspace


@dataclass(frozen=True)
class DenseModel:
    name: str
    params: float  # parameters in matmuls that every token goes through
    weight_bytes: float
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


# NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s dense FP16/BF16 tensor, 2,039 GB/s HBM2e.
A100_80GB = Hardware("NVIDIA A100-SXM4-80GB", peak_flops=312e12, mem_bandwidth=2.039e12, mem_bytes=80e9)
# Llama-2-7B (Touvron et al., 2023): 32 layers, hidden 4096, 32 heads of 128 (no GQA), fp16.
LLAMA2_7B = DenseModel(
    "Llama-2-7B", params=6.48e9, weight_bytes=13.5e9, num_layers=32, hidden_size=4096, num_kv_heads=32, head_dim=128
)

PREFILL_TOKENS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTEXT_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)


def _time(hw: Hardware, flops: float, nbytes: float) -> float:
    return max(flops / (hw.peak_flops * hw.compute_eff), nbytes / (hw.mem_bandwidth * hw.memory_eff)) + (
        hw.step_overhead_s
    )


def prefill_s(hw: Hardware, m: DenseModel, tokens: int) -> float:
    flops = 2 * m.params * tokens + 2 * m.num_layers * m.hidden_size * tokens * tokens
    return _time(hw, flops, m.weight_bytes + tokens * m.kv_bytes_per_token)


def decode_s(hw: Hardware, m: DenseModel, batch: int, context: int) -> float:
    flops = 2 * m.params * batch + 4 * m.num_layers * m.hidden_size * batch * context
    return _time(hw, flops, m.weight_bytes + batch * context * m.kv_bytes_per_token)


def roofline_table(hw: Hardware = A100_80GB, m: DenseModel = LLAMA2_7B, block_size: int = 16) -> ProfileTable:
    kv_memory = hw.mem_bytes * hw.memory_utilization - m.weight_bytes - hw.activation_bytes
    return ProfileTable(
        prefill_tokens=PREFILL_TOKENS,
        prefill_s=tuple(round(prefill_s(hw, m, t), 6) for t in PREFILL_TOKENS),
        decode_batch_sizes=BATCH_SIZES,
        decode_context_lens=CONTEXT_LENS,
        decode_s=tuple(tuple(round(decode_s(hw, m, b, c), 6) for c in CONTEXT_LENS) for b in BATCH_SIZES),
        num_layers=m.num_layers,
        kv_bytes_per_token=m.kv_bytes_per_token,
        block_size=block_size,
        num_blocks=int(kv_memory // (block_size * m.kv_bytes_per_token)),
        max_num_batched_tokens=2048,
        max_num_seqs=256,
        illustrative=True,
        source=(
            "ILLUSTRATIVE roofline estimate, NOT a measurement (cluster/tools/sim/roofline.py): "
            f"{hw.name} at {hw.peak_flops / 1e12:g} TFLOP/s dense fp16 x {hw.compute_eff:g} and "
            f"{hw.mem_bandwidth / 1e9:g} GB/s x {hw.memory_eff:g} (datasheet peaks x assumed efficiencies), "
            f"+{hw.step_overhead_s * 1e3:g} ms per step; {m.name} shapes (fp16). Real kernels differ, "
            "especially at small batch and chunk sizes: profile the target machine for real numbers."
        ),
        machine={"name": hw.name, "estimated": True},
        model={"name": m.name, "params": m.params, "weight_bytes": m.weight_bytes, "dtype": "float16"},
        engine={"dtype": "float16", "kv_memory_bytes": kv_memory},
    )


if __name__ == "__main__":
    roofline_table().save(EXAMPLE_PATH)
    print(f"wrote {EXAMPLE_PATH}")
