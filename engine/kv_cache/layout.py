"""KVLayout: the page geometry both ends of a KV transfer agree on before bytes move."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}


class KVLayoutMismatch(ValueError):
    """Two KV layouts differ; the message names every differing field."""


@dataclass(frozen=True)
class KVLayout:
    """Geometry of the paged KV cache.

    The cache tensor is ``[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]``
    (index 0 of the ``2`` axis is K, 1 is V), so one layer's page is one contiguous run of
    ``page_bytes`` bytes: the unit of a layer-wise transfer.
    """

    dtype: str  # "float32" | "float16" | "bfloat16"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_SIZES:
            raise ValueError(f"KVLayout dtype {self.dtype!r} is not one of {sorted(_DTYPE_SIZES)}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout {name} must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer's page: [2, block_size, num_kv_heads, head_dim]."""
        return (2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one layer's page (K and V of ``block_size`` tokens)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * _DTYPE_SIZES[self.dtype]

    def check_compatible(self, other: KVLayout) -> None:
        """Raise KVLayoutMismatch naming each field where ``other`` differs from self."""
        diffs = [f"{k}: {v!r} != {getattr(other, k)!r}" for k, v in asdict(self).items() if getattr(other, k) != v]
        if diffs:
            raise KVLayoutMismatch("KV layout mismatch (" + "; ".join(diffs) + ")")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> KVLayout:
        return KVLayout(**d)
