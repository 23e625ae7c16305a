"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

Per step it builds input_ids/positions/slot_mapping [T] and AttentionMetadata once; every
layer reuses them. Only rows of requests with ``sample=True`` reach the lm_head: ``execute`` samples their last
row; ``score`` (speculative steps) returns the logits of their last k + 1 rows unsampled.
"""

from __future__ import annotations

import itertools
from types import ModuleType

import torch

from engine import native
from engine.attention.backend import AttentionMetadata
from engine.config import KernelConfig
from engine.models.greedy_head import GreedyHead
from engine.models.layers import NativeKernels, stream_rows
from engine.models.llama import DecoderLM, LayerHook
from engine.request import TokenLogprobs
from engine.sampler import plain_greedy, sample
from engine.scheduler.output import SchedulerOutput


class StepInputs:
    """Flattened tensors of one step (T tokens over B requests), built without per-token Python.

    Per-sequence values go through Python lists once; everything per token (positions,
    cache slots) is computed with a handful of vectorised tensor ops.
    """

    def __init__(self, out: SchedulerOutput, block_size: int, device: torch.device):
        sched = out.scheduled
        lens = [s.num_tokens for s in sched]
        starts = [s.start_pos for s in sched]
        qsl = [0, *itertools.accumulate(lens)]
        max_blocks = max(len(s.block_ids) for s in sched)
        # block_tables: [B, max_blocks] int64, rows padded with block 0
        table = torch.tensor([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in sched], dtype=torch.long)
        if qsl[-1] == len(sched):  # decode-only step: one token per sequence
            seq_idx = torch.arange(len(sched))
            positions = torch.tensor(starts, dtype=torch.long)
        else:
            # token t of sequence i has position starts[i] + (t - qsl[i])
            seq_idx = torch.repeat_interleave(torch.arange(len(sched)), torch.tensor(lens))
            shift = torch.tensor([st - q for st, q in zip(starts, qsl[:-1], strict=True)], dtype=torch.long)
            positions = torch.arange(qsl[-1]) + shift[seq_idx]
        slots = table[seq_idx, positions // block_size] * block_size + positions % block_size
        self.input_ids = torch.tensor(list(itertools.chain.from_iterable(s.token_ids for s in sched)), device=device)
        self.positions = positions.to(device)
        self.meta = AttentionMetadata(
            slot_mapping=slots.to(device),
            query_start_loc=qsl,
            seq_lens=[st + n for st, n in zip(starts, lens, strict=True)],
            block_tables=table,
            request_ids=[s.request_id for s in sched],
        )
        rows = [qsl[i + 1] - 1 for i, s in enumerate(sched) if s.sample]
        self.sample_rows = torch.tensor(rows, dtype=torch.long, device=device)


def native_kernels_for(model: DecoderLM, device: torch.device, config: KernelConfig) -> NativeKernels | None:
    """The native kernels ``model`` should run with under ``config`` (None: torch ops).

    ``config.native`` None takes them where they apply (CPU, a covered model, the kernels
    built: a failed build has logged its warning); True raises where they do not.
    """
    if config.native is False:
        return None
    why = None
    if device.type != "cpu":
        why = f"the model is on {device}, not the CPU"
    elif model.parallel is not None:
        why = "the model is a tensor-parallel shard (the native path does not reduce across ranks)"
    elif not model.native_capable:
        why = f"{model.cfg.architecture} has MoE or q/k-norm layers, which the native path does not cover"
    module = None if why else native.load()
    if module is None:
        if config.native:
            raise RuntimeError(
                f"KernelConfig.native=True but {why or 'the native kernels failed to build (see the log)'}"
            )
        return None
    return _kernels(module, config)


def _kernels(module: ModuleType, config: KernelConfig) -> NativeKernels:
    return NativeKernels(module, stream_rows(module, config.stream_linear_max_rows))


def head_kernels(device: torch.device, config: KernelConfig) -> NativeKernels | None:
    """The native kernels for the greedy head of a model that does not run them itself (MoE,
    q/k-norm layers): CPU, ``config.native`` not False and the kernels built; else None."""
    if config.native is False or device.type != "cpu":
        return None
    module = native.load()
    return None if module is None else _kernels(module, config)


class ModelRunner:
    def __init__(
        self, model: DecoderLM, block_size: int, device: str | torch.device, kernels: KernelConfig | None = None
    ):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        kernels = kernels or KernelConfig()
        model.set_native_kernels(native_kernels_for(model, self.device, kernels))
        # plain-greedy steps take their tokens from a bf16-screened head (engine/models/greedy_head.py);
        # built before prepack_linears, which may replace an untied head by its packed form (no
        # native layers): the greedy head keeps the plain one for its float32 refinement
        self.greedy_head = (
            GreedyHead.build(
                model.plain_head_weight(),
                model.native or head_kernels(self.device, kernels),
                restore_openmp=model.native is None,
            )
            if kernels.greedy_head and model.parallel is None
            else None
        )
        if kernels.prepack_linear and self.device.type == "cpu":
            model.prepack_linears()  # the weights are loaded (and TP-sharded) by now
        # a TP rank's plain-greedy steps gather (max, id) pairs, not logits (same switch)
        self.greedy_tp = kernels.greedy_head and model.parallel is not None

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, layer_hook: LayerHook | None = None, kv_hook: LayerHook | None = None
    ) -> tuple[dict[str, list[int]], dict[str, TokenLogprobs]]:
        """Run one step; returns sampled tokens and logprobs keyed by request id. The hooks:
        DecoderLM.forward's."""
        inputs = StepInputs(out, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, layer_hook, kv_hook)
        sampling = [s for s in out.scheduled if s.sample]
        if not sampling:
            return {}, {}
        params = [s.params for s in sampling]
        greedy = plain_greedy(params)
        rows = hidden[inputs.sample_rows]  # [N, hidden]: the sampled rows
        tokens = None
        if greedy and self.greedy_head is not None:
            tokens = self.greedy_head.tokens(rows)  # None: take the full logits
        elif greedy and self.greedy_tp:  # every rank alike: params and config are the same
            tokens = self.model.parallel_greedy_tokens(rows)
        if tokens is not None:
            lps: list[TokenLogprobs | None] = [None] * len(params)
        else:
            logits = self.model.compute_logits(rows)
            if greedy and self.model.native is not None:
                # the native argmax (torch.argmax's tie rule) runs without an OpenMP region, whose
                # spinning worker thread slows the rest of a small step on a busy machine
                tokens, lps = self.model.native.argmax(logits).tolist(), [None] * len(params)
            else:
                tp = self.model.parallel  # TP: unseeded draws are rank 0's on every rank
                agree = None if tp is None else tp.agree_tokens
                tokens, lps = sample(logits, params, [s.num_output_tokens for s in sampling], agree)
        sampled = {s.request_id: [t] for s, t in zip(sampling, tokens, strict=True)}
        logprobs = {s.request_id: lp for s, lp in zip(sampling, lps, strict=True) if lp is not None}
        return sampled, logprobs

    @torch.inference_mode()
    def score(self, out: SchedulerOutput, layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Run one speculative step without sampling: fp32 logits of the last
        ``num_draft_tokens + 1`` rows of every ``sample`` entry, in scheduled order
        ([sum over them of (k_i + 1), V]); the verifier (engine/spec/verify.py) picks the tokens."""
        inputs = StepInputs(out, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, layer_hook)
        ends = inputs.meta.query_start_loc[1:]
        rows = [
            r
            for s, end in zip(out.scheduled, ends, strict=True)
            if s.sample
            for r in range(end - 1 - s.num_draft_tokens, end)
        ]
        return self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long, device=self.device)])
