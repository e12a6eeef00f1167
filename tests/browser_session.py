"""JupyterLab as `make lab` starts it, driven in headless Chromium: the pieces the browser test
uses, and a command that times notebooks in the browser as a person runs them.

`python tests/browser_session.py notebooks/0*.ipynb [--small]` opens each notebook in JupyterLab,
clicks Run > Run All Cells and prints the wall time from the click until every cell has run and the
kernel is idle, the slowest cells (JupyterLab's own execution timing) and the errors, if any.
Needs Debian's chromium and chromium-driver and the dev dependencies (`make setup`).

No wait has a time limit: a slow machine is not a hung one; a wait fails when JupyterLab's process
or the notebook's kernel dies.
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
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import nbformat

from agpo_lab import GOMP_SPINCOUNT

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SETTINGS = {
    # no "get notified about Jupyter news?" toast over the screenshot, no update check
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    # every cell in the DOM, not only the visible ones, so that all of them can be checked; each
    # cell's start and end time in its metadata, for the timing command
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "recordTiming": True},
}
DEAD: list[str] = []
"""Why waiting is pointless (set when JupyterLab's process or the kernel died)."""


class GaveUp(RuntimeError):
    """A wait that cannot end: JupyterLab's process or the notebook's kernel died."""


def wait_for(condition: Callable, what: str, every_s: float = 0.25, browser=None):
    """Poll `condition()` until it is truthy and return it, however long that takes; raise
    GaveUp naming `what` when JupyterLab's process died or (given `browser`) the kernel did."""
    while True:
        value = condition()
        if value:
            return value
        if browser is not None and kernel_status(browser) == "dead":
            DEAD.append("the kernel died")
        if DEAD:
            raise GaveUp(f"gave up waiting for {what}: {DEAD[-1]}")
        time.sleep(every_s)


def missing_browser() -> str | None:
    """Why the browser cannot be driven here, or None."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "no chromium/chromedriver: install Debian's chromium and chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is a dev dependency: make setup installs it"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(home: Path) -> Iterator[tuple[str, str]]:
    """(base url, token) of a JupyterLab started like `make lab`: root at the repository, opening
    on notebooks/, with its own config, runtime and settings folders under `home`."""
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
    env = {"GOMP_SPINCOUNT": GOMP_SPINCOUNT, **os.environ,  # the kernels' threads, as make lab
           "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}  # fmt: skip
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend, as in a person's JupyterLab
    log_path = home / "lab.log"
    log = open(log_path, "w")  # noqa: SIM115 (open while the server runs)
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:  # one probe; a slow answer is only a failed probe, wait_for asks again
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def watch() -> None:  # a wait for the page must not outlive the server
        server.wait()
        DEAD.append(f"JupyterLab exited ({log_path.read_text()[-2000:]})")

    threading.Thread(target=watch, daemon=True).start()
    try:
        wait_for(up, "JupyterLab to answer")
        yield url, token
    finally:
        DEAD.append("JupyterLab was stopped")  # (the watcher's line comes after this one)
        server.terminate()
        server.wait()
        log.close()


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium driven by Selenium through the system chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1500,1100", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


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


def run_all_cells(browser) -> float:
    """Run All from the Run menu once the kernel is up, wait until every cell has run; return the
    seconds from the click to then."""
    wait_for(lambda: kernel_status(browser) == "idle", "the kernel to start", browser=browser)
    clicked = time.perf_counter()
    click_menu(browser, "Run", "Run All Cells")
    wait_for(lambda: all_cells_ran(browser), "every cell to run", browser=browser)
    return time.perf_counter() - clicked


def leave_notebook(browser) -> None:
    """Mark the open notebook saved (no "leave the page?" dialog on the next page) and shut its
    kernel down, so that the next notebook starts on a quiet machine."""
    with contextlib.suppress(Exception):
        browser.execute_script(
            "const w = window.jupyterapp && jupyterapp.shell.currentWidget;"
            "if (w && w.context) { w.context.model.dirty = false; }"
            "if (window.jupyterapp) { jupyterapp.serviceManager.sessions.shutdownAll(); }"
        )


def remove_copy(copy: Path) -> None:
    copy.unlink(missing_ok=True)
    (copy.parent / ".ipynb_checkpoints" / f"{copy.stem}-checkpoint.ipynb").unlink(missing_ok=True)


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


def cell_seconds(browser) -> list[float | None]:
    """Per cell of the open notebook: the seconds from JupyterLab sending it to the kernel to its
    reply (`recordTiming`), None for markdown or a cell not run."""
    stamps = browser.execute_script(
        "const cells = jupyterapp.shell.currentWidget.content.model.cells; const out = [];"
        "for (let i = 0; i < cells.length; i++) {"
        "  const e = cells.get(i).getMetadata('execution') || {};"
        "  out.push([e['iopub.execute_input'] || null, e['shell.execute_reply'] || null]);"
        "}"
        "return out;"
    )
    return [
        (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        if start and end
        else None
        for start, end in stamps
    ]


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


def time_in_browser(
    browser, url: str, token: str, path: Path, overrides: dict, check: Callable | None = None
) -> dict:
    """Run notebook `path` (with `overrides` injected after its parameters cell, if any) from the
    Run menu; its wall time, the slowest cells and the errors. `check(browser)` runs while the
    notebook is still open, after every cell has run."""
    from tests.notebook_runner import inject_parameters

    notebook = nbformat.read(path, as_version=4)
    if overrides:
        notebook = inject_parameters(notebook, overrides)
    copy = path.with_name(f"_browser_{path.name}")  # gitignored
    nbformat.write(notebook, copy)
    try:
        browser.get(f"{url}/lab/tree/notebooks/{copy.name}?token={token}")
        seconds = run_all_cells(browser)
        per_cell = cell_seconds(browser)
        errors = cell_errors(browser)
        if check is not None:
            check(browser)
    finally:
        leave_notebook(browser)
        remove_copy(copy)
    slowest = sorted(((s, i) for i, s in enumerate(per_cell) if s is not None), reverse=True)
    return {"notebook": path.stem, "seconds": seconds, "slowest": slowest[:3], "errors": errors}


def runs_dirs(path: Path) -> list[str]:
    """The parameters of notebook `path` that name a folder its training runs go to (*RUNS_DIR)."""
    import ast

    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assigned = [
        target.id
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    ]
    return [name for name in assigned if name.endswith("RUNS_DIR")]


def main() -> None:
    """Time notebooks in JupyterLab in headless Chromium, as a person runs them (Run All)."""
    import argparse
    import ast

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--small", action="store_true", help="inject SMALL = True (the tests)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="more parameters, values as Python literals (STEPS=80)")  # fmt: skip
    args = parser.parse_args()
    if (why := missing_browser()) is not None:
        raise SystemExit(f"browser_session: {why}")
    overrides = {"SMALL": True} if args.small else {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = ast.literal_eval(value)
    failed = False
    with (
        tempfile.TemporaryDirectory() as home,
        jupyterlab(Path(home)) as (url, token),
        chromium() as browser,
    ):
        for path in args.notebooks:
            # a training cell resumes or reuses the runs in its RUNS_DIR: time a first run
            fresh = {name: str(Path(home) / "runs" / path.stem / name) for name in runs_dirs(path)}
            result = time_in_browser(browser, url, token, path.resolve(), {**overrides, **fresh})
            minutes, seconds = divmod(round(result["seconds"]), 60)
            slowest = ", ".join(f"cell {i} {s:.1f} s" for s, i in result["slowest"])
            print(f"{path.name}: {minutes} min {seconds} s in the browser "
                  f"(slowest: {slowest}); {len(result['errors'])} errors {result['errors'] or ''}",
                  flush=True)  # fmt: skip
            failed |= bool(result["errors"])
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
