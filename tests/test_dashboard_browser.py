"""The dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright) opens the synthetic
site from disk, sorts and filters the index, opens feature pages and checks what rendered. Skipped when Chromium or
the playwright package is missing (.ci/run installs both). Set SAELAB_SCREENSHOT=path.png to keep the feature-page
screenshot (the README's is dashboards/screenshot.png)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_dashboard_site import HOSTILE, WHITESPACE, fake_dashboard
from test_serve import TEXT, served  # noqa: F401 (a fixture)

from saelab.dashboard.site import write_site
from saelab.labels import Label

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


LABELS = {3: Label("hostile <b>", "a note about\nthe deep"), 10: Label("tenth latent", "")}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    summary, features = fake_dashboard(IDS, signed=True)
    index = write_site(tmp_path_factory.mktemp("site"), summary, features, labels=LABELS)
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

    assert page.is_hidden("#token-search")
    page.fill("#search", "TENTH")  # labels and notes are searched too
    assert table_ids(page) == [10] and page.text_content("#features tbody .label") == "tenth latent"
    page.fill("#search", "note about")
    assert table_ids(page) == [3]

    page.fill("#search", "__pwned")
    assert table_ids(page) == [3]
    page.click("#features tbody a")
    page.wait_for_selector("#activation-histogram svg")
    assert "feature.html?id=3" in page.url
    page.go_back()  # the index comes back sorted and filtered as it was left
    assert table_ids(page) == [3] and page.input_value("#search") == "__pwned"


def test_token_search_finds_every_latent_with_or_without_a_page(site, page):
    """The token index lists the top tokens of all 1,001 latents; every fifth latent without a page (260..995)
    fires on " LORD" in the fake data, and none of the built ones does."""
    index, _ = site
    page.goto(index.as_uri())
    page.fill("#search", "lord")
    assert table_ids(page) == []  # no built latent lists it
    lord = [i for i in range(1001) if i % 5 == 0 and i not in IDS]
    assert page.text_content("#token-count") == (
        f"{len(lord)} of 1,001 latents list a token matching \u201clord\u201d among the top tokens of their top 6 "
        "activations; 0 have a page here (the first 100 shown)."
    )
    rows = page.eval_on_selector_all("#token-matches tbody tr", "rows => rows.map(r => [r.dataset.id, "
                                     "r.querySelector('a').getAttribute('href'), r.cells[1].textContent, "
                                     "r.querySelectorAll('.chip.match').length])")  # fmt: skip
    assert rows == [[str(i), f"feature.html?id={i}", "4 of 6", 1] for i in lord[:100]]
    assert "--select ids --features " + " ".join(map(str, lord[:100])) + " --out" in page.text_content("#token-build")
    page.fill("#search", " waters")  # built latents (with a page: linked) and unbuilt ones, most hits first
    assert 0 < len(table_ids(page)) and page.locator("#token-matches a.unbuilt").count() > 0
    built_links = page.eval_on_selector_all("#token-matches a:not(.unbuilt)", "links => links.map(a => a.textContent)")
    assert sorted(map(int, built_links)) == sorted(table_ids(page))
    page.click("#token-matches a.unbuilt")  # a latent without a page: the page explains how to build it
    page.wait_for_selector("#status code")
    assert "has no page in this dashboard" in page.text_content("#status")


def test_feature_page_highlights_and_escapes(site, page, tmp_path):
    index, features = site
    feature = features[3]
    page.goto(index.with_name("feature.html").as_uri() + "?id=3")
    page.wait_for_selector("#activation-histogram.js-plotly-plot svg .bars path")
    assert page.text_content("#title").startswith("Latent 3")
    assert page.text_content("#feature-label") == "hostile <b>" and page.text_content("#feature-notes") == "a note about\nthe deep"
    # from disk there is no server: the page says how to get the live panels instead of asking for them
    assert "saelab serve --sae SAE_FOLDER" in page.text_content("#live-hint") and page.locator("#live-text").count() == 0

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


# ---------------------------------------------------------------- served by `saelab serve`


@pytest.fixture(scope="module")
def server(served, tiny_model):  # noqa: F811 (the fixture imported above)
    """The tiny SAE's real dashboard (latents 0-7) served with its live panels on a free port."""
    from saelab.dashboard.live import LiveSAE
    from saelab.dashboard.server import LocalServer, create_app

    folder, sae = served
    live = LiveSAE(sae, tiny_model, folder, max_text_tokens=64)
    running = LocalServer(create_app(live, folder / "dashboard"), port=0).start()
    yield running, live
    running.stop()


