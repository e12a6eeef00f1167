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
fails when JupyterLab's process or the kernel dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import nbformat
import pytest

from tests.conftest import REPO_ROOT
from tests.notebook_runner import inject_parameters
from tests.test_notebooks import NOTEBOOKS, executed_notebook

pytestmark = [pytest.mark.slow, pytest.mark.notebook, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NOTEBOOK = REPO_ROOT / "notebooks" / "01_zero_variance.ipynb"
COPY = NOTEBOOK.with_name("_browser_01_zero_variance.ipynb")  # gitignored
SCREENSHOTS = REPO_ROOT / "notebooks" / "_figures" / "browser"
STORED = {"05_real_models"}
"""Notebooks checked with the outputs of their headless run rather than run in the browser."""
_DEAD: list[str] = []
"""Why waiting is pointless (set when JupyterLab's process or the kernel died)."""
SETTINGS = {
    # no "get notified about Jupyter news?" toast over the screenshot, no update check
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    # every cell in the DOM, not only the visible ones, so that all of them can be checked
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}


def wait_for(condition, what: str, every_s: float = 0.25, browser=None):
    """Poll `condition()` until it is truthy and return it, however long that takes; fail naming
    `what` when JupyterLab's process died or (given `browser`) the notebook's kernel did."""
    while True:
        value = condition()
        if value:
            return value
        if browser is not None and kernel_status(browser) == "dead":
            _DEAD.append("the kernel died")
        if _DEAD:
            pytest.fail(f"gave up waiting for {what}: {_DEAD[-1]}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token) of a JupyterLab started like `make lab`: root at the repository, opening
    on notebooks/, with its own config, runtime and settings folders."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium/chromedriver: install Debian's chromium and chromium-driver")
    pytest.importorskip("selenium", reason="selenium is a dev dependency: make setup installs it")
    home = tmp_path_factory.mktemp("lab")
    for name, values in SETTINGS.items():
        plugin, _, file = name.rpartition("/")
        path = home / "settings" / plugin / f"{file}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={token}",
               "--ServerApp.root_dir=.", "--LabApp.default_url=/lab/tree/notebooks",  # make lab
               f"--LabApp.user_settings_dir={home / 'settings'}",
               f"--LabApp.workspaces_dir={home / 'workspaces'}",
               "--LabApp.expose_app_in_browser=True"]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--allow-root")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}  # fmt: skip
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend, as in a person's JupyterLab
    log = open(home / "lab.log", "w")  # noqa: SIM115 (open while the server runs)
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                return r.status == 200
        except OSError:
            return server.poll() is not None and pytest.fail((home / "lab.log").read_text())

    def watch() -> None:  # a wait for the page must not outlive the server
        server.wait()
        _DEAD.append(f"JupyterLab exited ({(home / 'lab.log').read_text()[-2000:]})")

    threading.Thread(target=watch, daemon=True).start()

    wait_for(up, "JupyterLab to answer")
    yield url, token
    _DEAD.append("JupyterLab was stopped")  # (the watcher's line comes after this one)
    server.terminate()
    server.wait()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1500,1100", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


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
        COPY.unlink(missing_ok=True)
        (COPY.parent / ".ipynb_checkpoints" / f"{COPY.stem}-checkpoint.ipynb").unlink(
            missing_ok=True
        )


def kernel_status(browser) -> str | None:
    return browser.execute_script(
        "const w = window.jupyterapp && jupyterapp.shell.currentWidget;"
        "return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
        " ? w.sessionContext.session.kernel.status : null;"
    )


def click_menu(browser, menu: str, item: str) -> None:
    """Click `item` in the menu bar's `menu`, as a person would."""
    from selenium.webdriver.common.by import By

    browser.find_element(
        By.XPATH, f"//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='{menu}']"
    ).click()
    wait_for(
        lambda: browser.find_elements(
            By.XPATH, f"//div[contains(@class, 'lm-Menu-itemLabel') and text()='{item}']"
        ),
        f"the {item!r} menu item",
    )[0].click()


