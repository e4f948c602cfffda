"""A real browser: `make lab` serves the notebooks, headless Chromium runs notebook 01 in JupyterLab, its
matplotlib figures show, and moving a slider of the mask explorer redraws its figure and its fractions line.

The server is started by `make lab` itself, so the browser sees what a reader gets: the same command line, the
same environment (no MPLBACKEND: a kernel inherits its server's environment, and with Agg every plt.show()
draws nothing). The test's port, token and settings go through a temporary Jupyter config dir and environment
variables, never through the command line.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`); Playwright drives it through
`executable_path` and never downloads a browser. Skipped, with the reason, when either is missing.
`test_make_lab_command_and_environment` needs neither and checks the same recipe with a stand-in jupyter.
Set IJEPA_VIZ_SCREENSHOT_DIR to keep the screenshots.
"""
import json
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
NOTEBOOK_URL_PATH = "01_masking.ipynb"  # `make lab` serves notebooks/
# plt.show() in notebook 01 in quick mode: the sample image, four masks, the size histograms (the mask explorers'
# images come from widgets and are not counted)
EXPECTED_FIGURES = 3
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LOAD_TIMEOUT_S = 120  # page load and JupyterLab start on a slow, shared machine
RUN_TIMEOUT_S = 240  # running every cell of the notebook, kernel start included
CHANGE_TIMEOUT_S = 60  # one slider change: a comm message, a redraw, a new PNG

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is missing: apt-get install -y chromium")
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is missing: `make lab` is what is tested")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_lab(venv: Path, env: dict) -> tuple[list[str], dict]:
    """`make lab` as a reader types it in a shell, for the environment `venv` (this interpreter's).

    The environment drops MPLBACKEND, which `make test` sets for the test processes, and the variables of an
    enclosing make. `-o` keeps make from reinstalling the package when pyproject.toml is newer than the stamp."""
    env = {k: v for k, v in env.items() if k not in ("MPLBACKEND", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    venv = venv.resolve()
    cmd = ["make", "--no-print-directory", "-o", f"{venv}/.installed", "lab"]
    if venv != (REPO / ".venv").resolve():  # another virtualenv or a conda environment
        cmd.append(f"VENV={venv}")
    return cmd, env


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`make lab` exited with code {proc.returncode} before serving; its log:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"`make lab` did not answer {url.split('?')[0]} within {timeout} s; its log:\n"
                f"{log.read_text()[-3000:]}")


@needs_make
def test_make_lab_command_and_environment(tmp_path):
    """The recipe of `make lab`, with a stand-in jupyter that records its arguments and environment: no MPLBACKEND
    reaches the server (its kernels would inherit it), and --allow-root is passed exactly when running as root."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    jupyter = venv / "bin" / "jupyter"
    jupyter.write_text('#!/bin/sh\nenv > "$0.env"\nprintf \'%s\\n\' "$PWD" "$@" > "$0.args"\n')
    jupyter.chmod(0o755)
    cmd, env = _make_lab(venv, os.environ)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    cwd, *args = (venv / "bin" / "jupyter.args").read_text().splitlines()
    lines = (venv / "bin" / "jupyter.env").read_text().splitlines()
    received = dict(line.split("=", 1) for line in lines if "=" in line)
    assert "MPLBACKEND" not in received, f"`make lab` sets MPLBACKEND={received['MPLBACKEND']}: figures vanish"
    assert Path(cwd) == REPO and args[0] == "lab" and args[-1] == "notebooks/", args
    assert ("--allow-root" in args) == (os.geteuid() == 0), args


@pytest.fixture
def jupyter_lab(tmp_path):
    """`make lab` on a free localhost port with a token; shut down after, kernels included."""
    port, token = _free_port(), os.urandom(16).hex()
    config = tmp_path / "config"  # read by jupyter lab in place of ~/.jupyter
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(json.dumps({
        "ServerApp": {"port": port, "port_retries": 0, "open_browser": False},
        "IdentityProvider": {"token": token},
    }))
    settings = tmp_path / "settings"  # no autosave: the notebook in the repository must stay without outputs
    for plugin, value in (("docmanager-extension/plugin", '{"autosave": false}'),
                          ("apputils-extension/notification", '{"fetchNews": "false"}')):
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    cmd, env = _make_lab(Path(sys.prefix), os.environ)
    env.update(IJEPA_VIZ_QUICK="1", OMP_NUM_THREADS="1", JUPYTER_CONFIG_DIR=str(config),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    log = tmp_path / "jupyter.log"
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
            os.killpg(proc.pid, signal.SIGTERM)  # make, the server and its kernels: the session we started
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


@pytest.mark.browser
@needs_chromium
@needs_make
def test_make_lab_shows_figures_and_slider_redraws(jupyter_lab, tmp_path):
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
            page.goto(f"{base}/lab/tree/{NOTEBOOK_URL_PATH}?token={token}", timeout=LOAD_TIMEOUT_S * 1000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=LOAD_TIMEOUT_S * 1000)
            _wait_kernel_idle(page, LOAD_TIMEOUT_S)  # "Run All Cells" before the kernel connects does nothing
            _run_all_cells(sync_api, page)
            _check_figures(sync_api, page, log, tmp_path)

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
                             .some(e => /\\[(\\d+|\\*)\\]/.test(e.textContent))""",
                timeout=30_000)
            return
        except sync_api.TimeoutError:
            page.keyboard.press("Escape")
    pytest.fail(f"Run > Run All Cells started no cell after {attempts} tries")


