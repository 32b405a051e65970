"""The console in a real browser: Debian's headless Chromium, driven by Playwright, against a
keys-mode gateway and the simulated upstream with traffic sent through it. One browser for the
module. Screenshots go to a temporary directory (CONSOLE_SCREENSHOTS names another one, e.g. to
refresh docs/img/console.png)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from gateway.console.formats import usd
from gateway.demo import default_catalog
from gateway.usage.reports import summarize
from tests.console.conftest import Site
from tests.helpers.gateway import CHAT_MODEL, forwarded, key_secret

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # A missing browser is a failure, not a skip: make test installs Debian's chromium (tests/system-packages.sh).
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (make test does)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])  # fmt: skip
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    named = os.environ.get("CONSOLE_SCREENSHOTS")
    return Path(named) if named else tmp_path_factory.mktemp("console-screenshots")


@pytest.fixture
def page(browser: Browser, console_site: Site) -> Iterator[Page]:
    context = browser.new_context(base_url=console_site.gateway.url, viewport={"width": 1280, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    try:
        yield tab
    finally:
        context.close()


def sign_in(page: Page, key: str) -> None:
    page.fill("#key", key)
    page.keyboard.press("Enter")  # the form works from the keyboard


def test_sign_in_then_the_charts_show_the_ledger(page: Page, console_site: Site, shots: Path) -> None:
    before = (list(forwarded(console_site.state)), console_site.state.catalog_fetches)
    page.goto(f"/console/usage?start={console_site.day}&end={console_site.day}")
    assert "/console/login" in page.url
    sign_in(page, key_secret("alice"))  # not an admin
    assert "admin key" in page.inner_text("#login-error")
    sign_in(page, key_secret("admin"))
    page.wait_for_url("**/console/usage?*")
    assert page.inner_text("header").count("Signed in as") == 1
    ledger = {r["key"]: r for r in summarize(console_site.ledger, by="key")}
    total = sum(r["cost_usd"] or 0 for r in ledger.values())
    bars = page.eval_on_selector_all("#chart-cost rect.bar", "els => els.map(e => Number(e.dataset.value))")
    assert len(bars) == 24
    assert sum(bars) == pytest.approx(total)
    assert page.locator("#chart-cost rect.bar").first.bounding_box() is not None  # drawn, not just present
    tallest = page.eval_on_selector_all("#chart-cost rect.bar", "els => Math.max(...els.map(e => e.getBBox().height))")
    assert tallest > 50  # the busiest hour's bar fills the chart
    assert page.inner_text("#totals [data-field=cost_usd]") == usd(total)
    assert page.inner_text('#breakdown tr[data-name="alice"] [data-field=cost_usd]') == usd(ledger["alice"]["cost_usd"])
    page.screenshot(path=str(shots / "console-usage.png"), full_page=True)
    page.goto("/console/catalog")
    page.screenshot(path=str(shots / "console-catalog.png"), full_page=True)
    assert (forwarded(console_site.state), console_site.state.catalog_fetches) == before  # nothing went upstream


def test_the_filters_work_from_the_form(page: Page, console_site: Site) -> None:
    page.goto("/console/login")
    sign_in(page, key_secret("admin"))
    page.wait_for_url("**/console/usage")
    page.fill("#start", console_site.day)
    page.select_option("#by", "model")
    page.fill("#f-key", "bob")
    page.click("text=Show")
    page.wait_for_url("**by=model**")
    shown = set(page.eval_on_selector_all("#breakdown tbody tr", "rows => rows.map(r => r.dataset.name)"))
    assert shown == {r["model"] for r in summarize(console_site.ledger, by="model", key="bob")}
    page.goto("/console/catalog")
    page.select_option("#category", "embedding")
    page.click("text=Filter")
    page.wait_for_url("**category=embedding**")
    models = set(page.eval_on_selector_all("#models tbody tr", "rows => rows.map(r => r.dataset.model)"))
    assert models == {m["model_name"] for m in default_catalog() if m.get("category") == "embedding"}


def test_the_live_panel_updates_without_reloading(page: Page, console_site: Site, shots: Path) -> None:
    page.goto("/console/login?next=%2Fconsole%2Flive")
    sign_in(page, key_secret("admin"))
    page.wait_for_url("**/console/live")
    page.evaluate("window.__stayed = true")  # gone if the page reloads
    seen = int(page.get_attribute("#live-tiles", "data-requests-total") or 0)
    with httpx.Client(base_url=console_site.gateway.url, timeout=10) as http:
        for _ in range(3):
            answer = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key_secret('bob')}"},
                               json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            assert answer.status_code == 200
    for _ in range(80):  # the panel updates every second (live_interval = 1): wait at most 8 s
        if int(page.get_attribute("#live-tiles", "data-requests-total") or 0) >= seen + 3:
            break
        page.wait_for_timeout(100)
    assert int(page.get_attribute("#live-tiles", "data-requests-total") or 0) >= seen + 3
    assert page.evaluate("window.__stayed") is True
    assert "Updated" in page.inner_text("#live-updated")
    page.screenshot(path=str(shots / "console-live.png"), full_page=True)


UNLABELLED = """() => [...document.querySelectorAll('input:not([type=hidden]), select, button, svg.chart, meter')]
    .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby')
                 && !(e.textContent || '').trim())
    .map(e => e.outerHTML.slice(0, 80))"""


def test_keyboard_and_labels(page: Page) -> None:
    """The first tab stop skips to the content; every control, chart and meter has a name."""
    page.goto("/console/login")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    assert page.evaluate(UNLABELLED) == []
    sign_in(page, key_secret("admin"))
    page.wait_for_url("**/console/usage")
    for path in ("/console/usage?period=hour", "/console/catalog", "/console/live", "/console/refusals"):
        page.goto(path)
        assert page.evaluate(UNLABELLED) == [], path
        assert page.evaluate("document.documentElement.lang") == "en"


# Every visible element with text of its own: its colour against the first opaque background up its
# ancestors, by WCAG 2.1's relative luminance; large text (24px, or 18.66px bold) needs 3:1, the
# rest 4.5:1. Answers the elements below that, with their ratio.
LOW_CONTRAST = """() => {
  const rgb = (text) => (text.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const c = [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.99)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.querySelectorAll('body *')) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    const style = getComputedStyle(el);
    if (!own || style.visibility === 'hidden' || el.getClientRects().length === 0) continue;
    if (el.closest('.skip') && el !== document.activeElement) continue;  // off-screen until focused
    const [a, b] = [lum(rgb(style.color).slice(0, 3)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(style.fontSize), bold = parseInt(style.fontWeight, 10) >= 700;
    const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
    if (ratio < needed) low.push(`${el.tagName.toLowerCase()}.${el.className}: ${ratio.toFixed(2)}`);
  }
  return low;
}"""


def test_text_keeps_wcag_aa_contrast(page: Page) -> None:
    page.goto("/console/login")
    assert page.evaluate(LOW_CONTRAST) == []
    sign_in(page, key_secret("admin"))
    page.wait_for_url("**/console/usage")
    for path in ("/console/usage?period=hour", "/console/catalog", "/console/live", "/console/refusals"):
        page.goto(path)
        assert page.evaluate(LOW_CONTRAST) == [], path
