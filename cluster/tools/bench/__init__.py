"""``splitserve bench``: a load generator for the gRPC and OpenAI-compatible frontends.

workloads (what to send) -> arrivals (when) -> clients (send, timestamp every token) ->
metrics (TTFT / TPOT / ITL / E2E, SLO goodput; ``vllm bench serve``'s field names) ->
runner (warm-up, rate sweep) -> command (CLI, summary table, result JSON) / plots (PNG).
"""
