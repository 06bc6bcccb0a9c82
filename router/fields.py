"""Field types the request models share (`router/protocol.py`, `router/tools.py`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ConfigDict, Field

INT32_MAX = 2**31 - 1
"""Bound of the integer fields vLLM keeps in 32 bits (token ids, counts); `seed` takes 64."""


def _encodable(text: str) -> str:
    """JSON may carry lone UTF-16 surrogates (`"\\ud800"`) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an unpaired UTF-16 surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
"""A string from the caller: valid Unicode that encodes as UTF-8."""
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Bias = Annotated[float, Field(ge=-100, le=100)]
"""A `logit_bias` value: added to the token's logit before sampling (-100 bans it, 100 all but forces it)."""

REQUEST_CONFIG = ConfigDict(extra="ignore", allow_inf_nan=False)
"""Unknown fields are ignored (as OpenAI-compatible servers do); `1e999` and NaN are refused."""
