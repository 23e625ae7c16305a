"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

Per step it builds input_ids/positions/slot_mapping [T] and AttentionMetadata once; every
layer reuses them. Only rows of requests with ``sample=True`` reach the lm_head.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionMetadata
from engine.models.llama import DecoderLM, LayerHook
from engine.request import TokenLogprobs
from engine.sampler import sample
from engine.scheduler.output import SchedulerOutput


class StepInputs:
    """Flattened tensors of one step (T tokens over B requests)."""

    def __init__(self, out: SchedulerOutput, block_size: int, device: torch.device):
        ids, pos, slots, qsl, seq_lens, rows = [], [], [], [0], [], []
        max_blocks = max(len(s.block_ids) for s in out.scheduled)
        table = torch.zeros((len(out.scheduled), max_blocks), dtype=torch.long)
        for i, s in enumerate(out.scheduled):
            ids.extend(s.token_ids)
            p = range(s.start_pos, s.start_pos + s.num_tokens)
            pos.extend(p)
            slots.extend(s.block_ids[x // block_size] * block_size + x % block_size for x in p)
            qsl.append(qsl[-1] + s.num_tokens)
            seq_lens.append(s.start_pos + s.num_tokens)
            table[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.long)
            if s.sample:
                rows.append(qsl[-1] - 1)
        self.input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.positions = torch.tensor(pos, dtype=torch.long, device=device)
        self.meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=table,
        )
        self.sample_rows = torch.tensor(rows, dtype=torch.long, device=device)


class ModelRunner:
    def __init__(self, model: DecoderLM, block_size: int, device: str | torch.device):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, layer_hook: LayerHook | None = None
    ) -> tuple[dict[str, list[int]], dict[str, TokenLogprobs]]:
        """Run one step; returns sampled tokens and logprobs keyed by request id."""
        inputs = StepInputs(out, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, layer_hook)
        sampling = [s for s in out.scheduled if s.sample]
        if not sampling:
            return {}, {}
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        tokens, lps = sample(logits, [s.params for s in sampling], [s.num_output_tokens for s in sampling])
        sampled = {s.request_id: [t] for s, t in zip(sampling, tokens, strict=True)}
        logprobs = {s.request_id: lp for s, lp in zip(sampling, lps, strict=True) if lp is not None}
        return sampled, logprobs
