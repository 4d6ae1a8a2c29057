"""The review UI in a real browser: Debian's chromium, driven by Selenium
through /usr/bin/chromedriver (scripts/setup.sh installs both; nothing is
downloaded at run time: the driver's path is given, so Selenium Manager
never runs, and SE_OFFLINE forbids it anyway).

One walk through the pages a reviewer uses, asserting what a person sees
(text on the page, images that really decoded), with a screenshot of each
page under the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: scripts/setup.sh test installs chromium and chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def decoded(driver, element) -> bool:
    """The image finished loading and decoded (a broken image has naturalWidth 0)."""
    return driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", element)


def test_a_reviewer_clicks_through_the_ui(browser, ui_local_site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d, site, sample = browser, ui_local_site, ui_local_site.sample
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        assert d.save_screenshot(str(shots / f"{name}.png"))

    def text() -> str:
        return d.find_element(By.TAG_NAME, "main").text

    def wait_images(selector: str, within=None):
        imgs = (within or d).find_elements(By.CSS_SELECTOR, selector)
        assert imgs, selector
        WebDriverWait(d, 20).until(lambda _: all(d.execute_script("return arguments[0].complete", i) for i in imgs))
        return imgs

    # The repository page: branches, tags, the recent commits.
    d.get(site.client.base + "/")
    assert d.title.endswith("· commitfs")
    commits = d.find_element(By.ID, "commits").text
    assert "v2: relabel cat_1" in commits and "v1: first labels" in commits and "tester@example" in commits
    assert "v1" in d.find_element(By.ID, "tags").text
    shot("01-repository")

    # A commit: its id, parents, what changed.
    d.find_element(By.ID, "commits").find_element(By.LINK_TEXT, sample.v2[:12]).click()
    assert d.find_element(By.ID, "commit-id").text == sample.v2
    assert "1 added" in d.find_element(By.ID, "counts").text
    assert sample.v1[:12] in d.find_element(By.ID, "parents").text
    assert "labels.csv" in d.find_element(By.ID, "changes").text
    shot("02-commit")

    # Its files, a directory, the directory as a grid of thumbnails.
    d.find_element(By.ID, "browse").click()
    d.find_element(By.LINK_TEXT, "images/").click()
    assert "cat_0.png" in d.find_element(By.ID, "entries").text
    assert d.find_element(By.ID, "commit-id").text == sample.v2
    d.find_element(By.ID, "grid").click()
    thumbs = wait_images("#grid img")
    names = [t.get_attribute("alt") for t in thumbs]
    assert names == ["broken.png", "cat_0.png", "cat_1.png", "cat_2.png", "new.png"]
    assert all(decoded(d, t) for t in thumbs)  # the undecodable one shows its placeholder
    shot("03-grid")

    # An image.
    d.find_element(By.CSS_SELECTOR, 'img[alt="cat_2.png"]').click()
    (img,) = wait_images("#image")
    assert decoded(d, img) and d.execute_script("return arguments[0].naturalWidth", img) == 200
    assert "cat_2.png" in d.find_element(By.TAG_NAME, "h1").text
    shot("04-image")

    # A table, filtered on a column.
    d.find_element(By.ID, "breadcrumb").find_element(By.LINK_TEXT, "/").click()
    d.find_element(By.LINK_TEXT, "big.csv").click()
    assert d.find_element(By.ID, "range").text == "rows 1–100"
    Select(d.find_element(By.ID, "filter-column")).select_by_visible_text("label")
    d.find_element(By.ID, "filter-value").send_keys("dog")
    d.find_element(By.ID, "filter-apply").click()
    WebDriverWait(d, 10).until(lambda _: "value=dog" in d.current_url)
    assert d.find_element(By.ID, "range").text == "rows 1–84 of 84"
    rows = d.find_elements(By.CSS_SELECTOR, "#table tr")[1:]
    assert len(rows) == 84 and all(r.find_elements(By.TAG_NAME, "td")[2].text == "dog" for r in rows)
    shot("05-table-filter")

    # The compare page from the commit: the changed image side by side, the changed cell.
    d.get(site.client.base + f"/commit/{sample.v2}")
    d.find_element(By.ID, "parents").find_element(By.LINK_TEXT, "compare").click()
    pair = d.find_element(By.CSS_SELECTOR, ".image-pair")
    assert "images/cat_1.png" in pair.text and "modified" in pair.text
    before, after = wait_images("img", pair)
    assert decoded(d, before) and decoded(d, after)
    assert before.get_attribute("src").endswith(f"/raw/{sample.v1}/images/cat_1.png")
    assert after.get_attribute("src").endswith(f"/raw/{sample.v2}/images/cat_1.png")
    changed = d.find_element(By.CSS_SELECTOR, ".rowdiff td.changed")
    assert changed.text == "cat dog" and changed.find_element(By.TAG_NAME, "del").text == "cat"
    assert "layer.weight" in d.find_element(By.CSS_SELECTOR, ".tensordiff").text
    d.execute_script("document.querySelector('.rowdiff').scrollIntoView()")
    shot("06-compare")

    # The lineage of the model commit: its input drawn as a node to click.
    d.get(site.client.base + "/?branch=model")
    d.find_element(By.ID, "commits").find_element(By.LINK_TEXT, sample.model[:12]).click()
    d.find_element(By.ID, "lineage").click()
    graph = d.find_element(By.CSS_SELECTOR, "#graph svg")
    nodes = graph.find_elements(By.CSS_SELECTOR, "g.node")
    assert {n.get_attribute("data-commit") for n in nodes} == {sample.model, sample.v1}
    assert len(graph.find_elements(By.CSS_SELECTOR, "path.edge")) == 1
    assert sample.v1[:12] in graph.text and "v1: first labels" in graph.text
    shot("07-lineage")
    graph.find_element(By.CSS_SELECTOR, f'g.node[data-commit="{sample.v1}"]').click()
    WebDriverWait(d, 10).until(lambda _: d.current_url.endswith(f"/commit/{sample.v1}"))
    assert d.find_element(By.ID, "commit-id").text == sample.v1

    assert sorted(p.name for p in shots.iterdir()) == [
        "01-repository.png", "02-commit.png", "03-grid.png", "04-image.png", "05-table-filter.png",
        "06-compare.png", "07-lineage.png"]
