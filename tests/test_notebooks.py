"""Every notebook in notebooks/ runs top to bottom headless with small settings.

New notebooks are picked up automatically: they only need a cell tagged `parameters` that defines
`SMALL`. Their figures are saved under notebooks/_figures/<notebook>/ so they can be looked at.
"""

from __future__ import annotations

import json

import nbformat
import pytest

from tests.conftest import REPO_ROOT
from tests.notebook_runner import cell_outputs, cell_pngs, inject_parameters, run_notebook

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
FIGURE_DIR = NOTEBOOK_DIR / "_figures"
SMALL_SETTINGS = {"SMALL": True}
NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.glob("*.ipynb") if not p.name.startswith("_"))
"""The shipped notebooks (not the browser test's `_browser_*` copies)."""
_EXECUTED: dict[str, tuple] = {}


def executed_notebook(path):
    """Run a notebook once per test session (several tests read the same execution)."""
    if path.stem not in _EXECUTED:
        _EXECUTED[path.stem] = run_notebook(path, SMALL_SETTINGS, FIGURE_DIR)
    return _EXECUTED[path.stem]


def smollm2_fetched() -> bool:
    from agpo_lab.models.fetch import is_fetched

    return is_fetched("smollm2-135m-instruct")


def expected_figure_cells(notebook: nbformat.NotebookNode) -> list[int]:
    """Cells tagged `figure` (those tagged `needs-smollm2` too only when SmolLM2 is fetched)."""
    skip_model = not smollm2_fetched()
    return [
        i
        for i, cell in enumerate(notebook.cells)
        if "figure" in (tags := cell.metadata.get("tags", []))
        and not (skip_model and "needs-smollm2" in tags)
    ]


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_headless_and_draws_each_figure(path):
    executed, _ = executed_notebook(path)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    expected = expected_figure_cells(executed)
    assert expected, f"{path.name}: tag the cells that draw a figure with 'figure'"
    missing = [i for i in expected if not cell_pngs(executed, i)]
    assert not missing, f"{path.name}: no PNG in cells {missing}"
    as_text = [
        i
        for i in range(len(executed.cells))
        for o in cell_outputs(executed, i)
        if "<Figure size" in str(o.get("data", {}).get("text/plain", ""))
        and "image/png" not in o.get("data", {})
    ]
    assert not as_text, f"{path.name}: a figure shown as text in cells {as_text}"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_an_exported_html_shows_each_figure_as_an_image(path):
    """What `jupyter nbconvert --to html` makes of the executed notebook: every figure a cell
    shows itself is an <img>, none is the text `<Figure size ...>`. (Figures inside widgets, an
    `interact` or the live view, reach an HTML export only with the widget state saved, as for
    any ipywidgets notebook.)"""
    from nbconvert import HTMLExporter

    executed, _ = executed_notebook(path)
    html, _ = HTMLExporter().from_notebook_node(executed)
    images = [
        (i, o["data"]["image/png"])
        for i in expected_figure_cells(executed)
        for o in executed.cells[i].get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    for i, png in images:
        assert f'src="data:image/png;base64,{png}' in html, f"{path.name}: cell {i} in the HTML"
    assert "&lt;Figure size" not in html, f"{path.name}: a figure exported as text"


@pytest.mark.notebook
@pytest.mark.slow
def test_from_scratch_notebook_agrees_with_the_library():
    executed, _ = executed_notebook(NOTEBOOK_DIR / "04_from_scratch.ipynb")
    cell = next(c for c in executed.cells if "agreement" in c.metadata.get("tags", []))
    text = "".join(o.text for o in cell.outputs if o.output_type == "stream")
    agreement = json.loads(text.strip().splitlines()[-1])["agreement"]
    expected = {"grpo_advantage", "agpo_advantage", "agpo_length_reward"}
    assert expected | {f"loss/{a}" for a in ("seq_mean_token_mean", "token_mean")} <= set(agreement)
    assert all(diff < 1e-6 for diff in agreement.values()), agreement


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name} has stored outputs; clear them before committing"
            )
    assert any("parameters" in c["metadata"].get("tags", []) for c in notebook["cells"])


