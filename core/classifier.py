"""A logistic regression on a sentence embedding and named cheap features, and its cache.

The router's complexity scorer and the injection guard each train one (on their own labelled set
and their own features); both keep it in a cache directory keyed by the training data and the
embedder, so that replicas load in milliseconds what the first one trained in seconds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from tierserve.core.embedder import Embedder


def dataset_bytes(path: Path | None, bundled: str = "complexity/prompts.jsonl") -> bytes:
    """The bytes of a labelled dataset: `path`, or for None the file bundled in
    `tierserve.configs` at `bundled`."""
    if path is None:
        return resources.files("tierserve.configs").joinpath(*bundled.split("/")).read_bytes()
    return Path(path).read_bytes()


def _feature_matrix(features: list[dict[str, float]], names: tuple[str, ...]) -> np.ndarray:
    return np.array([[f[name] for name in names] for f in features], dtype=np.float32).reshape(-1, len(names))


def embed_window(text: str, max_chars: int) -> str:
    """What gets embedded: all of a short prompt; of a long one, its start and its end, where
    the instruction and the question usually are (the cheap features see all of it)."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]} ... {text[-half:]}"


@dataclass(slots=True, eq=False)
class EmbeddingClassifier:
    """P(positive) = logistic(coef · [embedding, features] + intercept): a logistic regression on
    a sentence embedding concatenated with named cheap features. The complexity scorer and the
    injection guard (`tierserve.safety.injection`) each train one on their own features."""

    coef: np.ndarray
    """Shape (dimension + len(feature_names),): embedding weights, then one weight per feature."""
    intercept: float
    embedder: str
    """Signature of the embedder the coefficients were fitted on; another embedder's vectors mean nothing to them."""
    dimension: int
    dataset_sha256: str
    feature_names: tuple[str, ...]
    """The feature columns, in order, that `predict` reads from each feature dict."""
    features_version: int
    """Version of the feature formulas it was trained on; a cached classifier of another version is retrained."""

    @classmethod
    def fit_rows(
        cls,
        embeddings: np.ndarray,
        features: list[dict[str, float]],
        labels: list[bool],
        *,
        embedder: Embedder,
        feature_names: tuple[str, ...],
        features_version: int,
        dataset_sha256: str,
        C: float = 1.0,
    ) -> EmbeddingClassifier:
        """Logistic regression (balanced classes, L2 with strength 1/C) on embedded, featurised rows
        (an instance of `cls`)."""
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels, dtype=bool)
        if y.all() or not y.any():
            raise ValueError("training needs both positive and negative examples")
        x = np.hstack([embeddings, _feature_matrix(features, feature_names)])
        model = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(x, y)
        return cls(
            coef=model.coef_[0].astype(np.float64),
            intercept=float(model.intercept_[0]),
            embedder=embedder.signature,
            dimension=embedder.dimension,
            dataset_sha256=dataset_sha256,
            feature_names=tuple(feature_names),
            features_version=features_version,
        )

    def predict(self, embeddings: np.ndarray, features: list[dict[str, float]]) -> np.ndarray:
        """P(positive) for each row of `embeddings` (n, dimension) with its feature dict."""
        embeddings = np.asarray(embeddings, dtype=np.float64).reshape(-1, self.dimension)
        if len(embeddings) != len(features):
            raise ValueError(f"{len(embeddings)} embeddings but {len(features)} feature dicts")
        x = np.hstack([embeddings, _feature_matrix(features, self.feature_names)])
        return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))

    def save(self, path: Path) -> None:
        """Plain arrays in a `.npz` (no pickle); `path` may also be an open binary file."""
        np.savez(
            path,
            coef=self.coef,
            intercept=np.float64(self.intercept),
            feature_names=np.array(self.feature_names),
            features_version=np.int64(self.features_version),
            embedder=np.array(self.embedder),
            dimension=np.int64(self.dimension),
            dataset_sha256=np.array(self.dataset_sha256),
        )

    @classmethod
    def load(cls, path: Path) -> EmbeddingClassifier:
        """What `save` wrote, as an instance of `cls`."""
        with np.load(path, allow_pickle=False) as f:
            classifier = cls(
                coef=f["coef"].astype(np.float64),
                intercept=float(f["intercept"]),
                embedder=str(f["embedder"]),
                dimension=int(f["dimension"]),
                dataset_sha256=str(f["dataset_sha256"]),
                feature_names=tuple(str(n) for n in f["feature_names"]),
                features_version=int(f["features_version"]),
            )
        if classifier.coef.shape != (classifier.dimension + len(classifier.feature_names),):
            raise ValueError(f"{path}: coef has shape {classifier.coef.shape}, not dimension + features")
        return classifier

    def has_features(self, names: tuple[str, ...], version: int) -> bool:
        """Whether it was trained on these feature columns, computed by this version of their formulas."""
        return self.feature_names == tuple(names) and self.features_version == version

    def check_embedder(self, embedder: Embedder | None, what: str) -> None:
        """Raise unless `embedder` is the one the coefficients were fitted on; `what` names the classifier."""
        if embedder is None:
            raise ValueError(f"a {what} classifier needs the embedder it was trained with")
        if (embedder.signature, embedder.dimension) != (self.embedder, self.dimension):
            raise ValueError(
                f"the {what} classifier was trained on embedder {self.embedder!r} "
                f"({self.dimension} dimensions), not {embedder.signature!r} ({embedder.dimension})"
            )


def cache_path(cache_dir: Path, prefix: str, data: bytes, signature: str) -> Path:
    """`cache_dir/{prefix}-{key}.npz`, the key a hash of a classifier's training data and of the
    signature of what it depends on (embedder, window)."""
    return Path(cache_dir) / f"{prefix}-{hashlib.sha256(data + signature.encode()).hexdigest()[:12]}.npz"


def cached_classifier(
    path: Path | None,
    fit: Callable[[], EmbeddingClassifier],
    feature_names: tuple[str, ...],
    features_version: int,
    cls: type[EmbeddingClassifier] = EmbeddingClassifier,
) -> EmbeddingClassifier:
    """The classifier saved at `path` if it was trained on these features, else `fit()`'s,
    saved there (None: fitted and not saved)."""
    classifier = cls.load(path) if path is not None and path.exists() else None
    if classifier is not None and classifier.has_features(feature_names, features_version):
        return classifier
    classifier = fit()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so that a concurrent reader (another replica) never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as tmp:
            classifier.save(tmp)
        os.replace(tmp.name, path)
    return classifier
