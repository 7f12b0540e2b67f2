"""The explorer notebooks (08, 09) in a real JupyterLab, driven by headless Chromium (Playwright).

As a user does after ``make demo``: a workbook folder (``$MUVA_HOME``: ``configs/`` with a tiny
``synth_A2B.yaml``, the real ``notebooks/08_part_mask_explorer.ipynb``) gets a trained tiny model in its
default run folder; JupyterLab is started on it with ``muva lab``'s command line (served from the
project root, kernels start in ``notebooks/``); Chromium opens notebook 08 unchanged, runs all cells with
the default parameters, finds the pseudo-label IoU in the explorer, screenshots the image, moves the
threshold slider with the keyboard and checks that the screenshot changes. Notebook 09 (the retrieval
explorer) the same way: run all, choose another query, and the ranked list follows. Nothing may be written
under ``notebooks/``.

Needs the Debian package ``chromium`` (``apt-get install -y chromium``) and the Python package
``playwright`` (``pip install playwright``; its own browser download, ``playwright install``, is not
used: the system Chromium is launched). Missing either is a failure, not a skip.
"""
from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "08_part_mask_explorer.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IMAGE = "img.muva-explorer-image"
SLIDER = ".muva-explorer-threshold"


TINY_DEMO = """
# the demo's protocol at test size (the workbook folder of the browser test)
synth_scale: small
backbone: tiny
pretrained: none
stage1_epochs: 1
stage1_warmup_epochs: 0
stage1_batch_ids: 4
stage2_epochs: 1
warmup_epochs: 0
lr_milestones: [1]
batch_size: 16
num_workers: 0
device: cpu
"""


