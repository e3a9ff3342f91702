"""The service's web page in headless Chromium (tests/_browser.py): upload the demo triplet, see three ranked
scores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from _browser import chromium_page
from _serving import ServerThread
from icthp.serve import ServeConfig, create_app
from icthp.serve.app import ServedModels


@pytest.fixture()
def browser_page():
    with chromium_page() as page_and_problems:
        yield page_and_problems


def test_page_scores_the_demo_triplet(browser_page, ict_hp, demo_dir, tmp_path):
    page, problems = browser_page
    import json

    row = json.loads((demo_dir / "triplets.jsonl").read_text(encoding="utf-8").splitlines()[0])
    paths = [demo_dir / row[role] for role in ("lose", "win", "high")]
    expected = ict_hp.score_images_all(paths, row["prompt"])
    order = ict_hp.rank(row["prompt"], paths).order

    with ServerThread(create_app(ServeConfig(), models=ServedModels("ict-hp", ict_hp))) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#status.ready", timeout=30_000)
        assert page.is_visible("#warning")  # tiny-random weights are labelled as untrained
        page.set_input_files("#files", [str(p) for p in paths])
        assert page.locator("#thumbs img").count() == 3
        page.fill("#prompt", row["prompt"])
        page.click("#score")
        page.wait_for_selector("#results:not([hidden]) tbody tr >> nth=2", timeout=30_000)

        rows = page.locator("#results tbody tr")
        assert rows.count() == 3
        shown_order = [int(rows.nth(r).get_attribute("data-index")) for r in range(3)]
        assert shown_order == order  # best first, by the released group rule
        for r, i in enumerate(shown_order):
            cells = rows.nth(r)
            assert cells.locator("td").nth(0).inner_text() == str(r + 1)
            assert cells.locator("td").nth(2).inner_text() == paths[i].name
            for col in ("ict", "hp", "ict_hp"):
                shown = float(cells.locator(f"td.score-{col}").inner_text())
                assert shown == pytest.approx(float(getattr(expected, col)[i]), abs=6e-5), (col, i)
        shot = Path(os.environ.get("ICTHP_SCREENSHOT_DIR", tmp_path)) / "serve_page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    assert problems == []


def test_page_shows_service_errors(browser_page, ict_hp, tmp_path):
    page, problems = browser_page
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with ServerThread(create_app(ServeConfig(token="tok"), models=ServedModels("ict-hp", ict_hp))) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#status.ready", timeout=30_000)
        page.set_input_files("#files", [str(bad)])
        page.fill("#prompt", "a cat")
        page.click("#score")  # no token yet
        page.wait_for_selector("#error:has-text('401')", timeout=30_000)
        page.fill("#token", "tok")
        page.click("#score")
        page.wait_for_selector("#error:has-text('400')", timeout=30_000)
        assert "images[0]" in page.inner_text("#error")
    # The browser logs failed fetches (401, 400) as console errors; nothing else may appear.
    assert all("status of 40" in p for p in problems), problems
