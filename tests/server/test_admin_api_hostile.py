"""Property-based hostile inputs against the admin API on a real uvicorn over a real SQLite file.

Every path, query and body field gets generated hostile values (integers beyond 64 bits, NaN/Infinity/1e999, wrong
types, non-UTF-8 bytes, lone surrogates, missing or wrong tokens). Asserted for each request: no 5xx, a status the
operation documents in the served OpenAPI, the 4xx docs/coordinator.md promises, and an unchanged registry (every
row of every table) after a rejected request.
"""

import json
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.admin_api import create_app
from server.registry import metadata
from server.rollouts import Rollouts
from tests.server.test_admin_api import TOKENS, LiveServer, _arrays, _registry, _tokens

SETTINGS = settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

GET_PATHS = ["/personas/{x}", "/personas/{x}/evaluations", "/versions/{x}", "/versions/{x}/manifest", "/versions/{x}/download"]
POST_PATHS = ["/personas/{x}/canary", "/personas/{x}/promote", "/personas/{x}/rollback", "/personas/{x}/pause",
              "/personas/{x}/resume", "/personas/{x}/stable"]
SCOPE = {"/personas/{x}/stable": "root"}  # the admin scope; the other POSTs need rollout, the GETs read


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    registry = _registry(tmp_path_factory.mktemp("hostile"))
    rollouts = Rollouts(registry)
    for persona in (0, 1):
        v0 = registry.add_version(persona, 0, _arrays(0.0), 0)
        rollouts.make_stable(persona, v0, "test")
        candidate = registry.add_version(persona, 1, _arrays(1.0), 3, parent=v0)
    rollouts.start_canary(1, candidate, 30, "test")  # persona 1 mid-rollout, persona 0 not
    server = LiveServer(create_app(registry, _tokens()))
    client = httpx.Client(base_url=server.url, timeout=30)  # keep-alive: most of a test's time is connecting
    spec = client.get("/openapi.json").json()
    yield client, registry, spec
    client.close()
    server.stop()


def snapshot(registry) -> dict:
    with registry.engine.connect() as conn:
        return {t.name: conn.execute(sa.select(t)).all() for t in metadata.sorted_tables}


def documented(spec, method: str, template: str) -> set[int]:
    path = template.replace("{x}", "{persona}" if template.startswith("/personas") else "{version}")
    return {int(code) for code in spec["paths"][path][method.lower()]["responses"]}


big_ints = st.one_of(st.integers(min_value=2**63 - 2, max_value=2**300), st.integers(max_value=-(2**31)),
                     st.integers(min_value=2**31, max_value=2**63 + 2))
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e309"]
# Text that is never an integer: no digit in it, nor a path separator or dot segment that would change the route.
digitless = st.text(st.characters(categories=["L", "P", "S", "Zs"]), min_size=1, max_size=20).filter(
    lambda s: "/" not in s and s.strip(".") != "")
not_an_id = st.one_of(big_ints.map(str), st.sampled_from(NON_FINITE + ["nan", "inf", "-inf"]),
                      st.floats().filter(lambda f: not f.is_integer()).map(repr), digitless)


@SETTINGS
@given(template=st.sampled_from(GET_PATHS + POST_PATHS), value=not_an_id)
def test_hostile_path_values(api, template, value):
    client, registry, spec = api
    before = snapshot(registry)
    method = "POST" if template in POST_PATHS else "GET"
    r = client.request(method, template.replace("{x}", quote(value, safe="")),
                      headers={"Authorization": f"Bearer {TOKENS[SCOPE.get(template, 'operator')]}"},
                      json={"version": 1, "percent": 5} if template.endswith("canary") else {})
    assert r.status_code == 422, (value, r.status_code, r.text)
    assert 422 in documented(spec, method, template)
    assert snapshot(registry) == before


@SETTINGS
@given(path=st.sampled_from(["/personas", "/versions", "/events"]),
       field=st.sampled_from(["limit", "offset", "persona"]), value=not_an_id)
def test_hostile_query_values(api, path, field, value):
    client, _, spec = api
    if path == "/personas" and field == "persona":  # /personas has no persona filter (an unknown query is ignored)
        field = "offset"
    r = client.get(path, params={field: value}, headers={"Authorization": f"Bearer {TOKENS['root']}"})
    assert r.status_code == 422, (field, value, r.status_code, r.text)
    assert 422 in documented(spec, "GET", path)


def raw(text: str):
    """A JSON fragment sent as it is (json.dumps would write NaN or refuse a lone surrogate)."""
    return ("raw", text)


