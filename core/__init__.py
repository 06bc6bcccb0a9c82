"""The shared kernel: what every layer above may use and which imports none of them.

Errors that carry an OpenAI status and `param` (`errors`), the Serve deployment options every
deployment's config embeds and the cache directory (`config`), the chat message type that crosses
from the ingress to the tiers and into retrieval prompts (`types`), the telemetry bootstrap and
primitives (`telemetry`), the one observer of a token stream's life and its outcomes
(`streams`), and the sentence embedder and embedding classifier that routing, retrieval
and the injection guard all use (`embedder`, `classifier`).
"""