def _workbook(home: Path, notebooks) -> Path:
    """A workbook folder like a fresh clone's, with the demo config shrunk to test size."""
    (home / "configs").mkdir(parents=True)
    (home / "notebooks").mkdir()
    (home / "configs" / "synth_A2B.yaml").write_text((ROOT / "configs" / "synth_A2B.yaml").read_text() + TINY_DEMO)
    (home / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for notebook in notebooks:
        (home / "notebooks" / notebook.name).write_bytes(notebook.read_bytes())
    return home


def _require_browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: this test drives the system Chromium; install it with "
                    "`apt-get update && apt-get install -y chromium` (Debian/Ubuntu; CI does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing: `pip install playwright` "
                    "(do not run `playwright install`; the test uses /usr/bin/chromium)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"jupyter lab did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_server(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut the server down through its API (which stops its kernels), then by signal if it lingers."""
    if proc.poll() is None:
        try:
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST", data=b"")
            urllib.request.urlopen(req, timeout=5).close()
        except OSError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


RETRIEVAL = ROOT / "notebooks" / "09_retrieval_explorer.ipynb"
RANKED = "img.muva-retrieval-image"
QUERY = ".muva-retrieval-query select"


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    """A workbook folder holding notebooks 08 and 09 and the tiny demo's trained run (what `make demo` leaves
    behind), shared by the two notebooks' tests."""
    from muva_core.config import resolve_config
    from muva_core.runs import train_protocol

    home = _workbook(tmp_path_factory.mktemp("lab") / "workbook", [NOTEBOOK, RETRIEVAL])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUVA_HOME", str(home))
        result = train_protocol(resolve_config("synth:A2B"), progress=False)
    assert result.run_dir.parent == home / "reports" / "synth_A2B"
    return home


def _in_jupyterlab(home: Path, tmp_path: Path, notebook: str, interact):
    """Start JupyterLab on ``home`` with `muva lab`'s command line, open ``notebooks/<notebook>`` in Chromium, run
    all its cells with the default parameters, then ``interact(page)``; returns what it returns. Checks that
    nothing was written under notebooks/."""
    sync_playwright = _require_browser()
    from muva_core.cli import lab_command

    def listing():
        return sorted(p.name for p in (home / "notebooks").rglob("*") if ".ipynb_checkpoints" not in p.parts)

    notebooks_before = listing()
    port, token = _free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    jupyter = tmp_path / "jupyter"
    env = {**os.environ, "MUVA_HOME": str(home), "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
           "JUPYTER_DATA_DIR": str(jupyter / "data"), "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
           "IPYTHONDIR": str(jupyter / "ipython"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "jupyter.log"
    command = lab_command(port, ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
                                 "--ServerApp.port_retries=0", "--ServerApp.terminals_enabled=False",
                                 "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
                                 f"--LabApp.workspaces_dir={jupyter / 'workspaces'}"]
                          + (["--allow-root"] if os.geteuid() == 0 else []))
    assert f"--ServerApp.root_dir={home}" in command      # `make lab` serves the project root
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=str(home), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{base}/lab/tree/notebooks/{notebook}?token={token}", timeout=60_000)
                page.wait_for_function(
                    "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                    " && window.jupyterapp.shell.currentWidget.sessionContext", timeout=60_000)
                page.evaluate("""async () => {
                    const panel = window.jupyterapp.shell.currentWidget;
                    await panel.sessionContext.ready;
                    await window.jupyterapp.commands.execute('notebook:run-all-cells');
                }""")
                result = interact(page)
                page.screenshot(path=str(tmp_path / "page.png"))
            finally:
                browser.close()
    finally:
        _stop_server(proc, base, token)
    assert listing() == notebooks_before, "the notebook's kernel wrote under notebooks/"
    return result


def _wait_for_image(page, selector: str, old_src: str | None = None) -> None:
    """Until the widget image ``selector`` shows a loaded PNG (another one than ``old_src`` when given)."""
    changed = "i.src !== old && " if old_src is not None else ""
    page.wait_for_function(f"(old) => {{ const i = document.querySelector('{selector}');"
                           f" return i && {changed}i.complete && i.naturalWidth > 100; }}", arg=old_src,
                           timeout=90_000 if old_src is None else 30_000)


@pytest.mark.slow
def test_explorer_notebook_in_jupyterlab(tiny_demo, tmp_path, monkeypatch):
    home = tiny_demo
    monkeypatch.setenv("MUVA_HOME", str(home))

    def interact(page):
        image = page.locator(IMAGE).first
        image.wait_for(state="visible", timeout=90_000)
        _wait_for_image(page, IMAGE)
        # the pseudo labels were found (the IoU table compares the prediction with them)
        page.wait_for_function("() => document.body.innerText.includes('vs pseudo')", timeout=30_000)
        before_src = image.get_attribute("src")
        first = image.screenshot()
        readout = page.locator(f"{SLIDER} .widget-readout").first
        start_value = float(readout.inner_text() or readout.input_value())
        handle = page.locator(f"{SLIDER} .noUi-handle").first
        handle.focus()
        for _ in range(20):                      # 20 steps of 0.01 down
            page.keyboard.press("ArrowLeft")
        _wait_for_image(page, IMAGE, before_src)
        page.wait_for_timeout(300)               # the last key's render may still be on its way
        value = float(readout.inner_text() or readout.input_value())
        return first, image.screenshot(), start_value, value

    first, second, start_value, value = _in_jupyterlab(home, tmp_path, NOTEBOOK.name, interact)
    (tmp_path / "before.png").write_bytes(first)     # kept for a look when the test fails
    (tmp_path / "after.png").write_bytes(second)
    a, b = _png_array(first), _png_array(second)
    assert a.shape[0] > 100 and a.shape[1] > 100, f"the explorer image is too small: {a.shape}"
    assert a.std() > 10 and len(np.unique(a.reshape(-1, 3), axis=0)) > 50, "the first screenshot is blank"
    assert value < start_value, f"the threshold slider did not move ({start_value} -> {value})"
    assert a.shape == b.shape and np.abs(a - b).max() > 50, "moving the threshold slider did not change the image"


@pytest.mark.slow
def test_retrieval_notebook_in_jupyterlab(tiny_demo, tmp_path, monkeypatch):
    """Notebook 09 after a tiny demo, opened as `make lab` does: run all cells, change the query in the widget,
    and the ranked list (its image and its caption) follows."""
    home = tiny_demo
    monkeypatch.setenv("MUVA_HOME", str(home))

    def interact(page):
        image = page.locator(RANKED).first
        image.wait_for(state="visible", timeout=120_000)
        _wait_for_image(page, RANKED)
        select = page.locator(QUERY).first
        options = select.locator("option").all_inner_texts()
        before = (image.get_attribute("src"), image.screenshot(), page.locator(".widget-html").first.inner_text(),
                  select.input_value())
        select.select_option(index=len(options) - 1)        # the last query of the list (sorted by AP)
        _wait_for_image(page, RANKED, before[0])
        page.wait_for_timeout(300)
        after = (image.screenshot(), page.locator(".widget-html").first.inner_text(), select.input_value())
        return options, before, after

    options, before, after = _in_jupyterlab(home, tmp_path, RETRIEVAL.name, interact)
    (tmp_path / "before.png").write_bytes(before[1])
    (tmp_path / "after.png").write_bytes(after[0])
    assert len(options) > 1 and all("AP" in o or "no match" in o for o in options), options
    assert before[3] != after[2], "the query did not change"
    assert before[2] != after[1] and "AP" in after[1], "the caption did not follow the query"
    a, b = _png_array(before[1]), _png_array(after[0])
    assert a.shape[0] > 100 and a.std() > 10, "the ranked list is blank"
    assert a.shape != b.shape or np.abs(a - b).max() > 50, "changing the query did not change the ranked list"
