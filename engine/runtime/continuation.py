"""Continuing a request on a new worker after a failed placement (failover, Resume).

The router sends the tokens the request already emitted (``emitted``) with the prompt; the
new worker re-prefills prompt + emitted and generates from there. Shared by every worker kind
that accepts a continuation (prefill, decode, mixed)."""

from __future__ import annotations

from engine.request import Request, RequestStatus, TokenLogprobs


def replay_emitted(req: Request, emitted: tuple[int, ...]) -> None:
    """Give ``req`` the tokens a failed placement already generated, as the engine would have:
    appended to its output through ``Request.append_token`` (max_tokens, EOS, stop ids, stop
    strings and the context limit checked, the stop-string checker fed), with placeholder
    logprobs (never read: readers start past them). When they already end it (the end was
    generated but never delivered), ``req`` is finished with that reason."""
    for t in emitted:
        reason = req.append_token(t)
        if reason is not None:
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
            break
    if emitted and req.params.logprobs is not None:
        req.logprobs = [TokenLogprobs(t, 0.0) for t in req.output_token_ids]
