"""Speculative decoding: proposers, verification, and the SmartSpec speculation-length policy.

Self-contained components with typed interfaces; the engine step does not use them yet (the
scheduler, model runner, workers, router and protos integrate them in a later change).

    config.py       SpeculativeConfig (vLLM's speculative_config keys), draft compatibility
    proposer.py     the Proposer protocol: ProposalInput -> Proposal, on_accepted, release
    ngram.py        prompt-lookup n-gram proposer
    paged_model.py  a model with its own paged KV cache, driven sequence by sequence
    draft.py        draft-model proposer (own paged KV, rollback, prompt KV, page handoff)
    verify.py       greedy verification and distribution-preserving rejection sampling
    smartspec.py    per-request speculation length by goodput (SmartSpec), and fixed k
    offline.py      a complete speculative generate loop over PagedModel (reference,
                    acceptance measurement)
"""
