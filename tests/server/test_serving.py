"""Cold-start serving with the tiny model and two persona adapters, directly and through the live admin API."""

import json

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.adapters import adapter_arrays, add_lora
from common.config import LoraSettings
from common.data import load_movielens
from common.model import load_base_model
from common.personas import FeatureSpace, Onboarding, cold_start_persona
from server.admin_api import create_app
from server.auth import TokenStore
from server.registry import PersonaRegistry, RegistryError
from server.rollouts import Rollouts
from server.serving import ONBOARDING_FILE, ColdStartService, save_onboarding
from tests.conftest import make_data, write_grouplens_100k
from tests.server.test_admin_api import LiveServer

TOKEN = "s" * 24


def _adapter(seed: int) -> dict:
    model = add_lora(load_base_model("tiny")[0], LoraSettings())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter_arrays(model)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    data = load_movielens(str(write_grouplens_100k(root / "ml", *make_data(n_users=6, n_items=30, seed=5))))
    space = FeatureSpace.of(data)
    # Persona 0 is all women, persona 1 all men (onboarding one-hot counts per persona).
    features = np.zeros((2, space.size))
    gender = slice(space.groups()[1].start, space.groups()[1].stop)
    features[0, gender.start + 0] = 10  # GENDERS[0]
    features[1, gender.start + 1] = 10
    counts = np.array([10.0, 10.0])
    registry = PersonaRegistry(root / "coordinator", lora=LoraSettings(), base_model="tiny")
    save_onboarding(registry.root / ONBOARDING_FILE, space, features, counts)
    rollouts = Rollouts(registry)
    for persona in (0, 1):
        rollouts.make_stable(persona, registry.add_version(persona, 1, _adapter(persona), 5), "test")
    return registry, data, space, features, counts


def test_persona_assignment_matches_the_devices_rule(setup):
    registry, data, space, features, counts = setup
    service = ColdStartService(registry, "tiny", data.items)
    for o in (Onboarding(30, "F", "writer", ("Drama",)), Onboarding(50, "M", "engineer")):
        assert service.assign(o) == cold_start_persona(space.encode(o), features, counts, space)
    assert service.assign(Onboarding(30, "F", "writer")) != service.assign(Onboarding(30, "M", "writer"))


def test_two_personas_give_different_ratings_and_adapters_are_switched_and_evicted(setup):
    registry, data, *_ = setup
    service = ColdStartService(registry, "tiny", data.items, max_resident=1)
    v0, v1 = registry.rollout(0)["stable"], registry.rollout(1)["stable"]
    movies = list(data.items.index[:6])
    a, b, a_again = service.score([(v0, "profile", movies), (v1, "profile", movies), (v0, "profile", movies)])
    assert not np.allclose(a, b, atol=1e-4) and np.allclose(a, a_again, atol=1e-6)
    assert ((a >= 1) & (a <= 5)).all() and len(service.resident) == 1  # LRU kept one adapter resident


def test_cold_start_endpoints_on_a_live_server(setup):
    registry, data, *_ = setup
    service = ColdStartService(registry, "tiny", data.items)
    server = LiveServer(create_app(registry, TokenStore([("app", TOKEN, ["read"])]), serving=service))
    try:
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        woman = {"age": 30, "gender": "F", "occupation": "writer", "liked_genres": ["Drama"]}
        man = {**woman, "gender": "M"}
        assert client.post("/cold-start/assign", json=woman).json()["persona"] == 0
        movies = [int(m) for m in data.items.index[:5]]
        r = client.post("/cold-start/score", json={"requests": [
            {"device_id": "a", "onboarding": woman, "movies": movies},
            {"device_id": "b", "onboarding": man, "movies": movies}]})
        assert r.status_code == 200, r.text
        first, second = r.json()["results"]
        assert (first["persona"], second["persona"]) == (0, 1)
        assert first["version"] == registry.rollout(0)["stable"] and first["ratings"] != second["ratings"]
        bad = client.post("/cold-start/score", json={"requests": [
            {"device_id": "a", "onboarding": woman, "movies": [99999]}]})
        assert bad.status_code == 404 and "unknown movie" in bad.text
        assert client.post("/cold-start/assign", json={**woman, "age": 500}).status_code == 422
        assert httpx.post(server.url + "/cold-start/assign", json=woman).status_code == 401
    finally:
        server.stop()


NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]
_bad_number = st.one_of(st.integers(min_value=2**63, max_value=2**200).map(str), st.sampled_from(NON_FINITE),
                        st.integers(max_value=-(2**63)).map(str), st.just("1" * 5000))
