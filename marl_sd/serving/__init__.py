"""Real speculative serving: verifier servers, drafting clients, emulated links, metrics."""