def all_cells_ran(browser) -> bool:
    """Every code cell shows an execution count (not [*] or blank) and the kernel is idle."""
    prompts = browser.execute_script(
        "return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
        ".map(e => e.textContent.trim())"
    )
    done = prompts and all(p.strip("[]: ").isdigit() for p in prompts)
    return bool(done) and kernel_status(browser) == "idle"


OTHERS = [p for p in NOTEBOOKS if p != NOTEBOOK]


@pytest.mark.parametrize("path", OTHERS, ids=[p.stem for p in OTHERS])
def test_every_notebook_shows_its_figures_as_images_in_the_browser(lab, browser, path):
    url, token = lab
    copy = path.with_name(f"_browser_{path.name}")  # gitignored
    if path.stem in STORED:  # what the headless run drew, as JupyterLab renders it
        notebook, _ = executed_notebook(path)
    else:
        notebook = inject_parameters(nbformat.read(path, as_version=4), {"SMALL": True})
    nbformat.write(notebook, copy)
    try:
        browser.get(f"{url}/lab/tree/notebooks/{copy.name}?token={token}")
        if path.stem in STORED:
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
        else:
            run_all_cells(browser)
            assert cell_errors(browser) == []
            assert_figures_are_images(browser, path.stem)
    finally:
        leave_notebook(browser)
        copy.unlink(missing_ok=True)
        (copy.parent / ".ipynb_checkpoints" / f"{copy.stem}-checkpoint.ipynb").unlink(
            missing_ok=True
        )


def leave_notebook(browser) -> None:
    """Mark the open notebook saved (no "leave the page?" dialog on the next page) and shut its
    kernel down, so that the next notebook starts on a quiet machine."""
    with contextlib.suppress(Exception):
        browser.execute_script(
            "const w = window.jupyterapp && jupyterapp.shell.currentWidget;"
            "if (w && w.context) { w.context.model.dirty = false; }"
            "if (window.jupyterapp) { jupyterapp.serviceManager.sessions.shutdownAll(); }"
        )


def run_all_cells(browser) -> None:
    """Run All from the Run menu once the kernel is up, and wait until every cell has run."""
    wait_for(lambda: kernel_status(browser) == "idle", "the kernel to start", browser=browser)
    click_menu(browser, "Run", "Run All Cells")
    wait_for(lambda: all_cells_ran(browser), "every cell to run", browser=browser)


def cell_errors(browser) -> list[str]:
    """`ename: evalue` of every error output in the open notebook."""
    return browser.execute_script(
        "const cells = jupyterapp.shell.currentWidget.content.model.cells;"
        "const found = [];"
        "for (let i = 0; i < cells.length; i++) {"
        "  const cell = cells.get(i);"
        "  if (cell.type !== 'code') continue;"
        "  for (let j = 0; j < cell.outputs.length; j++) {"
        "    const out = cell.outputs.get(j).toJSON();"
        "    if (out.output_type === 'error') found.push(out.ename + ': ' + out.evalue);"
        "  }"
        "}"
        "return found;"
    )


def cell_report(browser) -> list[dict] | None:
    """Per cell of the open notebook: its tags, the images its output area shows (widgets
    included) and whether a figure appears there as text."""
    return browser.execute_script(
        "const w = window.jupyterapp && jupyterapp.shell.currentWidget;"
        "if (!w || !w.content || !w.content.widgets.length) return null;"
        "return w.content.widgets.map(cell => {"
        "  const area = cell.node.querySelector('.jp-OutputArea');"
        "  const images = area ? [...area.querySelectorAll('img')]"
        "    .filter(img => img.src.startsWith('data:image/png') || img.src.startsWith('blob:'))"
        "    .length : 0;"
        "  return {tags: cell.model.getMetadata('tags') || [], images: images,"
        "          as_text: area ? area.innerText.includes('<Figure size') : false};"
        "});"
    )


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