HOSTILE_FIELDS = {  # JSON text a field must refuse
    "age": st.one_of(_bad_number, st.sampled_from(["0", "121", "2.5", '"x"', "null", "[]"])),
    "gender": st.one_of(_bad_number, st.sampled_from(['"' + "F" * 17 + '"', "5", "null", '"\\ud800"'])),
    "liked_genres": st.one_of(_bad_number, st.sampled_from(['"Drama"', json.dumps(["Drama"] * 11), "[1]"])),
    "movies": st.one_of(_bad_number, _bad_number.map(lambda n: f"[1, {n}]"), st.sampled_from(["[]", "[-1]",
                        json.dumps(list(range(501))), "[1.5]"])),
    "device_id": st.one_of(_bad_number, st.sampled_from(['""', '"' + "d" * 129 + '"', "7"])),
}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(sorted(HOSTILE_FIELDS)), data=st.data())
def test_hostile_cold_start_bodies_are_422(serving_client, field, data):
    """One field of an otherwise valid request holds a value it must refuse: 422, never a 5xx."""
    value = data.draw(HOSTILE_FIELDS[field])
    onboarding = {"age": "30", "gender": '"F"', "occupation": '"writer"', "liked_genres": '["Drama"]'}
    request = {"device_id": '"a"', "movies": "[1, 2]"}
    (onboarding if field in onboarding else request)[field] = value

    def obj(d):
        return "{" + ", ".join(f'"{k}": {v}' for k, v in d.items()) + "}"

    body = obj({**request, "onboarding": obj(onboarding)})
    for path, payload in (("/cold-start/score", '{"requests": [' + body + "]}"), ("/cold-start/assign", obj(onboarding))):
        if path.endswith("assign") and field not in onboarding:
            continue
        r = serving_client.post(path, content=payload.encode("utf-8", "surrogatepass"),
                                headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (path, payload[:200], r.status_code, r.text)


@pytest.fixture(scope="module")
def serving_client(setup):
    registry, data, *_ = setup
    server = LiveServer(create_app(registry, TokenStore([("app", TOKEN, ["read"])]),
                                   serving=ColdStartService(registry, "tiny", data.items)))
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client
    server.stop()


def test_versions_trained_against_the_released_statistics_are_served_against_them(tmp_path):
    """A version's manifest says what it was trained against; cold start quotes the statistics in each movie's
    prompt and, for a residual version, adds the item-bias model's prior (no user bias: sign-up answers only)."""
    from common.item_stats import ItemStats, predict as bias_predict
    from common.prompt import PromptBuilder, item_stats_text, movie_text
    from common.scoring import RatingHead, predict_with_prefix
    from common.item_factors import ItemFactors, predict as mf_predict, zero_user
    from server.serving import ITEM_FACTORS_FILE, ITEM_STATS_FILE

    data = load_movielens(str(write_grouplens_100k(tmp_path / "ml", *make_data(n_users=6, n_items=30, seed=5))))
    space = FeatureSpace.of(data)
    kinds = {"plain": {}, "quoted": {"item_stats": True},
             "residual": {"item_stats": True, "residual_to_bias": True},
             "mf": {"item_stats": True, "residual_to_bias": True, "item_factors": True}}
    adapter, versions = _adapter(0), {}
    for kind, serving in kinds.items():
        registry = PersonaRegistry(tmp_path / kind, lora=LoraSettings(), base_model="tiny", serving=serving)
        save_onboarding(registry.root / ONBOARDING_FILE, space, np.ones((1, space.size)), np.array([1.0]))
        versions[kind] = registry, registry.add_version(0, 1, adapter, 5)
        assert registry.version(versions[kind][1])["manifest"]["serving"]["item_stats"] == bool(serving)
    movies = [int(m) for m in data.items.index[:5]]
    # without the release on disk a version that needs it is a documented 409, not a wrong rating
    registry, version = versions["quoted"]
    with pytest.raises(RegistryError, match=ITEM_STATS_FILE) as refused:
        ColdStartService(registry, "tiny", data.items).score([(version, "profile", movies)])
    assert refused.value.status == 409
    rng = np.random.default_rng(0)
    stats = ItemStats(rng.uniform(1.5, 4.8, 30), rng.integers(1, 40, 30).astype(float), 3.3)
    factors = ItemFactors(3.6, rng.normal(0, 0.8, 30), rng.normal(0, 0.5, (30, 4)), centre=rng.normal(0, 0.4, 5))
    served = {}
    for kind, (registry, version) in versions.items():
        np.savez(registry.root / ITEM_STATS_FILE, **stats.to_arrays())
        if kind == "mf":  # without the released factors on disk, an MF-residual version is refused the same way
            with pytest.raises(RegistryError, match=ITEM_FACTORS_FILE) as refused:
                ColdStartService(registry, "tiny", data.items).score([(version, "profile", movies)])
            assert refused.value.status == 409
            np.savez(registry.root / ITEM_FACTORS_FILE, **factors.to_arrays(), reg=np.array([0.2]))
        served[kind] = ColdStartService(registry, "tiny", data.items).score([(version, "profile", movies)])[0]
    # the reference: the same adapter scored directly with the prompt and prior each kind was trained with
    model_, tok = _model_with(adapter)
    builder, head = PromptBuilder(tok), RatingHead(tok)
    frame = stats.frame()
    quoted = [builder.suffix_ids(f"{movie_text(data.items.loc[m])}\n{item_stats_text(m, frame)}") for m in movies]
    plain = [builder.suffix_ids(movie_text(data.items.loc[m])) for m in movies]
    prefix = builder.prefix_ids("profile")
    np.testing.assert_allclose(served["plain"], predict_with_prefix(model_, head, prefix, plain), atol=1e-5)
    np.testing.assert_allclose(served["quoted"], predict_with_prefix(model_, head, prefix, quoted), atol=1e-5)
    np.testing.assert_allclose(served["residual"], predict_with_prefix(
        model_, head, prefix, quoted, base=bias_predict(0.0, np.array(movies), stats)), atol=1e-5)
    # an MF-residual version: a new user has no user factors of their own, so MF's item half with the released
    # population centre (the mean user half) is the base
    factors = ItemFactors.from_arrays(factors.to_arrays())  # as served: float32 on disk
    np.testing.assert_allclose(served["mf"], predict_with_prefix(
        model_, head, prefix, quoted, base=mf_predict(zero_user(factors), np.array(movies), factors)), atol=1e-5)
    from dataclasses import replace
    assert not np.allclose(served["mf"], predict_with_prefix(model_, head, prefix, quoted, base=mf_predict(
        zero_user(replace(factors, centre=None)), np.array(movies), factors)), atol=1e-4)
    assert not np.allclose(served["quoted"], served["plain"], atol=1e-4)
    assert not np.allclose(served["residual"], served["quoted"], atol=1e-4)
    assert not np.allclose(served["mf"], served["residual"], atol=1e-4)
    # with a blend weight recorded for the version (`serve-blend`), the persona adapter is served blended with the
    # same base: b + w (adapter - b); a version with none recorded keeps the adapter alone
    from common import blend
    from server.rollouts import Rollouts

    for kind, base in (("residual", bias_predict(0.0, np.array(movies), stats)),
                       ("mf", mf_predict(zero_user(factors), np.array(movies), factors)),
                       ("quoted", bias_predict(0.0, np.array(movies), stats))):
        registry, version = versions[kind]
        sums = {"persona_rd": 0.6, "persona_dd": 2.0, "personal_rd": 3.0, "personal_dd": 2.0}  # w 0.3 and 1
        Rollouts(registry).record_evaluation(version, 10.0, 8.0, 10.0, 5, sums)
        assert registry.blend_weights(version) == pytest.approx({"persona": 0.3, "personal": 1.0})
        blended = ColdStartService(registry, "tiny", data.items).score([(version, "profile", movies)])[0]
        np.testing.assert_allclose(blended, base + 0.3 * (served[kind] - base), atol=1e-5)
        assert blend.weight(0.6, 2.0) == pytest.approx(0.3)
        served[f"{kind} blended"] = blended
    # a newer version of the persona never evaluated itself (most, with eval-every > 1) is served at its nearest
    # evaluated version's weight, as devices are (`PersonaRegistry.serving_weights`)
    registry, version = versions["mf"]
    newer = registry.add_version(0, 2, adapter, 5, parent=version)
    assert registry.blend_weights(newer) is None
    np.testing.assert_allclose(ColdStartService(registry, "tiny", data.items).score([(newer, "profile", movies)])[0],
                               served["mf blended"], atol=1e-5)
    registry, version = versions["plain"]  # trained without the statistics: no base to blend with, the adapter alone
    Rollouts(registry).record_evaluation(version, 10.0, 8.0, 10.0, 5, {"persona_rd": 0.0, "persona_dd": 1.0,
                                                                       "personal_rd": 0.0, "personal_dd": 1.0})
    np.testing.assert_allclose(ColdStartService(registry, "tiny", data.items).score([(version, "profile", movies)])[0],
                               served["plain"], atol=1e-6)


def _model_with(arrays: dict):
    from common.adapters import load_adapter_arrays

    model, tok = load_base_model("tiny")
    model = add_lora(model, LoraSettings())
    load_adapter_arrays(model, arrays)
    return model.eval(), tok
