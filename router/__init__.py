"""The ingress: OpenAI-compatible HTTP API, Python handle API and tier selection."""
