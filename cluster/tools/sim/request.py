"""SimRequest: one simulated request's state and timestamps (no tokens, only counts)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class SimRequest:
    """One request's simulated state and timestamps (seconds of simulated time)."""

    __slots__ = (
        "idx",
        "arrival",
        "prompt",
        "output",
        "generated",  # tokens sampled so far (the first by the prefill)
        "target",  # tokens to compute in the current prefill phase (prompt + generated)
        "computed",  # tokens with KV on the instance it currently runs on
        "blocks",  # blocks held for it on that instance (not counting decode growth)
        "reserved",  # blocks reserved for its KV on its decode instance (SPLIT)
        "prefill_inst",
        "decode_inst",
        "reason",
        "t_route",
        "t_prefill_start",  # start of its first prefill step
        "last_chunk",  # tokens of its last prefill chunk (layer-wise transfer tail)
        "t_first",
        "t_second",
        "t_last",  # time of its latest token (gap of a recomputed token)
        "t_done",
        "t_prefilled",
        "t_reserved",
        "transfer_s",  # KV hand-over: prefill end -> KV at the decode instance
        "cancelled",
        # decoding bookkeeping
        "dec_start",  # step index of its first decode step
        "comp0",  # computed tokens when it started decoding
        "phase",
        "gen",  # bumped on preemption: finish-heap entries of an older gen are stale
        "pending_join",  # joined, decodes from the next step start
        "decoding",  # in the decode set of its instance
        "preemptions",
    )

    def __init__(self, idx: int, arrival: float, prompt: int, output: int):
        self.idx, self.arrival, self.prompt, self.output = idx, arrival, prompt, output
        self.generated = 0
        self.target = prompt
        self.computed = 0
        self.blocks = 0
        self.reserved = 0
        self.prefill_inst = -1
        self.decode_inst = -1
        self.reason = ""
        self.t_route = self.t_prefill_start = -1.0
        self.last_chunk = 0
        self.t_first = self.t_second = self.t_last = self.t_done = -1.0
        self.t_prefilled = self.t_reserved = -1.0
        self.transfer_s = 0.0
        self.cancelled = False
        self.dec_start = self.comp0 = self.phase = 0
        self.gen = 0
        self.pending_join = False
        self.decoding = False
        self.preemptions = 0
