"""PCA reduction: numbers against the covariance eigendecomposition, save/load without pickle, typed errors."""
from __future__ import annotations

import numpy as np
import pytest

from imgembed.jobs.pca import PCA, PCAError


@pytest.fixture(scope="module")
def data():
    """300 points in 16-D lying near a 3-D subspace (variances 9, 4, 1) plus noise 0.01."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T
    latent = rng.normal(size=(300, 3)) * [3.0, 2.0, 1.0]
    return latent @ basis + 0.01 * rng.normal(size=(300, 16)) + 5.0, basis


def test_fit_matches_the_covariance_eigendecomposition(data):
    x, basis = data
    pca = PCA.fit(x, 3)
    evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
    np.testing.assert_allclose(pca.explained_variance, evals[::-1][:3], rtol=1e-9)
    np.testing.assert_allclose(np.abs(pca.components @ evecs[:, ::-1][:, :3]), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-12)
    assert pca.explained_variance_ratio.sum() > 0.9999
    np.testing.assert_allclose(pca.explained_variance, [9, 4, 1], rtol=0.25)  # the generating variances
    np.testing.assert_allclose(np.linalg.norm(pca.components @ basis.T, axis=1), 1.0, atol=1e-5)  # in the subspace


def test_transform_inverse_and_normalize(data):
    x, _ = data
    pca = PCA.fit(x, 3)
    y = pca.transform(x)
    assert y.shape == (300, 3) and y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-4)
    assert np.abs(pca.inverse_transform(y) - x).max() < 0.1  # the noise is all that is lost
    np.testing.assert_allclose(np.linalg.norm(pca.transform(x, normalize=True), axis=1), 1, atol=1e-6)


def test_save_load_round_trip_without_pickle(data, tmp_path):
    x, _ = data
    pca = PCA.fit(x, 2)
    path = pca.save(tmp_path / "pca.npz")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["components", "explained_variance", "explained_variance_ratio", "mean"]
    again = PCA.load(path)
    np.testing.assert_array_equal(again.transform(x), pca.transform(x))
    np.savez(tmp_path / "evil.npz", mean=np.array([object()], dtype=object), components=np.zeros((1, 1)),
             explained_variance=np.zeros(1), explained_variance_ratio=np.zeros(1))
    with pytest.raises(PCAError, match="evil.npz: not a saved PCA"):
        PCA.load(tmp_path / "evil.npz")


def test_bad_inputs_are_typed_errors(data):
    x, _ = data
    with pytest.raises(PCAError, match=r"n_components=17; expected 1\.\.16"):
        PCA.fit(x, 17)
    with pytest.raises(PCAError, match=r"finite \(N, D\) array with N >= 2, got shape \(1, 16\)"):
        PCA.fit(x[:1], 1)
    with pytest.raises(PCAError, match=r"got shape \(2, 5\), expected \(N, 16\)"):
        PCA.fit(x, 2).transform(np.zeros((2, 5)))