# The cell outputs of the notebook: mime type, whether a loaded <img> is in it, and the text of stderr outputs.
# Outputs inside a widget (the mask explorers' images) are not cell outputs of their own and are left out.
# textContent, not innerText: JupyterLab skips rendering off-screen cells, and their innerText is empty.
_OUTPUTS_JS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-Cell .jp-OutputArea-output'))
    .filter(o => !o.parentElement.closest('.jupyter-widgets, .jp-OutputArea-output'))
    .map(o => { const img = o.querySelector(':scope > img');
                return {mime: o.getAttribute('data-mime-type'), img: !!(img && img.complete && img.naturalWidth > 0),
                        text: /stderr|error/.test(o.getAttribute('data-mime-type') || '')
                              ? o.textContent.slice(0, 300) : null}; })"""


def _check_figures(sync_api, page, log: Path, tmp_path: Path) -> None:
    """Wait for Run All to finish (no cell left at [*]; after an error the rest go back to [ ]), then count the
    matplotlib figures: image/png cell outputs with a loaded <img>. With MPLBACKEND=Agg in the kernel's
    environment plt.show() draws nothing, and there are none."""
    try:
        page.wait_for_function(
            """() => { const p = Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
                                   .map(e => e.textContent);
                       return p.length > 0 && !p.some(t => /\\[\\*\\]/.test(t))
                              && p.some(t => /\\[\\d+\\]/.test(t)); }""",
            timeout=RUN_TIMEOUT_S * 1000)
    except sync_api.TimeoutError:
        _screenshot(page, tmp_path, "run_all_unfinished.png")
        prompts = page.evaluate("() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))"
                                ".map(e => e.textContent)")
        pytest.fail(f"Run All Cells did not finish within {RUN_TIMEOUT_S} s: prompts {prompts}, outputs "
                    f"{page.evaluate(_OUTPUTS_JS)} (screenshot in {tmp_path}); server log tail:\n"
                    f"{log.read_text()[-2000:]}")
    try:  # a data: URL decodes a moment after the output is attached
        page.wait_for_function(f"() => ({_OUTPUTS_JS})().filter(o => o.mime === 'image/png' && o.img).length "
                               f">= {EXPECTED_FIGURES}", timeout=10_000)
    except sync_api.TimeoutError:
        pass
    outputs = page.evaluate(_OUTPUTS_JS)
    figures = [o for o in outputs if o["mime"] == "image/png" and o["img"]]
    if len(figures) < EXPECTED_FIGURES:
        _screenshot(page, tmp_path, "figures_missing.png")
        stderr = [o["text"] for o in outputs if o["text"]]
        why = ("a cell raised" if any("Traceback" in t for t in stderr)
               else "is MPLBACKEND set in the kernel's environment?")
        pytest.fail(f"{NOTEBOOK} after Run All Cells shows {len(figures)} matplotlib figures, expected at least "
                    f"{EXPECTED_FIGURES} ({why}); cell outputs by mime type: "
                    f"{[o['mime'] for o in outputs]}; stderr and errors: {stderr} (screenshot in {tmp_path})")
