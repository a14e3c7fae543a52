"""The operator's web page (GET /dashboard) in a real headless Chromium against the admin API on a real uvicorn on
loopback, over the demo registry of `bench/dashboard_screenshot.py` (the one in the README's screenshot).

What the page shows is compared with what the registry holds, and its buttons are checked by their effect on the
registry: refused (and shown as an error, nothing changed) with a read token, carried out with a rollout token.
Skipped, saying why, without Debian's chromium and chromium-driver or without selenium.
"""

import pytest

from bench.dashboard_screenshot import chromium, demo_registry
from server.admin_api import create_app
from server.rollouts import Rollouts
from tests.server.test_admin_api import TOKENS, LiveServer, _tokens
from tests.server.test_admin_api_hostile import snapshot

selenium = pytest.importorskip("selenium", reason="selenium is not installed (it is in the test extras)")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HOSTILE_REASON = '<img src=x onerror="document.title=\'injected\'">'  # an operator-typed reason is text, not HTML


@pytest.fixture(scope="module")
def browser():
    try:
        driver = chromium()
    except RuntimeError as e:
        pytest.skip(f"no headless browser: {e}")
    yield driver
    driver.quit()


@pytest.fixture
def site(tmp_path, browser):
    """The demo registry (four personas: a canary running on persona 0, one promoted, one rolled back
    automatically, one paused), plus a hostile reason in persona 0's audit trail; the page open in the browser."""
    registry = demo_registry(tmp_path)
    rollouts = Rollouts(registry)
    rollouts.pause(0, "ops-mallory", HOSTILE_REASON)
    rollouts.pause(0, "ops-mallory", "", paused=False)
    server = LiveServer(create_app(registry, _tokens()))
    browser.get(server.url + "/dashboard")  # a new port each test: a new origin, so an empty sessionStorage
    yield browser, registry, rollouts
    server.stop()


def wait(driver, seconds: float = 30):
    # An upper bound for a condition, not a measurement: the page refreshes itself, so an element found just before
    # a refresh may be replaced; such a lookup is simply retried.
    return WebDriverWait(driver, seconds, ignored_exceptions=(StaleElementReferenceException,))


