"""The API document's example request (shared/seed), used by several tests verbatim."""

DOC_REQUEST = {
    "model": "llama-3.1-8b",
    "input": "Summarize inference routing in two sentences.",
    "max_output_tokens": 256,
    "performance_profile": "balanced",
    "routing_strategy": "lowest_cost",
    "customer_ref": "order-9921",
    "max_price_usd": 0.02,
    "max_latency_ms": 800,
    "metadata": {"env": "staging"},
}
