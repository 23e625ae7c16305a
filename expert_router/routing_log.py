"""Routing log: the top-k experts every MoE layer chose for every token of a calibration set.

Placement (s-EG, expert_router/seg.py) and the ExpertFlow path predictor
(expert_router/expertflow.py) are fitted on it; without a log, placement is contiguous and
prediction is off. ``splitserve route-log`` (cluster/tools/route_log.py) writes one.

File format: a NumPy ``.npz`` archive (``numpy.load(path)``) with

    format       str    "splitserve-routing-log/1"
    model        str    the model path it was recorded from
    num_experts  int    routed experts per MoE layer (E)
    top_k        int    experts per token (k)
    layers       [L]    int64, the MoE layer indices, ascending (dense layers are absent)
    ids          [N, L, k]  int16, token n's top-k expert ids at MoE layer layers[l], in the
                        router's top-k order (descending routing weight)
    seq_offsets  [S + 1]    int64, sequence s is tokens [seq_offsets[s], seq_offsets[s + 1]),
                        in position order: its prompt, then the tokens it generated (all but
                        the last, which no forward consumed)
    token_ids    [N]    int32, OPTIONAL: token n's vocabulary id (what its forward consumed);
                        written by ``record_routing`` since the router's s-TS prior
                        (expert_router/token_prior.py) needs it; logs without it still load
                        (``token_ids`` None) and serve placement and ExpertFlow as before

Recording runs one sequence at a time through an EngineCore (no prefix cache, greedy), so
every forward's tokens belong to that sequence, in order.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.models.moe import LocalExpertDispatcher
from expert_router.placement import moe_layers

FORMAT = "splitserve-routing-log/1"


@dataclass(frozen=True)
class RoutingLog:
    model: str
    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    ids: np.ndarray  # [N, L, k] int16
    seq_offsets: np.ndarray  # [S + 1] int64
    token_ids: np.ndarray | None = None  # [N] int32, each token's vocabulary id; None: not recorded

    def __post_init__(self) -> None:
        n, nl, k = self.ids.shape
        if self.token_ids is not None and self.token_ids.shape != (n,):
            raise ValueError(f"RoutingLog.token_ids has shape {self.token_ids.shape}, want [{n}]")
        if nl != len(self.layers) or k != self.top_k:
            raise ValueError(f"RoutingLog.ids has shape {self.ids.shape}, want [N, {len(self.layers)}, {self.top_k}]")
        if self.seq_offsets[0] != 0 or self.seq_offsets[-1] != n or np.any(np.diff(self.seq_offsets) < 0):
            raise ValueError(f"RoutingLog.seq_offsets must rise from 0 to {n}, got {self.seq_offsets.tolist()[:8]}...")
        if n and (self.ids.min() < 0 or self.ids.max() >= self.num_experts):
            raise ValueError(f"RoutingLog.ids must lie in [0, {self.num_experts})")

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def layer_ids(self, layer: int) -> np.ndarray:
        """[N, k] top-k ids of every token at MoE layer ``layer`` (a model layer index)."""
        return self.ids[:, self.layers.index(layer)]

    def sequences(self) -> list[np.ndarray]:
        """Per sequence, its [n, L, k] slice."""
        o = self.seq_offsets
        return [self.ids[o[s] : o[s + 1]] for s in range(self.num_sequences)]

    def save(self, path: str) -> None:
        """Writes ``path`` (numpy appends .npz when it is missing, so give it)."""
        tmp = path + ".tmp.npz"
        np.savez(
            tmp,
            format=np.array(FORMAT),
            model=np.array(self.model),
            num_experts=np.array(self.num_experts),
            top_k=np.array(self.top_k),
            layers=np.array(self.layers, dtype=np.int64),
            ids=self.ids.astype(np.int16),
            seq_offsets=self.seq_offsets.astype(np.int64),
            **({} if self.token_ids is None else {"token_ids": self.token_ids.astype(np.int32)}),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | bytes) -> RoutingLog:
        """From a file, or from the file's bytes (what the controller hands EP workers)."""
        source = io.BytesIO(path) if isinstance(path, bytes) else path
        path = "<routing log bytes>" if isinstance(path, bytes) else path
        with np.load(source) as z:
            fmt = str(z["format"]) if "format" in z else None
            if fmt != FORMAT:
                raise ValueError(f"{path}: not a routing log (format {fmt!r}, want {FORMAT!r})")
            return cls(
                model=str(z["model"]),
                num_experts=int(z["num_experts"]),
                top_k=int(z["top_k"]),
                layers=tuple(int(x) for x in z["layers"]),
                ids=z["ids"].astype(np.int16),
                seq_offsets=z["seq_offsets"].astype(np.int64),
                token_ids=z["token_ids"].astype(np.int32) if "token_ids" in z else None,
            )


class RecordingDispatcher:
    """The local dispatcher that also keeps every forward's top-k ids per layer (an
    ExpertDispatcher: the model runs exactly as with local experts)."""

    def __init__(self) -> None:
        self.inner = LocalExpertDispatcher()
        self.seen: dict[int, list[torch.Tensor]] = {}  # layer -> [T_forward, k] per forward

    def held_experts(self, layer: int, num_experts: int) -> Sequence[int]:
        return self.inner.held_experts(layer, num_experts)

    def register(self, layer: int, experts: nn.Module) -> None:
        self.inner.register(layer, experts)

    def dispatch(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        self.seen.setdefault(layer, []).append(topk_ids.detach().to("cpu", torch.int16))
        return self.inner.dispatch(layer, hidden, topk_weights, topk_ids)

    def take(self, layers: Sequence[int]) -> np.ndarray:
        """The ids recorded since the last take -> [n, L, k]; clears them."""
        per_layer = [torch.cat(self.seen.pop(layer, [])) for layer in layers]
        if len({t.shape[0] for t in per_layer}) != 1:
            raise RuntimeError(f"layers recorded different token counts: {[t.shape[0] for t in per_layer]}")
        return torch.stack(per_layer, dim=1).numpy()


def record_routing(
    model_path: str, prompts: Sequence[Sequence[int]], max_tokens: int = 1, dtype: str = "float32"
) -> RoutingLog:
    """Run each prompt (token ids) alone, greedy, ``max_tokens`` new tokens, and log its routing."""
    from engine.engine import EngineCore
    from engine.llm import build_engine_config
    from engine.request import Request, SamplingParams

    config = build_engine_config(model_path, dtype=dtype, enable_prefix_caching=False, attention_backend="sdpa")
    mc = config.model
    layers = moe_layers(mc)
    assert mc.moe is not None
    recorder = RecordingDispatcher()
    engine = EngineCore(config, dispatcher=recorder)
    chunks, offsets, tokens = [], [0], []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        request = Request(f"route-log-{i}", list(prompt), params)
        engine.add_request(request)
        while engine.has_work():
            engine.step()
        ids = recorder.take(layers)
        consumed = request.all_token_ids[: ids.shape[0]]  # the last output token fed no forward
        if len(consumed) != ids.shape[0]:
            raise RuntimeError(f"prompt {i}: {ids.shape[0]} routed tokens but {len(consumed)} token ids")
        tokens += consumed
        chunks.append(ids)
        offsets.append(offsets[-1] + ids.shape[0])
    k = mc.moe.top_k
    all_ids = np.concatenate(chunks) if chunks else np.zeros((0, len(layers), k), np.int16)
    return RoutingLog(
        model_path,
        mc.moe.num_experts,
        k,
        tuple(layers),
        all_ids,
        np.array(offsets, np.int64),
        token_ids=np.array(tokens, np.int32),
    )
