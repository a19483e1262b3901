"""The web UI in a real browser: `dagster-webserver -w workspace.yaml` over an instance that holds a
finished pipeline run, driven by headless Chromium through Selenium.

It checks that the lineage graph draws every asset and exactly the graph's edges, and that
eval_report's page renders the report's markdown with its plots (data:image/png images).
Screenshots go to a temp folder and, where writable, bench/out/ui/ (gitignored).
Needs Debian's chromium and chromium-driver (`make test` installs them where apt-get works).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import dagster as dg
import pytest

from spec_assets.cli import failure_messages, run_pipeline

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ASSETS = ["source_corpus", "resampled_corpus", "tokenized_shards", "vocab_map", "hidden_states", "draft_model",
          "eval_report", "released_draft"]
GROUPS = ["corpus", "tokenize", "features", "train", "evaluate"]
WAIT = 90  # seconds, for any one thing the browser waits for

if not CHROMIUM.exists():
    REASON = f"{CHROMIUM} is absent: install chromium and chromium-driver (make test does, where apt-get works)"
    warnings.warn(f"test_ui skipped: {REASON}", stacklevel=1)
    pytest.skip(REASON, allow_module_level=True)

from tests.spec_assets.conftest import graph_env  # noqa: E402
from tests.spec_assets.small_run import SMALL  # noqa: E402
from tests.webserver import dagster_webserver  # noqa: E402

# Asset nodes and edges as the lineage graph draws them: each node is an SVG foreignObject holding
# the asset's name, each edge a path with an arrow marker from a node's right side to another's left.
GRAPH_JS = """
const nodes = {};
for (const el of document.querySelectorAll('[class*="AssetNode_assetName"]')) {
  const fo = el.closest('foreignObject');
  if (!fo) continue;
  nodes[el.textContent.trim()] = ['x', 'y', 'width', 'height'].map(a => parseFloat(fo.getAttribute(a)));
}
const edges = [];
for (const p of document.querySelectorAll('path[marker-end]')) {
  const n = (p.getAttribute('d').match(/-?[0-9.]+/g) || []).map(Number);
  if (n.length >= 4) edges.push([n[0], n[1], n[n.length - 2], n[n.length - 1]]);
}
return {nodes: nodes, edges: edges};
"""


def _nearest(nodes: dict, x: float, y: float) -> str:
    """The node whose box is closest to (x, y)."""
    def distance(box):
        bx, by, w, h = box
        dx = max(bx - x, 0, x - (bx + w))
        dy = max(by - y, 0, y - (by + h))
        return dx * dx + dy * dy
    return min(nodes, key=lambda name: distance(nodes[name]))


@pytest.fixture(scope="module")
def instance_env(tmp_path_factory, tiny_target):
    """A DAGSTER_HOME holding one finished `specdraft run` (eval_report's gate failed: no release)."""
    # ui: no "Join the Dagster community" dialog over the pages (it would cover them).
    env = graph_env(tmp_path_factory.mktemp("ui"), tiny_target, n_shards=1, ui=True)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with dg.DagsterInstance.get() as instance:
            results = run_pipeline(run_config=SMALL, instance=instance, log=lambda _: None)
            assert results[0].success, failure_messages(results[0])
            assert [m.split(":")[0] for m in failure_messages(results[1])] == ["eval_report"]
            assert len(instance.fetch_materializations(dg.AssetKey("eval_report"), limit=1).records) == 1
    return env


@pytest.fixture(scope="module")
def webserver(instance_env, tmp_path_factory):
    """dagster-webserver -w workspace.yaml on a free loopback port (tests/webserver.py)."""
    log_path = tmp_path_factory.mktemp("webserver") / "webserver.log"
    with dagster_webserver(["-w", "workspace.yaml"], instance_env, log_path) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not CHROMEDRIVER.exists():
        pytest.fail(f"{CHROMIUM} is installed but {CHROMEDRIVER} is not: install chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Save a screenshot in a temp folder and, where writable, in bench/out/ui/."""
    folder = tmp_path_factory.mktemp("screenshots")
    copies = ROOT / "bench" / "out" / "ui"
    try:
        copies.mkdir(parents=True, exist_ok=True)
    except OSError:
        copies = None

    def save(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), name
        assert path.stat().st_size > 10_000, f"{name}: screenshot is nearly empty"
        if copies is not None and os.access(copies, os.W_OK):
            shutil.copy(path, copies / path.name)
        return path

    return save


def _open(driver, url: str, ready_text: list[str]):
    """Load `url` and wait until the page shows every string in ready_text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)

    def ready(d):
        text = d.find_element(By.TAG_NAME, "body").text
        return all(s in text for s in ready_text)

    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.5).until(ready)
    except Exception:
        text = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{url}: {ready_text} not all shown within {WAIT}s; page text:\n{text[:2000]}")


def test_lineage_graph_shows_every_asset_and_edge(webserver, browser, shots):
    from spec_assets.definitions import defs

    # The global lineage view: one box per group, the groups' own lineage.
    _open(browser, f"{webserver}/asset-groups", GROUPS)
    shots(browser, "global_lineage")

    # released_draft's upstream lineage covers the whole graph, asset by asset.
    _open(browser, f"{webserver}/assets/released_draft?view=lineage&lineageScope=upstream&lineageDepth=10", ASSETS)
    time.sleep(1)  # the layout settles after the last node appears
    drawn = browser.execute_script(GRAPH_JS)
    shots(browser, "asset_lineage")
    nodes = drawn["nodes"]
    assert sorted(nodes) == sorted(ASSETS)
    edges = {(_nearest(nodes, x1, y1), _nearest(nodes, x2, y2)) for x1, y1, x2, y2 in drawn["edges"]}
    graph = defs.resolve_asset_graph()
    expected = {(p.to_user_string(), k.to_user_string())
                for k in graph.materializable_asset_keys for p in graph.get(k).parent_keys}
    assert edges == expected
    assert len(expected) == 11


def test_eval_report_page_renders_the_report_and_its_plots(webserver, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, f"{webserver}/assets/eval_report", ["Metadata", "tau_by_k", "[Show Markdown]", "fingerprint"])
    shots(browser, "eval_report")
    (link,) = browser.find_elements(By.XPATH, "//a[normalize-space()='[Show Markdown]']")  # the `report` entry
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", link)
    link.click()

    def plots(d):
        """The markdown dialog once rendered: its text and its images, every one a decoded PNG."""
        images = d.find_elements(By.CSS_SELECTOR, ".bp5-dialog img")
        if not images:
            return False
        loaded = d.execute_script(
            "return arguments[0].filter(i => i.complete && i.naturalWidth > 100"
            " && i.src.startsWith('data:image/png;base64,')).length", images)
        dialog = images[0].find_element(By.XPATH, "./ancestor::div[contains(@class, 'bp5-dialog')][1]")
        text = dialog.get_attribute("textContent") or ""
        return (images, text) if loaded == len(images) and "EAGLE-3 draft evaluation" in text else False

    images, text = WebDriverWait(browser, WAIT, poll_frequency=0.5).until(plots)
    assert "Acceptance length" in text and "Plots" in text
    assert len(images) >= 2
    # Screenshots once the dialog's fade-in has finished (every ancestor fully opaque).
    opaque = ("let e = arguments[0], o = 1; while (e) { o *= parseFloat(getComputedStyle(e).opacity || '1');"
              " e = e.parentElement; } return o > 0.99;")
    WebDriverWait(browser, 10, poll_frequency=0.1).until(lambda d: d.execute_script(opaque, images[0]))
    for heading in browser.find_elements(By.CSS_SELECTOR, ".bp5-dialog h1")[:1]:  # the report's title on screen
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", heading)
    shots(browser, "eval_report_markdown")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", images[0])
    shots(browser, "eval_report_plot")
