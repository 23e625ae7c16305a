"""DraftProposer: a small model sharing the target's vocabulary proposes k tokens greedily
(or, for temperature > 0 requests, by sampling its own distribution q).

It lives in the target's process with its OWN paged KV (a PagedModel: PagedKVCache +
BlockPool, no prefix sharing) and never touches the target's. Per request it keeps the ids
whose draft K/V are computed (``PagedModel.tokens``) and ``confirmed``, how many of those are
real tokens (prompt + accepted output) rather than its own last drafts.

One ``propose`` for a request whose input has n tokens T[0..n), asking k tokens:

    sync        roll the draft KV back to the longest prefix that agrees with T (only its
                speculative tail can disagree; ``on_accepted`` normally did this already)
    catch up    round 0 feeds T[c..n) (c = tokens already in the draft KV; normally one or
                two tokens: the last accepted token and the target's bonus/correction; a
                whole prompt when nothing was prefilled here) -> d_1 from the last row
    draft       rounds 1..k-1 feed d_r -> d_{r+1}; requests with smaller k drop out
    after       the draft KV holds T + d_1..d_{k-1} (d_k's K/V are never needed unless
                accepted, and then the next round-0 feeds it); ``confirmed`` = n

``on_accepted(id, m)`` keeps T + d_1..d_min(m, k-1) and frees pages past them, so rejected
drafts leave no K/V and no blocks behind, across block boundaries included.
``release(id)`` frees the request's pages (finish, abort, preemption).

Greedy requests take the draft's argmax (``Proposal.probs`` None: q is one-hot, which
rejection sampling handles exactly). Sampled requests draw d_j from q_j = the draft's
distribution under the request's temperature/top-k/top-p (engine/spec/verify.py's
``sampling_probs``) with the request's seed on ``DRAFT_STREAM``, and return q rows [k, V]:
q must be the distribution the token was *drawn* from, so a soft q with argmax proposals would
bias the output and is never returned.

When the draft's pool cannot hold a request's n + k - 1 positions the request gets an empty
proposal this step (counted in ``stats.blocked``); the target then decodes it normally. The
integration counts draft blocks in admission (``usage()``, ``blocks_needed``) so that this is
rare.

Disaggregated prompts (the prefill worker's side): ``prefill(inputs)`` computes the draft K/V
of every input token. The chosen handoff ships those pages with the target's: the prefill
worker computes the draft prompt KV right after the target's (same process, ~N_draft/N_target
of the target's prompt FLOPs), and the KV transfer carries a second (KVLayout, pages) pair;
the decode worker ``reserve``s draft blocks beside the target's, the transport writes the
pages (or ``import_kv`` copies them), and ``commit`` records their tokens. For a self-draft
(the target's first N layers) the layout equals the target's except ``num_layers``, so a
transport can even send the draft's pages as N extra layers. Why not recompute the draft
prompt on the decode worker: that is a prompt prefill inside the decode batch, the very
interference disaggregation removes. Shipping costs bytes instead, in the same proportion
(a self-draft of N of L layers adds N/L to the target's KV bytes; the layers' compute it
saves is in that proportion too), on a link that already carries the target's pages and that
the decode worker does not wait on while it decodes other requests. The recompute path still exists as the fallback that needs no code: a
request whose draft KV did not arrive (a prefill pool without the draft, a failed draft
transfer) is caught up by its first ``propose`` (round 0 computes whatever prefix is missing);
``stats.catch_up_tokens`` makes that cost visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from engine.config import KernelConfig, ModelConfig
from engine.kv_cache.block_pool import NoFreeBlocks
from engine.kv_cache.layout import KVLayout
from engine.models.gguf import resolve_model_path
from engine.spec.config import check_draft_compatible
from engine.spec.paged_model import BackendFactory, PagedModel
from engine.spec.proposer import EMPTY_PROPOSAL, Proposal, ProposalInput
from engine.spec.verify import DRAFT_STREAM, is_greedy, sampling_probs, token_generator


@dataclass(frozen=True)
class DraftKV:
    """A request's draft prompt KV in flight between workers.

    pages: [layout.num_layers, ceil(len(token_ids) / block_size), 2, block_size, Hkv, D];
    page i holds the K/V of token_ids[i*bs : (i+1)*bs] (the tail of the last page is junk)."""

    layout: KVLayout
    token_ids: list[int]
    pages: torch.Tensor


@dataclass(frozen=True)
class DraftKVUsage:
    """The draft's KV pool, for admission and GetServerInfo (a second pool beside the target's)."""

    total_blocks: int
    free_blocks: int
    block_size: int
    page_bytes: int  # one page of all draft layers: layout.page_bytes * num_layers


@dataclass
class DraftStats:
    """Cumulative counters since start."""

    proposed_tokens: int = 0  # draft tokens returned
    forward_rounds: int = 0  # sequential draft forwards (catch-up + drafting)
    catch_up_tokens: int = 0  # tokens computed beyond the one a step normally feeds
    blocked: int = 0  # proposals skipped because the draft pool was full


class DraftProposer:
    name = "draft_model"

    def __init__(self, paged: PagedModel):
        self.paged = paged
        self.vocab_size = paged.config.vocab_size
        self._confirmed: dict[str, int] = {}  # request id -> leading real tokens in the draft KV
        self.stats = DraftStats()

    @staticmethod
    def load(
        draft_path: str,
        target: ModelConfig,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        dtype: str = "float32",
        device: str = "cpu",
        target_path: str | None = None,
        backend_factory: BackendFactory | None = None,
        kernels: KernelConfig | None = None,
        progress: bool = False,
    ) -> DraftProposer:
        """Load the draft checkpoint after checking it against the target (vocabulary, and
        the tokenizer when ``target_path`` is given). ``num_blocks`` pages of draft KV."""
        path = resolve_model_path(draft_path, progress=progress)
        check_draft_compatible(target, ModelConfig.from_hf_dir(path), target_path, path)
        paged = PagedModel.load(
            path, max_model_len, num_blocks, block_size, dtype, device, backend_factory, kernels, progress
        )
        return DraftProposer(paged)

    # ------------------------------------------------------------ reports
    @property
    def layout(self) -> KVLayout:
        return self.paged.layout

    def usage(self) -> DraftKVUsage:
        p = self.paged
        return DraftKVUsage(p.num_blocks, p.num_free_blocks, p.block_size, p.layout.page_bytes * p.layout.num_layers)

    def blocks_needed(self, num_tokens: int) -> int:
        """Draft blocks a request of ``num_tokens`` positions (context + K) holds at most."""
        return self.paged.blocks_needed(num_tokens)

    # ------------------------------------------------------------ proposer protocol
    def _sync(self, inp: ProposalInput, feed_one: bool) -> int:
        """Roll the request's draft KV back to its agreement with the input; returns how many
        input tokens it already holds (at most n - 1 with ``feed_one``: logits need a fed token)."""
        rid, ids = inp.request_id, inp.token_ids
        have = self.paged.tokens(rid)
        c = min(self._confirmed.get(rid, 0), len(have), len(ids))
        while c < len(have) and c < len(ids) and have[c] == ids[c]:
            c += 1
        if feed_one:
            c = min(c, len(ids) - 1)
        if c < len(have):
            self.paged.truncate(rid, c)
        return c

    def propose(self, requests: Sequence[ProposalInput], k: Mapping[str, int]) -> dict[str, Proposal]:
        out: dict[str, Proposal] = {inp.request_id: EMPTY_PROPOSAL for inp in requests}
        active: list[tuple[ProposalInput, int, list[int]]] = []  # (input, k, tokens to feed)
        for inp in requests:
            want = k.get(inp.request_id, 0)
            if want <= 0:
                continue
            c = self._sync(inp, feed_one=True)
            n = len(inp.token_ids)
            if not self.paged.grow(inp.request_id, n + want - 1):
                self.stats.blocked += 1
                continue
            self.stats.catch_up_tokens += n - c - 1
            active.append((inp, want, list(inp.token_ids[c:])))
        if not active:
            return out
        drafts: dict[str, list[int]] = {inp.request_id: [] for inp, _, _ in active}
        probs: dict[str, list[torch.Tensor]] = {inp.request_id: [] for inp, _, _ in active}
        feed = [(inp.request_id, new) for inp, _, new in active]
        for r in range(max(want for _, want, _ in active)):
            live = [(inp, want) for inp, want, _ in active if want > r]
            logits = self.paged.forward(feed)  # [len(live), V]
            self.stats.forward_rounds += 1
            for row, (inp, _) in enumerate(live):
                tok, q = self._pick(logits[row], inp, r)
                drafts[inp.request_id].append(tok)
                if q is not None:
                    probs[inp.request_id].append(q)
            feed = [(inp.request_id, [drafts[inp.request_id][-1]]) for inp, want in live if want > r + 1]
        for inp, _, _ in active:
            rid = inp.request_id
            self._confirmed[rid] = len(inp.token_ids)
            toks = drafts[rid]
            out[rid] = Proposal(toks, torch.stack(probs[rid]) if probs[rid] else None)
            self.stats.proposed_tokens += len(toks)
        return out

    def _pick(self, logits: torch.Tensor, inp: ProposalInput, r: int) -> tuple[int, torch.Tensor | None]:
        """logits: [V] of draft round r -> (token, q row [V] when sampled)."""
        if is_greedy(inp.params):
            return int(logits.argmax()), None
        q = sampling_probs(logits[None], [inp.params])[0]
        g = token_generator(inp.params, inp.num_output_tokens + r, logits.device, stream=DRAFT_STREAM)
        return int(torch.multinomial(q, 1, generator=g).item()), q

    def on_accepted(self, request_id: str, num_accepted: int) -> None:
        confirmed = self._confirmed.get(request_id)
        if confirmed is None:
            return
        keep = min(self.paged.num_computed(request_id), confirmed + num_accepted)
        self.paged.truncate(request_id, keep)
        self._confirmed[request_id] = keep

    def release(self, request_id: str) -> None:
        self.paged.release(request_id)
        self._confirmed.pop(request_id, None)

    # ------------------------------------------------------------ prompt side
    def prefill(self, requests: Sequence[ProposalInput]) -> None:
        """Compute the draft K/V of every token of each input (the prefill worker's draft
        prompt). Call again with a longer input to extend it (chunked prompts). Raises
        NoFreeBlocks when the pool cannot hold them (nothing is computed then)."""
        batch = []
        for inp in requests:
            c = self._sync(inp, feed_one=False)
            if c < len(inp.token_ids):
                batch.append((inp.request_id, list(inp.token_ids[c:])))
        need = {rid: self.paged.num_computed(rid) + len(new) for rid, new in batch}
        missing = sum(max(0, self.paged.blocks_needed(n) - len(self.paged.block_ids(rid))) for rid, n in need.items())
        if missing > self.paged.num_free_blocks:
            raise NoFreeBlocks(f"draft prompt KV needs {missing} more blocks, {self.paged.num_free_blocks} free")
        if batch:
            self.paged.forward(batch)
            self.stats.forward_rounds += 1
        for inp in requests:
            self._confirmed[inp.request_id] = len(inp.token_ids)

    def export_kv(self, request_id: str) -> DraftKV:
        """A copy of the request's draft K/V (after ``prefill``) to hand to a decode worker."""
        return DraftKV(self.layout, list(self.paged.tokens(request_id)), self.paged.read_pages(request_id))

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Decode side: draft blocks for ``num_tokens`` arriving tokens (None: no room now).
        A transport writes the pages straight into ``paged.cache`` at these blocks."""
        return self.paged.reserve(request_id, num_tokens)

    def commit(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Decode side: the reserved pages hold the K/V of ``token_ids``."""
        self.paged.commit(request_id, token_ids)
        self._confirmed[request_id] = len(token_ids)

    def import_kv(self, request_id: str, kv: DraftKV) -> bool:
        """Decode side: reserve + write the pages + commit. False when the pool has no room
        now (the request then catches up in its first propose). Raises KVLayoutMismatch when
        the sender's draft differs from this one."""
        self.layout.check_compatible(kv.layout)
        if self.reserve(request_id, len(kv.token_ids)) is None:
            return False
        self.paged.write_pages(request_id, kv.pages)
        self.commit(request_id, kv.token_ids)
        return True