def rows(driver, table: str) -> list[dict]:
    """A table's rows as {data-field: text}."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} tbody tr`)].map(tr => Object.fromEntries("
        "[...tr.querySelectorAll('td[data-field]')].map(td => [td.dataset.field, td.textContent])))", table)


def use_token(driver, who: str) -> None:
    field = driver.find_element(By.ID, "token-input")
    field.clear()
    field.send_keys(TOKENS[who])
    driver.find_element(By.ID, "token-use").click()


def press(driver, action: str, persona: int, confirm: bool = True) -> None:
    def click(d):
        d.find_element(By.CSS_SELECTOR, f'button[data-action="{action}"][data-persona="{persona}"]').click()
        return True

    wait(driver).until(click)
    if action in ("promote", "rollback"):
        wait(driver).until(expected_conditions.alert_is_present())
        driver.switch_to.alert.accept() if confirm else driver.switch_to.alert.dismiss()


def message(driver) -> tuple[str, str]:
    m = driver.find_element(By.ID, "message")
    return m.text, m.get_attribute("class")


def name(version) -> str:
    return "–" if version is None else f"v{version}"


def test_page_shows_what_the_registry_holds_and_keeps_the_token_out_of_urls(site):
    driver, registry, rollouts = site
    assert "no token" in driver.find_element(By.ID, "token-state").text
    assert rows(driver, "personas") == []
    field = driver.find_element(By.ID, "token-input")
    field.send_keys("not-a-token-of-this-server\n")  # Enter works as the button does
    wait(driver).until(lambda d: "(401)" in message(d)[0])
    assert message(driver)[1] == "error" and rows(driver, "personas") == []
    use_token(driver, "root")
    personas = registry.personas()
    wait(driver).until(lambda d: len(rows(d, "personas")) == len(personas) and rows(d, "events"))

    shown = {int(r["persona"]): r for r in rows(driver, "personas")}
    assert sorted(shown) == personas
    for persona in personas:
        r = registry.rollout(persona)
        canary = r["canary"] is not None
        assert (shown[persona]["stable"], shown[persona]["canary"]) == (name(r["stable"]), name(r["canary"]))
        assert shown[persona]["percent"] == (f"{r['percent']:.1f} %" if canary else "–")
        assert shown[persona]["paused"] == (("yes" if r["paused"] else "no") if canary else "–")
        assert shown[persona]["versions"] == str(registry.versions(persona)[1])
    assert {p for p in personas if registry.rollout(p)["canary"] is not None} == {0, 3}  # the demo has two canaries

    # Persona 0 is selected first: its versions (newest first), its RMSE points by state, its audit trail.
    versions = registry.versions(0)[0][::-1]
    assert [(r["id"], r["state"]) for r in rows(driver, "versions")] == [(name(v["id"]), v["state"]) for v in versions]
    history = rollouts.evaluation_history(0, limit=500)[0]
    for state in ("stable", "canary"):
        dots = driver.find_elements(By.CSS_SELECTOR, f"#chart circle.point.{state}")
        assert sorted(int(d.get_attribute("data-version")) for d in dots) == sorted(
            p["version"] for p in history if p["state"] == state)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#chart circle.point.canary")) > 0
    events = rollouts.events(0)[0][::-1]
    assert [(r["actor"], r["action"], r["version"], r["reason"]) for r in rows(driver, "events")] == [
        (e["actor"], e["action"], name(e["version"]), e["reason"]) for e in events]
    assert HOSTILE_REASON in [r["reason"] for r in rows(driver, "events")]  # shown as the text it is...
    assert not driver.find_elements(By.CSS_SELECTOR, "#events img") and driver.title == "PersonaFL rollouts"  # ...inert

    # Another persona's details: persona 2's canary was rolled back automatically.
    press(driver, "select", 2)
    wait(driver).until(lambda d: any(r["actor"] == "auto-rollback" for r in rows(d, "events")))
    assert [r["action"] for r in rows(driver, "events")][0] == "rollback"

    # The token is in this tab's sessionStorage only: not in the URL, not left in the input field; a reload keeps it.
    assert TOKENS["root"] not in driver.current_url
    assert driver.find_element(By.ID, "token-input").get_attribute("value") == ""
    assert driver.execute_script("return sessionStorage.getItem('personafl-admin-token')") == TOKENS["root"]
    assert driver.execute_script("return document.cookie") == ""
    driver.refresh()
    wait(driver).until(lambda d: len(rows(d, "personas")) == len(personas))
    driver.find_element(By.ID, "token-forget").click()
    assert driver.execute_script("return sessionStorage.length") == 0
    assert rows(driver, "personas") == []


def test_promote_and_rollback_need_the_rollout_scope(site):
    driver, registry, rollouts = site
    before_canary = registry.rollout(0)
    assert before_canary["canary"] is not None

    # A read token sees the rollouts and their audit trail, and cannot promote.
    use_token(driver, "reader")
    wait(driver).until(lambda d: len(rows(d, "personas")) == len(registry.personas()))
    audit = rollouts.events(0, limit=100)[1]
    assert audit > 0
    wait(driver).until(lambda d: len(rows(d, "events")) == min(audit, 100))
    assert driver.find_element(By.ID, "events-note").text == ""
    unchanged = snapshot(registry)
    press(driver, "promote", 0)
    wait(driver).until(lambda d: "refused" in message(d)[0])
    text, kind = message(driver)
    assert "403" in text and "rollout" in text and kind == "error"
    assert snapshot(registry) == unchanged

    # A rollout token: cancelling the confirmation sends nothing; confirming promotes, with the typed reason.
    use_token(driver, "operator")
    press(driver, "promote", 0, confirm=False)
    assert snapshot(registry) == unchanged
    driver.find_element(By.ID, "reason").send_keys("canary better on 6 evaluations")
    press(driver, "promote", 0)
    wait(driver).until(lambda d: message(d)[0].startswith("Promoted"))
    after = registry.rollout(0)
    assert (after["stable"], after["canary"], after["previous_stable"]) == (
        before_canary["canary"], None, before_canary["stable"])
    last = rollouts.events(0, limit=500)[0][-1]
    assert (last["actor"], last["action"], last["version"], last["reason"]) == (
        "operator", "promote", before_canary["canary"], "canary better on 6 evaluations")
    wait(driver).until(lambda d: rows(d, "personas")[0]["stable"] == name(before_canary["canary"]))
    assert rows(driver, "personas")[0]["canary"] == "–"

    # Roll back: the previous stable version serves everyone again.
    press(driver, "rollback", 0)
    wait(driver).until(lambda d: message(d)[0].startswith("Rolled back"))
    assert registry.rollout(0)["stable"] == before_canary["stable"]
    assert rollouts.events(0, limit=500)[0][-1]["action"] == "rollback"

    # An admin token shows both in the audit trail, newest first.
    use_token(driver, "root")
    wait(driver).until(lambda d: len(rows(d, "events")) >= 2)
    assert [(r["actor"], r["action"]) for r in rows(driver, "events")[:2]] == [
        ("operator", "rollback"), ("operator", "promote")]
    assert rows(driver, "events")[1]["reason"] == "canary better on 6 evaluations"


def test_page_is_served_with_a_policy_that_admits_only_its_own_code(site):
    """The page works under its Content-Security-Policy (the tests above), and the policy is strict: only the
    page's own inline style and script by hash, requests to this API, and no framing."""
    import httpx

    driver, _, _ = site
    response = httpx.get(driver.current_url, timeout=30)
    policy = response.headers["content-security-policy"]
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "http" not in policy
    assert policy.count("'sha256-") == 2
    # And the browser enforces it: a script element injected into the page (as an HTML injection would) does not run.
    driver.execute_script("const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
                          "document.body.append(s);")
    assert driver.execute_script("return window.injected === undefined")
