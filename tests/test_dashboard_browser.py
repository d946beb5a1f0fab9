"""The dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright) opens the synthetic
site from disk, sorts and filters the index, opens feature pages and checks what rendered. Skipped when Chromium or
the playwright package is missing (.ci/run installs both). Set SAELAB_SCREENSHOT=path.png to keep the feature-page
screenshot (the README's is dashboards/screenshot.png)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_dashboard_site import HOSTILE, WHITESPACE, fake_dashboard

from saelab.dashboard.site import write_site

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[dev]')"
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IDS = [*range(260), 1000]


def shown(token: str) -> str:
    """The text a token span shows: newlines and tabs as symbols, the spaces of an all-whitespace piece as dots."""
    text = token.replace("\n", "↵").replace("\t", "⇥")
    return (
        text.replace(" ", "·") if not token.strip() else text
    )  # more rows than one table page (200), and a latent alone in a far chunk


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    summary, features = fake_dashboard(IDS, signed=True)
    index = write_site(tmp_path_factory.mktemp("site"), summary, features)
    return index, {f["id"]: f for f in features}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A page that records every request, every script error and every console error (a failed file load logs one),
    all checked after the test body."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.requests, page.errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    yield page
    assert page.errors == []
    assert page.requests and all(url.startswith("file://") for url in page.requests), page.requests
    page.close()


def table_ids(page) -> list[int]:
    return [int(i) for i in page.eval_on_selector_all("#features tbody tr", "rows => rows.map(r => r.dataset.id)")]


def test_index_sorts_filters_and_pages(site, page):
    index, features = site
    page.goto(index.as_uri())
    page.wait_for_selector("#density-histogram .js-plotly-plot svg, #density-histogram.js-plotly-plot svg")
    assert table_ids(page) == IDS[:200]
    assert page.locator("#metrics tr").count() == 2 + 4  # n_features, signed, then the four metrics
    assert page.text_content("#count") == f"{len(IDS)} of {len(IDS)} latents"
    page.click("#next")
    assert table_ids(page) == IDS[200:]

    page.click("th[data-key=max_act]")  # numbers sort largest first, ties by id
    by_max = sorted(features.values(), key=lambda f: (-f["max_act"], f["id"]))
    assert table_ids(page) == [f["id"] for f in by_max][:200]
    assert page.get_attribute("th[data-key=max_act]", "aria-sort") == "descending"
    page.click("th[data-key=max_act]")
    assert table_ids(page) == [f["id"] for f in sorted(by_max, key=lambda f: (f["max_act"], f["id"]))][:200]

    page.fill("#search", "WATERS")
    with_waters = sorted((f for f in features.values() if any("waters" in t for t in f["top_tokens"])),
                         key=lambda f: (f["max_act"], f["id"]))  # fmt: skip
    assert 0 < len(with_waters) < len(IDS) and table_ids(page) == [f["id"] for f in with_waters]
    page.fill("#search", "")
    page.uncheck("#show-dead")
    alive = [i for i in IDS if not features[i]["dead"]]
    assert page.text_content("#count") == f"{len(alive)} of {len(IDS)} latents"
    assert page.locator("#features .badge.dead").count() == 0
    page.check("#show-dead")
    page.uncheck("#show-dense")
    assert page.locator("#features .badge.dead").count() > 0 and page.locator("#features .badge.dense").count() == 0

    page.fill("#search", "__pwned")
    assert table_ids(page) == [3]
    page.click("#features tbody a")
    page.wait_for_selector("#activation-histogram svg")
    assert "feature.html?id=3" in page.url
    page.go_back()  # the index comes back sorted and filtered as it was left
    assert table_ids(page) == [3] and page.input_value("#search") == "__pwned"


def test_feature_page_highlights_and_escapes(site, page, tmp_path):
    index, features = site
    feature = features[3]
    page.goto(index.with_name("feature.html").as_uri() + "?id=3")
    page.wait_for_selector("#activation-histogram.js-plotly-plot svg .bars path")
    assert page.text_content("#title").startswith("Latent 3")

    examples = feature["top"] + [e for q in reversed(feature["quantiles"]) for e in q["examples"]]  # highest first
    spans = page.eval_on_selector_all(
        ".tok", "spans => spans.map(s => [s.textContent, s.dataset.act, s.title, s.className, s.style.backgroundColor])"
    )
    assert len(spans) == sum(len(e["tokens"]) for e in examples)
    expected = [(t, a) for e in examples for t, a in zip(e["tokens"], e["acts"], strict=True)]
    scale = max(abs(feature["max_act"]), abs(feature["min_act"]))
    for (text, act, title, classes, colour), (token, value) in zip(spans, expected, strict=True):
        assert text == shown(token) and float(act) == value
        assert float(title) == pytest.approx(value, rel=1e-3)
        kind = "pos" if value > 0 else "neg" if value < 0 else None
        assert (kind in classes.split()) if kind else not colour
        if kind:
            red, _, blue, *alpha = (float(c) for c in colour[colour.index("(") + 1 : -1].split(","))
            alpha = alpha[0] if alpha else 1.0  # the browser writes rgba(..., 1) as rgb(...)
            assert (red > blue) == (value > 0) and alpha == pytest.approx(min(1, abs(value) / scale), abs=0.01)
    assert any(v < 0 for _, v in expected)  # the signed site draws negative activations (in blue)

    hostile = page.locator(".tokens-line").first.locator(".tok")
    assert hostile.all_text_contents()[1:-1] == [*HOSTILE[:-1], "↵", "↵⇥··"]
    assert shown(WHITESPACE) == "↵⇥··"
    assert "focus" in hostile.nth(1).get_attribute("class")
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('script:not([src])').length") == 1  # feature.html's own

    assert page.locator(".logits tr").count() == len(feature["logits"]["positive"]) + len(feature["logits"]["negative"])
    neighbour_links = page.eval_on_selector_all(".neighbours a", "links => links.map(a => a.getAttribute('href'))")
    assert neighbour_links == [f"feature.html?id={i}" for i, _, _ in feature["neighbours"] if i in features]
    # neighbours without a page are no links: their id, their top tokens (or "never fired") and how to build them
    rows = page.eval_on_selector_all(".neighbours tr", "rows => rows.map(r => [r.cells[0].textContent, "
                                     "!!r.cells[0].querySelector('a'), r.cells[2].textContent])")  # fmt: skip
    assert rows[-2:] == [["5003", False, " waters<b> (no page)"], ["6003", False, "never fired (no page)"]]
    assert all(linked for _, linked, _ in rows[:-2])
    assert [text for _, _, text in rows[:-2]] == ["".join(t) for _, _, t in feature["neighbours"][:-2]]
    assert "--select ids --features 5003 6003 --out" in page.text_content(".neighbours + .note")
    screenshot = Path(os.environ.get("SAELAB_SCREENSHOT") or tmp_path / "feature.png")
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_feature_page_variants(site, page):
    index, features = site
    feature_page = index.with_name("feature.html").as_uri()
    page.goto(feature_page + "?id=2")  # hook_z: attribution by head
    page.wait_for_selector("#heads.js-plotly-plot svg")
    assert page.locator("#heads .bars path").count() == len(features[2]["heads"])
    first = features[2]["top"][0]
    assert page.get_attribute(".example .value", "title").startswith(
        f"context {first['context']}, position {first['position']}; DFA by head: H0 "
    )
    page.goto(feature_page + "?id=4")  # encoder: no logit effects
    page.wait_for_selector("#activation-histogram svg")
    assert "Not available" in page.text_content("main")
    page.goto(feature_page + "?id=7")  # dead
    page.wait_for_selector("#title .badge.dead")
    assert "Never fired" in page.text_content("#activation-histogram")
    page.goto(feature_page + "?id=1000")  # the far chunk; its neighbours are links back
    page.wait_for_selector("#activation-histogram svg")
    assert page.text_content("#prev-feature") == "← latent 259"


def test_feature_page_explains_ids_it_cannot_show(site, page):
    """Not a number, beyond the SAE, or a latent without a page: one sentence, a link back to the index, no data
    file requested and no console error (the fixture checks both)."""
    index, _ = site
    feature_page = index.with_name("feature.html").as_uri()
    cases = [
        ("abc", "\u201cabc\u201d is not a latent number: open this page as feature.html?id=N"),
        ("-3", "\u201c-3\u201d is not a latent number"),
        ("5000", "Latent 5000 does not exist: this SAE has latents 0 to 1,000."),
        ("999", "Latent 999 has no page in this dashboard."),  # its chunk file exists (with 1000)
        ("260", "Latent 260 has no page in this dashboard."),  # no chunk file at all
    ]
    for raw, sentence in cases:
        page.goto(feature_page + "?id=" + raw)
        status = page.text_content("#status")
        assert status.startswith(sentence), status
        assert page.get_attribute("#status a", "href") == "index.html"
        assert ("--select ids --features " + raw + " --out dashboard_" + raw in status) == (raw in ("999", "260"))
    assert not [url for url in page.requests if "/data/features_" in url]
    page.click("#status a")
    page.wait_for_selector("#features tbody tr")