def _encode(value) -> str:
    return value[1] if isinstance(value, tuple) else json.dumps(value)


_always_invalid = st.one_of(
    big_ints, st.sampled_from(NON_FINITE).map(raw), st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from([raw('"\\ud800"'), raw('"x\\udfff"'), raw("1" * 5000), raw("-" + "9" * 4400)]))
HOSTILE = {  # per field, values that field must refuse (a JSON string is a valid reason, a numeric one a wrong type)
    "reason": st.one_of(_always_invalid, st.text(min_size=1001, max_size=1100), st.integers()),
    # 2.0 is an integer to JSON Schema (and so accepted), 2.5 is not; "2" and true are not either.
    "version": st.one_of(_always_invalid, st.text(max_size=8),
                         st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())),
    "percent": st.one_of(_always_invalid, st.text(max_size=8), st.floats(max_value=0, allow_nan=False,
                                                                         allow_infinity=False),
                         st.floats(min_value=100, exclude_min=True, allow_infinity=False)),
}
VALID = {"version": 2, "percent": 10, "reason": "x"}
FIELDS = {"/personas/{x}/canary": ["version", "percent", "reason"], "/personas/{x}/stable": ["version", "reason"]}


@st.composite
def hostile_bodies(draw):
    template = draw(st.sampled_from(POST_PATHS))
    fields = FIELDS.get(template, ["reason"])
    bad = draw(st.sampled_from(fields))
    body = {k: VALID[k] for k in fields if k != bad and draw(st.booleans())}
    body[bad] = draw(HOSTILE[bad])
    keys = draw(st.permutations(list(body)))
    return template, "{" + ", ".join(f"{json.dumps(k)}: {_encode(body[k])}" for k in keys) + "}"


@SETTINGS
@given(request=hostile_bodies(), persona=st.sampled_from(["0", "1"]))
def test_hostile_body_values(api, request, persona):
    """Bodies where one field holds a value it must refuse (the others valid or absent): always 422, no change."""
    client, registry, spec = api
    template, body = request
    before = snapshot(registry)
    r = client.post(template.replace("{x}", persona), content=body.encode("utf-8", "surrogatepass"),
                   headers={"Authorization": f"Bearer {TOKENS[SCOPE.get(template, 'operator')]}",
                            "Content-Type": "application/json"})
    assert r.status_code == 422, (body[:200], r.status_code, r.text)
    assert all(set(issue) == {"loc", "msg", "type"} for issue in r.json()["detail"])  # no value echoed back
    assert snapshot(registry) == before


@SETTINGS
@given(template=st.sampled_from(POST_PATHS), body=st.binary(min_size=1, max_size=64))
def test_non_utf8_bodies_are_422(api, template, body):
    client, registry, _ = api
    try:
        body.decode("utf-8")
        body = b"\xff" + body  # 0xff never occurs in UTF-8
    except UnicodeDecodeError:
        pass
    before = snapshot(registry)
    r = client.post(template.replace("{x}", "0"), content=body,
                   headers={"Authorization": f"Bearer {TOKENS[SCOPE.get(template, 'operator')]}",
                            "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert snapshot(registry) == before


tokens = st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
                   st.just(TOKENS["reader"]))


@SETTINGS
@given(template=st.sampled_from(GET_PATHS + POST_PATHS + ["/personas", "/versions", "/events"]), token=tokens,
       scheme=st.sampled_from(["Bearer", "bearer", "Basic", ""]),
       body=st.one_of(st.binary(max_size=64), st.just(b'{"version": 1e999, "percent": NaN}')),
       value=st.one_of(st.sampled_from(["0", "1", "2"]), not_an_id.map(lambda v: quote(v, safe=""))))
def test_missing_wrong_or_weak_tokens_are_401_or_403_whatever_the_request(api, template, token, scheme, body, value):
    """Authentication comes first: the path, query and body are not looked at without the right token."""
    client, registry, spec = api
    before = snapshot(registry)
    method = "POST" if template in POST_PATHS else "GET"
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}".strip()
    r = client.request(method, template.replace("{x}", value), content=body, headers=headers)
    reader = token == TOKENS["reader"] and scheme.lower() == "bearer"
    if not reader:
        assert r.status_code == 401, r.text
    elif method == "POST":  # the read scope is too weak for these (it may read /events, the audit trail)
        assert r.status_code == 403, r.text
    else:
        assert r.status_code in documented(spec, method, template) - {401, 403}, r.text
    assert snapshot(registry) == before
