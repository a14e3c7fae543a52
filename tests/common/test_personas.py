import numpy as np
import pytest

from common.personas import (FeatureSpace, Onboarding, cold_start_persona, elbow, embed_profiles, embedding_sse,
                             initial_slot, nearest, slot_sums, update_centroids)


def _federated_kmeans(points: np.ndarray, k: int, iters: int, seed: int = 0):
    """Lloyd iterations where the 'server' only ever sees summed slots, as in the ServerApp."""
    slots = [initial_slot(i, k, seed) for i in range(len(points))]
    centroids = None
    for _ in range(iters):
        contributions = [slot_sums(p, s, k) for p, s in zip(points, slots)]
        sums = sum(c[0] for c in contributions)
        counts = sum(c[1] for c in contributions)
        centroids = update_centroids(sums, counts, centroids)
        slots = [nearest(p, centroids) for p in points]
    return centroids, slots


def test_federated_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 6.0]])
    truth = np.repeat(np.arange(3), 20)
    points = (centres[truth] + rng.normal(0, 0.5, (60, 2))).astype(np.float32)
    _, slots = _federated_kmeans(points, 3, iters=8)
    # Same partition up to relabelling.
    for c in range(3):
        assert len(set(np.array(slots)[truth == c])) == 1
    assert len(set(slots)) == 3


def test_summed_device_inertia_finds_the_true_number_of_clusters_at_the_elbow():
    rng = np.random.default_rng(1)
    centres = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 6.0]])
    points = (centres[np.repeat(np.arange(3), 30)] + rng.normal(0, 0.5, (90, 2))).astype(np.float32)
    inertia = {}
    for k in (1, 2, 3, 5, 8):
        centroids, _ = _federated_kmeans(points, k, iters=10)
        # What the coordinator receives: the sum of the devices' K-slot squared distances.
        total = sum(embedding_sse(p, centroids, nearest(p, centroids)) for p in points)
        inertia[k] = float(total.sum())
        direct = ((points[:, None] - centroids[None]) ** 2).sum(-1).min(1).sum()
        assert np.isclose(inertia[k], direct, rtol=1e-4)
    assert elbow(inertia) == 3


def test_elbow_rule_needs_three_candidates_and_handles_a_flat_curve():
    assert elbow({1: 100.0, 2: 40.0, 4: 35.0, 8: 30.0}) == 2
    assert elbow({1: 5.0, 2: 5.0, 4: 5.0}) == 1
    import pytest

    with pytest.raises(ValueError, match="three"):
        elbow({1: 1.0, 2: 0.5})


def test_empty_slot_keeps_previous_centroid():
    sums, counts = np.array([[2.0, 2.0], [0.0, 0.0]]), np.array([2.0, 0.0])
    prev = np.array([[9.0, 9.0], [7.0, 7.0]])
    np.testing.assert_allclose(update_centroids(sums, counts, prev), [[1.0, 1.0], [7.0, 7.0]])


def test_initial_slot_is_stable_and_spread():
    slots = [initial_slot(i, 4, seed=1) for i in range(400)]
    assert slots == [initial_slot(i, 4, seed=1) for i in range(400)]
    assert min(np.bincount(slots, minlength=4)) > 60


def test_profile_embeddings_put_similar_profiles_together():
    e = embed_profiles(["Favourite genres: Horror, Thriller.", "Favourite genres: Horror, Mystery.",
                        "Favourite genres: Romance, Musical."])
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_cold_start_follows_the_aggregated_onboarding_counts():
    space = FeatureSpace(occupations=("student", "retired"), genres=("Action", "Drama"))
    young = [Onboarding(20, "M", "student", ("Action",)) for _ in range(30)]
    old = [Onboarding(60, "F", "retired", ("Drama",)) for _ in range(30)]
    counts = np.stack([sum(space.encode(o) for o in young), sum(space.encode(o) for o in old)])
    sizes = np.array([30.0, 30.0])
    assert cold_start_persona(space.encode(Onboarding(22, "M", "student", ("Action",))), counts, sizes, space) == 0
    assert cold_start_persona(space.encode(Onboarding(65, "F", "retired")), counts, sizes, space) == 1
    assert cold_start_persona(space.encode(Onboarding(40, "X", "pilot", ("Drama",))), counts, sizes, space) == 1


def test_genre_deviation_points_at_the_users_taste_and_stays_in_the_unit_ball():
    import pandas as pd

    from common.personas import GENRE_SCALE, GENRE_SHRINK, genre_deviation

    items = pd.DataFrame({"genres": [("Action",), ("Action", "Drama"), ("Comedy",), ("Drama",)]},
                         index=pd.Index([1, 2, 3, 4], name="item"))
    genres = ("Action", "Comedy", "Drama", "Horror")
    train = pd.DataFrame({"item": [1, 2, 3, 4], "rating": [5.0, 5.0, 1.0, 3.0]})  # own mean 3.5
    x = genre_deviation(train, items, genres)
    assert x.shape == (4,) and x.dtype == np.float32
    assert x[0] > 0 > x[1] and x[3] == 0.0  # loves Action, dislikes Comedy, never saw Horror
    assert x[0] == pytest.approx(GENRE_SCALE * (1.5 + 1.5) / (2 + GENRE_SHRINK))
    assert np.linalg.norm(genre_deviation(train.assign(rating=[5.0, 5.0, 1.0, 1.0]) .iloc[[0, 2] * 20], items,
                                          genres)) == pytest.approx(1.0)  # clipped: a contribution stays bounded
    assert not genre_deviation(train.iloc[:0], items, genres).any()  # no ratings: no direction
