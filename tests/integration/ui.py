"""Run UI-format workflows through the real frontend in headless Chromium (ui_runner.mjs).

Needs node, npm (once, to install playwright-core; no browser is downloaded) and a
Chromium binary ($CHROMIUM_PATH, else `chromium` / `chromium-browser` on PATH).
playwright-core is installed once into $COMFY_IT_NODE_DIR, default
<tempdir>/comfy-it-node, outside the repository.
"""
import json
import os
import shutil
import subprocess
import tempfile

PLAYWRIGHT_VERSION = "1.64.1"
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui_runner.mjs")


def node_dir():
    return os.environ.get("COMFY_IT_NODE_DIR") or os.path.join(tempfile.gettempdir(), "comfy-it-node")


def chromium_path():
    return os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")


def _installed_version():
    try:
        with open(os.path.join(node_dir(), "node_modules", "playwright-core", "package.json")) as f:
            return json.load(f).get("version")
    except (OSError, ValueError):
        return None


def ui_unavailable_reason():
    """Why UI runs cannot work on this machine, or None."""
    if not shutil.which("node"):
        return "node is not installed"
    if not chromium_path():
        return "no Chromium found (set CHROMIUM_PATH)"
    if _installed_version() != PLAYWRIGHT_VERSION and not shutil.which("npm"):
        return "playwright-core is not installed in {} and npm is missing".format(node_dir())
    return None


def ensure_playwright():
    """Install playwright-core into node_dir() unless that version is already there."""
    if _installed_version() == PLAYWRIGHT_VERSION:
        return node_dir()
    os.makedirs(node_dir(), exist_ok=True)
    subprocess.run(["npm", "install", "--prefix", node_dir(), "--no-audit", "--no-fund", "--loglevel=error",
                    "playwright-core@" + PLAYWRIGHT_VERSION], check=True, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, timeout=300)
    if _installed_version() != PLAYWRIGHT_VERSION:
        raise RuntimeError("npm did not install playwright-core {} into {}".format(PLAYWRIGHT_VERSION, node_dir()))
    return node_dir()


def run_ui_workflow(server, workflow_path, out_dir, timeout=300):
    """Load, queue and wait for one UI-format workflow on `server` (a ComfyServer or URL).

    Returns the runner's report: {ok, status, prompt_id, error, dialogs, page_errors,
    console_errors, missing_nodes, blocked_requests, http_errors, screenshot, images, ...}.
    ok means: it ran to success and every node type was known."""
    url = getattr(server, "url", server)
    env = dict(os.environ, PLAYWRIGHT_DIR=ensure_playwright(), CHROMIUM_PATH=chromium_path() or "chromium")
    cmd = ["node", RUNNER, "--server", url, "--workflow", os.fspath(workflow_path), "--out", os.fspath(out_dir),
           "--timeout", str(timeout)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 180)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "status": "runner_timeout", "error": "ui_runner.mjs did not exit: {}".format(e)}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {"ok": False, "status": "runner_error", "error": "no report (exit {}):\n{}\n{}".format(
        proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])}
