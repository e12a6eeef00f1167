"""A notebook in a real browser: JupyterLab as `make lab` starts it, driven in headless Chromium.

JupyterLab serves the repository root on a free local port; Chromium (Debian's package, driven by
Selenium through the system chromedriver) opens notebook 01 with small settings, runs every cell
from the Run menu, and checks what a person would see: widgets rendered as widgets (not as text),
a slider that redraws its figure when moved, and no cell with an error. Every other notebook is run
the same way (notebook 05, whose run loads a real model, is opened with the outputs of its headless
run instead), and each cell tagged `figure` must show its figure as an image, never as the text
`<Figure size ...>`. A screenshot is kept in notebooks/_figures/browser/. Without Chromium the
test is skipped with the reason; `.ci/run` installs it (`apt-get install chromium
chromium-driver`, as root). No wait has a time limit: a slow machine is not a hung one; a wait
fails when JupyterLab's process or the kernel dies. The server, the browser and the waits are in
tests/browser_session.py, which also times notebooks in the browser with their defaults.
"""

from __future__ import annotations

import json
import urllib.request

import nbformat
import pytest

from tests.browser_session import (
    REPO_ROOT,
    cell_errors,
    cell_report,
    chromium,
    jupyterlab,
    kernel_status,
    leave_notebook,
    missing_browser,
    remove_copy,
    run_all_cells,
    time_in_browser,
    wait_for,
)
from tests.notebook_runner import inject_parameters
from tests.test_notebooks import NOTEBOOKS, executed_notebook

pytestmark = [pytest.mark.slow, pytest.mark.notebook, pytest.mark.browser]

NOTEBOOK = REPO_ROOT / "notebooks" / "01_zero_variance.ipynb"
COPY = NOTEBOOK.with_name("_browser_01_zero_variance.ipynb")  # gitignored
SCREENSHOTS = REPO_ROOT / "notebooks" / "_figures" / "browser"
STORED = {"05_real_models"}
"""Notebooks checked with the outputs of their headless run rather than run in the browser."""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token) of a JupyterLab started like `make lab` (tests/browser_session.py)."""
    if (why := missing_browser()) is not None:
        pytest.skip(why)
    with jupyterlab(tmp_path_factory.mktemp("lab")) as url_and_token:
        yield url_and_token


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def test_make_lab_serves_the_repository_root_and_opens_on_the_notebooks(lab, browser):
    url, token = lab
    browser.get(f"{url}/?token={token}")
    wait_for(lambda: "/lab/tree/notebooks" in browser.current_url, "the redirect to notebooks/")
    with urllib.request.urlopen(f"{url}/api/contents/README.md?token={token}") as response:
        assert json.load(response)["name"] == "README.md"  # the root is the repository
    wait_for(
        lambda: (
            NOTEBOOK.name
            in browser.execute_script(
                "return [...document.querySelectorAll('.jp-DirListing-itemText')]"
                ".map(e => e.textContent)"
            )
        ),
        "the file browser to show notebooks/",
    )


def test_a_notebook_runs_in_the_browser_with_live_widgets(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, token = lab
    notebook = inject_parameters(nbformat.read(NOTEBOOK, as_version=4), {"SMALL": True})
    nbformat.write(notebook, COPY)
    try:
        browser.get(f"{url}/lab/tree/notebooks/{COPY.name}?token={token}")
        run_all_cells(browser)
        assert cell_errors(browser) == []
        assert_figures_are_images(browser, NOTEBOOK.stem)

        sliders = browser.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
        assert sliders, "no slider was rendered as a widget"
        outputs = " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea"))
        for text_repr in ("IntSlider(", "FloatSlider(", "interactive(children"):  # as text
            assert text_repr not in outputs

        figure = "document.querySelector('.widget-interact .widget-output img')"
        before = wait_for(lambda: browser.execute_script(f"return {figure}?.src"), "the figure")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", sliders[0])
        sliders[0].click()
        sliders[0].send_keys(Keys.ARROW_RIGHT * 5)
        after = wait_for(
            lambda: (src := browser.execute_script(f"return {figure}?.src")) != before and src,
            "the figure to redraw after the slider moved",
            browser=browser,
        )
        assert after != before
        wait_for(lambda: kernel_status(browser) == "idle", "the redraws to finish", browser=browser)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", sliders[0])
        assert browser.save_screenshot(str(SCREENSHOTS / "01_zero_variance.png"))
    finally:
        leave_notebook(browser)
        remove_copy(COPY)


OTHERS = [p for p in NOTEBOOKS if p != NOTEBOOK]


@pytest.mark.parametrize("path", OTHERS, ids=[p.stem for p in OTHERS])
def test_every_notebook_shows_its_figures_as_images_in_the_browser(lab, browser, path):
    url, token = lab
    if path.stem not in STORED:  # run from the Run menu, as the timing command does
        result = time_in_browser(
            browser, url, token, path, {"SMALL": True},
            check=lambda browser: assert_figures_are_images(browser, path.stem),
        )  # fmt: skip
        assert result["errors"] == []
        assert result["seconds"] > 0 and result["slowest"], "no cell's run time was recorded"
        return
    copy = path.with_name(f"_browser_{path.name}")  # gitignored
    notebook, _ = executed_notebook(path)  # what the headless run drew, as JupyterLab renders it
    nbformat.write(notebook, copy)
    try:
        browser.get(f"{url}/lab/tree/notebooks/{copy.name}?token={token}")
        wait_for(  # every cell, not the first ones JupyterLab has drawn so far
            lambda: len(cell_report(browser) or []) == len(notebook.cells),
            "every cell of the notebook to render",
            browser=browser,
        )
        in_widgets_only = [  # widget state is not restored without the kernel that made it
            i for i, c in enumerate(notebook.cells)
            if not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))
        ]  # fmt: skip
        assert_figures_are_images(browser, path.stem, skip=in_widgets_only)
    finally:
        leave_notebook(browser)
        remove_copy(copy)


def assert_figures_are_images(browser, name: str, skip=()) -> None:
    """Every cell tagged `figure` shows an image (waiting for widgets to draw), none a figure as
    text; `skip`: cell indices not to require an image from."""
    from tests.test_notebooks import smollm2_fetched

    def expected(report):
        return [
            i for i, cell in enumerate(report)
            if "figure" in cell["tags"] and i not in skip
            and not ("needs-smollm2" in cell["tags"] and not smollm2_fetched())
        ]  # fmt: skip

    def drawn():
        report = cell_report(browser)
        return report if report and all(report[i]["images"] for i in expected(report)) else None

    report = cell_report(browser) or []
    assert expected(report), f"{name}: no cell tagged 'figure'"
    report = wait_for(drawn, f"every figure of {name} to show as an image", browser=browser)
    assert [i for i, cell in enumerate(report) if cell["as_text"]] == []
