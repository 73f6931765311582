"""PCA reduction of embeddings: fit with numpy's SVD, save/load as a plain ``.npz`` (no pickle), apply.

    pca = PCA.fit(vectors, n_components=128)          # vectors: (N, D) float
    pca.save("pca-128.npz")
    small = PCA.load("pca-128.npz").transform(vectors, normalize=True)   # (N, 128) float32, unit length

The file holds ``mean`` (D,), ``components`` (K, D; rows are unit principal axes, sign-normalised so the
largest-magnitude entry of each is positive), ``explained_variance`` (K,) and ``explained_variance_ratio``
(K,), all float64, and is read back with ``allow_pickle=False``. ``transform`` centres and projects;
``normalize=True`` re-normalises the reduced vectors for cosine search (CLIP-style embeddings are unit length).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgembed.errors import ImgembedError

_KEYS = ("mean", "components", "explained_variance", "explained_variance_ratio")


class PCAError(ImgembedError, ValueError):
    """Bad input to fit/transform, or a file that is not a saved PCA."""


@dataclass(frozen=True)
class PCA:
    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, n_components: int) -> "PCA":
        """Principal axes of ``vectors`` (N, D) from the SVD of the centred data (float64)."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2 or not np.all(np.isfinite(x)):
            raise PCAError(f"PCA.fit needs a finite (N, D) array with N >= 2, got shape {x.shape}")
        limit = min(x.shape)
        if not 1 <= n_components <= limit:
            raise PCAError(f"n_components={n_components}; expected 1..{limit} (min of N={x.shape[0]}, D={x.shape[1]})")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s ** 2 / (x.shape[0] - 1)
        comps = vt[:n_components]
        signs = np.sign(comps[np.arange(n_components), np.argmax(np.abs(comps), axis=1)])
        comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
        total = var.sum()
        ratio = var[:n_components] / total if total > 0 else np.zeros(n_components)
        return cls(mean, comps, var[:n_components], ratio)

    def transform(self, vectors: np.ndarray, *, normalize: bool = False) -> np.ndarray:
        """Project (N, D) vectors onto the components: float32 (N, K); ``normalize`` -> unit rows."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise PCAError(f"PCA.transform: got shape {x.shape}, expected (N, {self.dim})")
        y = (x - self.mean) @ self.components.T
        if normalize:
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y.astype(np.float32)

    def inverse_transform(self, reduced: np.ndarray) -> np.ndarray:
        """Back to the original space (the reconstruction from K components): float32 (N, D)."""
        y = np.asarray(reduced, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != self.n_components:
            raise PCAError(f"PCA.inverse_transform: got shape {y.shape}, expected (N, {self.n_components})")
        return (y @ self.components + self.mean).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write the four arrays to ``path`` (.npz, no pickled objects)."""
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(f, **{k: np.asarray(getattr(self, k), np.float64) for k in _KEYS})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PCA":
        """Read a file written by :meth:`save` (``allow_pickle=False``); checks keys and shapes."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in _KEYS}
        except (OSError, ValueError, KeyError) as e:
            raise PCAError(f"{path}: not a saved PCA (.npz with {list(_KEYS)}): {type(e).__name__}: {e}") from None
        k, d = arrays["components"].shape if arrays["components"].ndim == 2 else (0, 0)
        if arrays["mean"].shape != (d,) or arrays["explained_variance"].shape != (k,) or k == 0:
            raise PCAError(f"{path}: inconsistent PCA arrays (components {arrays['components'].shape}, "
                           f"mean {arrays['mean'].shape}, explained_variance {arrays['explained_variance'].shape})")
        return cls(**arrays)
