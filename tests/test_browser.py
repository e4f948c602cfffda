"""A real browser: JupyterLab in headless Chromium runs notebook 01, and moving a slider of the mask explorer
redraws its figure and its fractions line.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`); Playwright drives it through
`executable_path` and never downloads a browser. Skipped, with the reason, when either is missing.
Set IJEPA_VIZ_SCREENSHOT_DIR to keep the screenshots.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/01_masking.ipynb"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LOAD_TIMEOUT_S = 120  # page load and JupyterLab start on a slow, shared machine
RUN_TIMEOUT_S = 240  # running every cell of the notebook, kernel start included
CHANGE_TIMEOUT_S = 60  # one slider change: a comm message, a redraw, a new PNG

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with code {proc.returncode} before serving; its log:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"jupyter lab did not answer {url.split('?')[0]} within {timeout} s; its log:\n"
                f"{log.read_text()[-3000:]}")


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server on a free localhost port with a token, serving the repository; shut down after."""
    port, token = _free_port(), os.urandom(16).hex()
    settings = tmp_path / "settings"  # no autosave: the notebook in the repository must stay without outputs
    for plugin, value in (("docmanager-extension/plugin", '{"autosave": false}'),
                          ("apputils-extension/notification", '{"fetchNews": "false"}')):
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    env = dict(os.environ, IJEPA_VIZ_QUICK="1", JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               OMP_NUM_THREADS="1")
    env.pop("MPLBACKEND", None)  # let the kernel use its inline backend, as for a reader
    jupyter = Path(sys.executable).with_name("jupyter")
    log = tmp_path / "jupyter.log"
    cmd = [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={REPO}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           f"--LabApp.user_settings_dir={settings}",
           "--ServerApp.port_retries=0", "--allow-root"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log, LOAD_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}", token, log
    finally:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=10)
            proc.wait(timeout=30)
        except Exception:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its kernels: the session we started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=False)
    keep = os.environ.get("IJEPA_VIZ_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def test_mask_explorer_slider_redraws_in_jupyterlab(jupyter_lab, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    base, token, log = jupyter_lab
    stored = (REPO / NOTEBOOK).read_bytes()
    try:
        _drive(sync_api, base, token, log, tmp_path)
    finally:
        if (REPO / NOTEBOOK).read_bytes() != stored:
            (REPO / NOTEBOOK).write_bytes(stored)
            pytest.fail(f"JupyterLab saved {NOTEBOOK} during the test; restored the stored version")


def _drive(sync_api, base, token, log, tmp_path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", timeout=LOAD_TIMEOUT_S * 1000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=LOAD_TIMEOUT_S * 1000)
            _wait_kernel_idle(page, LOAD_TIMEOUT_S)  # "Run All Cells" before the kernel connects does nothing
            _run_all_cells(sync_api, page)

            explorer = page.locator(".ijepa-mask-explorer").first
            try:
                explorer.wait_for(state="visible", timeout=RUN_TIMEOUT_S * 1000)
            except sync_api.TimeoutError:
                _screenshot(page, tmp_path, "mask_explorer_missing.png")
                pytest.fail(f"the mask explorer widget did not appear within {RUN_TIMEOUT_S} s of Run All Cells "
                            f"(screenshot in {tmp_path}); server log tail:\n{log.read_text()[-2000:]}")
            explorer.scroll_into_view_if_needed()
            # the figure and the fractions, read fresh each time (an HTML widget replaces its content on change)
            state_js = """() => {
                const box = document.querySelector('.ijepa-mask-explorer');
                const img = box && box.querySelector('img');
                const frac = box && box.querySelector('.ijepa-fractions');
                return {src: img ? img.getAttribute('src') : null, loaded: !!(img && img.naturalWidth > 0),
                        text: frac ? frac.innerText : null};
            }"""
            page.wait_for_function(f"() => {{ const s = ({state_js})(); return s.loaded && s.text; }}",
                                   timeout=CHANGE_TIMEOUT_S * 1000)
            before = page.evaluate(state_js)
            assert "context" in before["text"] and "targets" in before["text"], before
            assert "4 blocks" in before["text"], before
            _screenshot(page, tmp_path, "mask_explorer_before.png")

            # move the "targets M" slider from 4 to 2 with the keyboard
            slider = explorer.locator(".widget-slider", has_text="targets M").locator(".noUi-handle").first
            slider.focus()
            slider.press("ArrowLeft")
            slider.press("ArrowLeft")
            try:
                page.wait_for_function(
                    f"""(b) => {{ const s = ({state_js})();
                                 return s.loaded && s.src !== b.src && s.text !== b.text
                                        && /2 blocks/.test(s.text); }}""",
                    arg=before, timeout=CHANGE_TIMEOUT_S * 1000)
            except sync_api.TimeoutError:
                _screenshot(page, tmp_path, "mask_explorer_unchanged.png")
                pytest.fail(f"moving the 'targets M' slider from 4 to 2 did not change the figure and the fractions "
                            f"within {CHANGE_TIMEOUT_S} s: before {before}, now {page.evaluate(state_js)} "
                            f"(screenshots in {tmp_path})")
            after = page.evaluate(state_js)
            assert after["src"] != before["src"] and after["text"] != before["text"]
            shot = _screenshot(page, tmp_path, "mask_explorer_after.png")
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def _wait_kernel_idle(page, timeout_s: float) -> None:
    """Wait until the status bar says the notebook's kernel is connected and idle ("Python 3 ... | Idle")."""
    page.wait_for_function(
        """() => Array.from(document.querySelectorAll('.jp-StatusBar-TextItem'))
                     .some(e => /\\|\\s*Idle/.test(e.innerText) && !/No Kernel/.test(e.innerText))""",
        timeout=timeout_s * 1000)


def _run_all_cells(sync_api, page, attempts: int = 3) -> None:
    """Run > Run All Cells, until the first code cell shows an execution count (retried: a click that lands
    while the kernel is still settling can be dropped)."""
    for attempt in range(attempts):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            page.wait_for_function(
                """() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
                             .some(e => /\\[(\\d+|\\*)\\]/.test(e.innerText))""",
                timeout=30_000)
            return
        except sync_api.TimeoutError:
            page.keyboard.press("Escape")
    pytest.fail(f"Run > Run All Cells started no cell after {attempts} tries")
