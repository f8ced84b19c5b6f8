"""Frechet distance against closed forms, and the feature network on held-out digits (no stack needed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from pipeline.sample.quality import (
    FeatureNetConfig,
    frechet_distance,
    frechet_distance_features,
    gaussian_stats,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fd_reference(mu1, s1, mu2, s2) -> float:
    """Independent formula: tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), symmetric roots by eigh."""
    r = _sqrt_psd(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _sqrt_psd(r @ s2 @ r)))


def _random_cov(rng, d, rank=None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def test_identical_distributions_give_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=8), _random_cov(rng, 8)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    f = rng.normal(size=(500, 16))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-7)


def test_one_dimension():
    # N(m1, sd1^2) vs N(m2, sd2^2): (m1 - m2)^2 + (sd1 - sd2)^2.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_commuting_covariances_closed_form():
    # Same eigenvectors: FD = |mu1 - mu2|^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2.
    rng = np.random.default_rng(1)
    d = 6
    q = ortho_group.rvs(d, random_state=2)
    l1, l2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_general_covariances_match_the_symmetric_formula_and_are_symmetric():
    rng = np.random.default_rng(3)
    for d in (2, 10, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        fd = frechet_distance(mu1, s1, mu2, s2)
        assert fd == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-7)
        assert fd == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-7)
        # A shift of both means changes nothing.
        assert fd == pytest.approx(frechet_distance(mu1 + 5, s1, mu2 + 5, s2), rel=1e-9)


def test_singular_covariances_stay_finite_and_real():
    # Fewer samples than dimensions (and dead features): rank-deficient covariances.
    rng = np.random.default_rng(4)
    d = 32
    s1, s2 = _random_cov(rng, d, rank=5), _random_cov(rng, d, rank=7)
    s1[:, 0] = s1[0, :] = 0.0
    s2[:, 0] = s2[0, :] = 0.0
    fd = frechet_distance(np.zeros(d), s1, np.zeros(d), s2)
    assert np.isfinite(fd) and fd >= 0
    assert fd == pytest.approx(_fd_reference(np.zeros(d), s1, np.zeros(d), s2), rel=1e-4, abs=1e-6)


def test_sample_estimate_converges_to_the_gaussian_value():
    rng = np.random.default_rng(5)
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -1.0, 0.5])
    s1, s2 = np.diag([1.0, 2.0, 0.5, 1.0]), np.diag([2.0, 2.0, 0.5, 0.25])
    exact = frechet_distance(mu1, s1, mu2, s2)
    a = rng.multivariate_normal(mu1, s1, size=200_000)
    b = rng.multivariate_normal(mu2, s2, size=200_000)
    assert frechet_distance_features(a, b) == pytest.approx(exact, rel=0.02)
    mu, cov = gaussian_stats(a)
    np.testing.assert_allclose(cov, s1, atol=0.03)


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.zeros((1, 4)))


# ------------------------------------------------------------------------------------------------
# The feature network


@pytest.fixture(scope="module")
def digits_split():
    """The digits as the data layer writes them (uint8, 0..255), split 80/20 stratified and seeded."""
    from pipeline.data.sources import digits_source, split_items

    train, evals = split_items(digits_source().items, 0.2, seed=0)

    def arrays(items):
        return np.stack([np.asarray(it.load())[..., None] for it in items]), np.array([it.label for it in items])

    return arrays(train), arrays(evals)


@pytest.fixture(scope="module")
def feature_net(digits_split):
    (xt, yt), (xe, ye) = digits_split
    return train_feature_net(xt, yt, FeatureNetConfig(8, 1, 10), name="digitcnn", eval_images=xe, eval_labels=ye)


def test_feature_net_classifies_held_out_digits(feature_net, digits_split):
    # Measured 0.986-0.997 on the 359 held-out digits; 0.95 leaves room for other CPUs' rounding.
    assert feature_net.info["eval_accuracy"] >= 0.95, feature_net.info
    assert feature_net.info["eval_images"] == len(digits_split[1][0])


def test_feature_space_separates_real_from_fake(feature_net, digits_split):
    (xt, _), (xe, _) = digits_split
    f_eval = feature_net.features(xe)
    assert f_eval.shape == (len(xe), feature_net.config.feature_dim)
    rng = np.random.default_rng(0)
    real = frechet_distance_features(f_eval, feature_net.features(xt[rng.choice(len(xt), len(xe), replace=False)]))
    noise = rng.integers(0, 256, size=xe.shape, dtype=np.uint8)
    shuffled = xe.reshape(len(xe), -1)[:, rng.permutation(64)].reshape(xe.shape)  # same pixels, no digits
    fake_noise = frechet_distance_features(f_eval, feature_net.features(noise))
    fake_shuffled = frechet_distance_features(f_eval, feature_net.features(shuffled))
    assert real < 0.2 * fake_shuffled and real < 0.2 * fake_noise, (real, fake_shuffled, fake_noise)


def test_feature_net_is_seeded_and_round_trips(feature_net, digits_split):
    (xt, yt), (xe, _) = digits_split
    again = train_feature_net(xt[:300], yt[:300], FeatureNetConfig(8, 1, 10, epochs=2))
    same = train_feature_net(xt[:300], yt[:300], FeatureNetConfig(8, 1, 10, epochs=2))
    np.testing.assert_array_equal(again.features(xe[:50]), same.features(xe[:50]))
    loaded = load_feature_net(save_feature_net(feature_net), url="mem://x")
    np.testing.assert_array_equal(loaded.features(xe), feature_net.features(xe))
    assert loaded.info["eval_accuracy"] == feature_net.info["eval_accuracy"]


def test_single_class_cannot_train_a_feature_net():
    x = np.zeros((10, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_feature_net(x, np.zeros(10, int), FeatureNetConfig(8, 1, 1, epochs=1))
