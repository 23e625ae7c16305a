"""KVLayout: the page geometry both ends of a KV transfer agree on before bytes move.

Head partition: a tensor-parallel rank's cache holds a contiguous run of the model's KV heads
(``kv_head_start`` .. ``kv_head_start + num_kv_heads`` of ``total_kv_heads``; rank r of N holds
``[r * H/N, (r + 1) * H/N)``). A whole-model layout holds heads ``[0, total_kv_heads)``. Two
layouts that differ only in their partition hold slices of the same pages: ``reconcile``
says which heads they share, and engine/kv_cache/reshard.py splits and gathers pages along
the head axis. Any other difference (dtype, block size, layers, head_dim, the model's total
KV heads) is a mismatch: refused, naming the fields. ``check_compatible`` is the strict
handshake check (a transport moves pages as they are, so the partitions must be equal too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2}


class KVLayoutMismatch(ValueError):
    """Two KV layouts differ; the message names every differing field."""


@dataclass(frozen=True)
class KVLayout:
    """Geometry of the paged KV cache.

    The cache tensor is ``[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]``
    (index 0 of the ``2`` axis is K, 1 is V), so one layer's page is one contiguous run of
    ``page_bytes`` bytes: the unit of a layer-wise transfer. ``num_kv_heads`` is the heads
    this cache holds: heads ``kv_head_start .. kv_head_start + num_kv_heads`` of the model's
    ``model_kv_heads``. Canonical form: ``total_kv_heads`` is None for a whole layout (given
    equal to ``num_kv_heads`` it becomes None), so equal geometries compare equal and
    ``dataclasses.replace(whole, num_kv_heads=n)`` is the whole layout of an n-head model.
    """

    dtype: str  # "float32" | "float16" | "bfloat16"
    block_size: int
    num_layers: int
    num_kv_heads: int  # heads held here (a TP rank's share)
    head_dim: int
    kv_head_start: int = 0  # first head held here, of the model's total_kv_heads
    total_kv_heads: int | None = None  # the model's KV heads when this holds a part; None: whole

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_SIZES:
            raise ValueError(f"KVLayout dtype {self.dtype!r} is not one of {sorted(_DTYPE_SIZES)}")
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout {name} must be positive")
        if self.total_kv_heads == self.num_kv_heads:
            object.__setattr__(self, "total_kv_heads", None)  # canonical: whole
        if not 0 <= self.kv_head_start or self.kv_head_start + self.num_kv_heads > self.model_kv_heads:
            raise ValueError(
                f"KVLayout heads [{self.kv_head_start}, {self.kv_head_start + self.num_kv_heads}) are not within "
                f"the model's total_kv_heads {self.model_kv_heads}"
            )

    @property
    def model_kv_heads(self) -> int:
        """The model's KV heads (all ranks' together)."""
        return self.num_kv_heads if self.total_kv_heads is None else self.total_kv_heads

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

    @property
    def heads(self) -> range:
        """The model's KV heads this layout holds, in page order."""
        return range(self.kv_head_start, self.kv_head_start + self.num_kv_heads)

    @property
    def is_whole(self) -> bool:
        """Whether this layout holds every KV head of the model."""
        return self.total_kv_heads is None

    def partition_str(self) -> str:
        return f"heads [{self.heads.start}, {self.heads.stop}) of {self.model_kv_heads}"

    def with_heads(self, start: int, count: int) -> KVLayout:
        """The same geometry holding heads ``[start, start + count)`` of the model's."""
        return replace(self, kv_head_start=start, num_kv_heads=count, total_kv_heads=self.model_kv_heads)

    def whole(self) -> KVLayout:
        """The same geometry holding every KV head (what a TP worker exchanges with others)."""
        return self.with_heads(0, self.model_kv_heads)

    def tp_shard(self, rank: int, world_size: int) -> KVLayout:
        """Rank ``rank`` of ``world_size``'s slice of this (whole) layout: contiguous heads, as
        engine/models/tensor_parallel.plan_shard splits them. ValueError if N does not divide."""
        if not self.is_whole:
            raise ValueError(f"tp_shard of a partial layout ({self.partition_str()})")
        if self.model_kv_heads % world_size:
            raise ValueError(f"tensor_parallel={world_size} does not divide {self.model_kv_heads} KV heads")
        n = self.model_kv_heads // world_size
        return self.with_heads(rank * n, n)

    def check_compatible(self, other: KVLayout) -> None:
        """Raise KVLayoutMismatch naming each field where ``other`` differs from self (strict:
        the head partitions must be equal too; ``reconcile`` is the resharding check)."""
        diffs = _diffs({**self._geometry(), **self._partition()}, {**other._geometry(), **other._partition()})
        if not diffs:
            return
        hint = ""
        if self.reconcilable(other):
            hint = (
                f"; only the head partition differs ({self.partition_str()} vs {other.partition_str()}): "
                "pages are resharded at a tensor-parallel worker's edge, not by this check"
            )
        raise KVLayoutMismatch("KV layout mismatch (" + "; ".join(diffs) + ")" + hint)

    def reconcilable(self, other: KVLayout) -> bool:
        """Whether the two layouts differ at most in their head partition (same model geometry)."""
        return self._geometry() == other._geometry()

    def reconcile(self, other: KVLayout) -> range:
        """The model's KV heads both layouts hold (never empty). Raises KVLayoutMismatch naming
        every differing field other than the partition (dtype, block_size, num_layers, head_dim,
        total_kv_heads), or the two partitions when they share no head."""
        diffs = _diffs(self._geometry(), other._geometry())
        if diffs:
            raise KVLayoutMismatch(
                "KV layout mismatch beyond the head partition, no resharding can reconcile it ("
                + "; ".join(diffs)
                + ")"
            )
        shared = range(max(self.heads.start, other.heads.start), min(self.heads.stop, other.heads.stop))
        if not shared:
            raise KVLayoutMismatch(
                f"KV head partitions share no head ({self.partition_str()} vs {other.partition_str()})"
            )
        return shared

    def _geometry(self) -> dict[str, object]:
        """What two slices of one model's pages share (the model's total KV heads included)."""
        return {
            "dtype": self.dtype,
            "block_size": self.block_size,
            "num_layers": self.num_layers,
            "head_dim": self.head_dim,
            "total_kv_heads": self.model_kv_heads,
        }

    def _partition(self) -> dict[str, object]:
        return {"num_kv_heads": self.num_kv_heads, "kv_head_start": self.kv_head_start}

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> KVLayout:
        return KVLayout(**d)


def _diffs(ours: dict[str, object], theirs: dict[str, object]) -> list[str]:
    return [f"{k}: {v!r} != {theirs[k]!r}" for k, v in ours.items() if theirs[k] != v]
