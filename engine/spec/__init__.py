"""Speculative decoding: proposers, verification, and the SmartSpec speculation-length policy.

EngineCore runs it when ``EngineConfig.speculative`` is set (``LLM(model,
speculative_config={...})``): each step the Speculator proposes drafts for the decoding
requests, the scheduler schedules 1 + k tokens for each, the model runner scores the k + 1
rows, the verifier emits 1..k+1 tokens, and the scheduler rolls the rejected drafts' KV
slots back. Colocated only so far: the workers, the router and the protos do not pass a
speculative config or feed cluster pressure yet.

    config.py       SpeculativeConfig (defined in engine/config.py; vLLM's speculative_config
                    keys), draft compatibility
    proposer.py     the Proposer protocol: ProposalInput -> Proposal, on_accepted, release
    ngram.py        prompt-lookup n-gram proposer
    paged_model.py  a model with its own paged KV cache, driven sequence by sequence
    draft.py        draft-model proposer (own paged KV, rollback, prompt KV, page handoff)
    verify.py       greedy verification and distribution-preserving rejection sampling
    smartspec.py    per-request speculation length by goodput (SmartSpec), and fixed k
    speculator.py   the engine step's side: propose -> (schedule, score) -> verify ->
                    end_step; SpecStats
    offline.py      a complete speculative generate loop over PagedModel (reference,
                    acceptance measurement)
"""
