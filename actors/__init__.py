"""Model tiers: the vLLM engine wrapper, typed generate/chunk messages and the tier deployment."""