@pytest.fixture
def served_page(browser):
    """A page that records script and console errors, checked after the test body."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    yield page
    assert page.errors == []
    page.close()


def test_live_text_steering_and_labels_from_a_served_feature_page(server, served_page, tmp_path):
    running, live = server
    page = served_page
    (live.sae_folder / "labels.json").unlink(missing_ok=True)
    strongest = {i: max(map(abs, live.activations(TEXT, i)["acts"])) for i in range(8)}
    latent = max(strongest, key=strongest.get)
    assert strongest[latent] > 0  # a latent with a page that fires on the text
    page.goto(f"{running.url}feature.html?id={latent}")
    page.wait_for_selector("#live-text")
    assert page.locator("#live-hint").count() == 0

    # your own text: this latent's activation on every token, highlighted, and the text's top latents
    page.fill("#live-text", TEXT)
    page.click("#live-run")
    page.wait_for_selector("#live-out .tok")
    expected = live.activations(TEXT, latent)
    spans = page.eval_on_selector_all("#live-out .tok", "spans => spans.map(s => [s.textContent, s.dataset.act, "
                                      "s.classList.contains('pos') || s.classList.contains('neg')])")  # fmt: skip
    assert [text for text, _, _ in spans] == [shown(t) for t in expected["tokens"]]
    assert [float(act) for _, act, _ in spans] == pytest.approx(expected["acts"], rel=1e-5)
    assert [lit for _, _, lit in spans] == [a != 0 for a in expected["acts"]] and any(lit for _, _, lit in spans)
    top = page.eval_on_selector_all("#live-top tbody tr", "rows => rows.map(r => Number(r.dataset.id))")
    assert top == [row["latent"] for row in expected["top"]]

    # steering: the completion changes, and the loss change is reported
    page.select_option("#steer-mode", "add")
    page.fill("#steer-alpha", "40")
    page.fill("#steer-prompt", "In the beginning")
    page.fill("#steer-tokens", "6")
    page.click("#steer-run")
    page.wait_for_selector("#steer-steered")
    steered = live.steer(latent, "add", 40.0, "In the beginning", 6)
    assert page.text_content("#steer-clean") == steered["clean"]
    assert page.text_content("#steer-steered") == steered["steered"] != steered["clean"]
    assert "nats" in page.text_content("#steer-loss")
    page.fill("#steer-alpha", "")  # a bad value: the server's sentence, not a stack trace
    page.click("#steer-run")
    page.wait_for_selector("#steer-status.error")
    assert "--alpha takes a finite number" in page.text_content("#steer-status")
    assert page.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    page.errors.clear()  # the browser logs every 4xx answer; that one was asked for

    # labels: saved to the SAE's labels.json, shown at once, then on the index (served fresh)
    page.fill("#label-text", "my latent")
    page.fill("#label-notes", "seen in Genesis")
    page.click("#label-save")
    page.wait_for_selector("#feature-label")
    assert page.text_content("#feature-label") == "my latent"
    assert live.labels() == {latent: Label("my latent", "seen in Genesis")}
    screenshot = Path(os.environ.get("SAELAB_SERVE_SCREENSHOT") or tmp_path / "served.png")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    page.goto(running.url + "index.html")
    page.fill("#search", "genesis")
    page.wait_for_selector("#features tbody tr")
    assert table_ids(page) == [latent]


def test_a_latent_without_a_page_still_gets_the_live_panels(server, served_page):
    running, live = server
    page = served_page
    page.goto(f"{running.url}feature.html?id=90")
    page.wait_for_selector("#live-text")
    assert "Latent 90 has no page in this dashboard." in page.text_content("#status")
    assert page.text_content("#title") == "Latent 90 "
    page.fill("#live-text", TEXT)
    page.click("#live-run")
    page.wait_for_selector("#live-summary")
    fired = sum(a != 0 for a in live.activations(TEXT, 90)["acts"])
    assert page.text_content("#live-summary").startswith(f"Latent 90 fires on {fired} of ")