@pytest.mark.notebook
def test_runner_injects_small_settings_and_saves_figures(tmp_path):
    notebook = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("SMALL = False", metadata={"tags": ["parameters"]})
    plot = nbformat.v4.new_code_cell(
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "from IPython.display import Image, display\nimport io\n"
        "fig, ax = plt.subplots(); ax.plot([0, 1], [1, 2 if SMALL else 3])\n"
        "buf = io.BytesIO(); fig.savefig(buf, format='png'); display(Image(buf.getvalue()))\n"
        "print('small' if SMALL else 'full')"
    )
    notebook.cells = [params, plot]
    path = tmp_path / "probe.ipynb"
    nbformat.write(notebook, path)
    executed, figures = run_notebook(path, SMALL_SETTINGS, tmp_path / "figs")
    assert executed.cells[1].metadata["tags"] == ["injected-parameters"]
    stream = [o for o in executed.cells[2].outputs if o.output_type == "stream"]
    assert stream[0].text.strip() == "small"
    assert len(figures) == 1 and figures[0].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.notebook
def test_runner_gets_every_reply_after_output_widget_cells(tmp_path):
    # interact() draws into an Output widget, which makes nbclient send on the shell socket while
    # it waits there for the reply: nbclient's own client lost that reply in 8 of 19 such runs
    # (see BoundedPollChannel). Every cell must come back with its outputs.
    notebook = nbformat.v4.new_notebook()
    cells = ["SMALL = False", "from ipywidgets import IntSlider, interact"]
    cells += [
        f"_ = interact(lambda n: print('drawn', n * {i}), n=IntSlider(value=2))" for i in range(4)
    ]
    notebook.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    notebook.cells[0].metadata["tags"] = ["parameters"]
    path = tmp_path / "widgets.ipynb"
    nbformat.write(notebook, path)
    executed, _ = run_notebook(path, SMALL_SETTINGS, tmp_path / "figs")
    counts = [c.execution_count for c in executed.cells]
    assert counts == list(range(1, len(executed.cells) + 1))
    widget_state = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]
    printed = [
        o.get("text", "")
        for model in widget_state["state"].values()
        for o in model.get("state", {}).get("outputs", [])
    ]
    assert sorted(t.strip() for t in printed) == sorted(f"drawn {2 * i}" for i in range(4))


@pytest.mark.notebook
def test_notebook_tests_share_one_worker_under_make_test(request):
    # `make test` runs pytest-xdist with --dist loadgroup; the notebook group keeps every notebook
    # and browser test on one worker, so that each notebook is executed once per session. With
    # pytest 9.2 and pytest-xdist 3.8 the group was silently dropped (pytest-xdist#1386): each
    # worker executed notebook 05 itself and ran its own JupyterLab.
    if not request.config.getoption("loadgroup", default=False):
        pytest.skip("only under pytest -n --dist loadgroup (make test)")
    assert request.node.nodeid.endswith("@notebooks"), request.node.nodeid


def test_bounded_poll_channel_looks_again_until_a_message_comes(monkeypatch):
    import asyncio
    from queue import Empty

    from jupyter_client.channels import AsyncZMQSocketChannel

    from tests.notebook_runner import POLL_S, BoundedPollChannel

    polls = []

    async def inner_get_msg(self, timeout=None):
        polls.append(timeout)
        if len(polls) < 3:
            raise Empty
        return {"msg_type": "execute_reply"}

    monkeypatch.setattr(AsyncZMQSocketChannel, "get_msg", inner_get_msg)
    channel = BoundedPollChannel.__new__(BoundedPollChannel)
    assert asyncio.run(channel.get_msg())["msg_type"] == "execute_reply"
    assert polls == [POLL_S] * 3  # never one unbounded poll
    polls.clear()
    with pytest.raises(Empty):  # an explicit timeout is the caller's: passed through once
        asyncio.run(channel.get_msg(timeout=0.5))
    assert polls == [0.5]


def test_runner_requires_a_parameters_cell():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("x = 1")]
    with pytest.raises(ValueError, match="parameters"):
        inject_parameters(notebook, SMALL_SETTINGS)


def test_the_browser_timing_command_finds_the_run_folders_to_start_fresh():
    # `python tests/browser_session.py` points these at empty folders: a training cell resumes or
    # reuses the runs it finds, and the first run is what a user waits for
    from tests.browser_session import runs_dirs

    found = {path.stem: runs_dirs(path) for path in NOTEBOOKS}
    assert found["02_training_grpo_vs_agpo"] == ["RUNS_DIR"]
    assert found["05_real_models"] == ["SMOL_RUNS_DIR", "RUNS_DIR"]
    assert found["01_zero_variance"] == []
