"""A throwaway ComfyUI server for integration tests (standard library only).

    with comfy_server(custom_nodes=[pack_dir], models_dir=models) as srv:
        history = srv.wait(srv.post_prompt(api_json), timeout=120)
        images = srv.output_images(history)

Every start gets a fresh temp base directory (input, output, temp, user, custom_nodes,
SQLite DB), listens on a free port on 127.0.0.1 only, and is stopped on exit: SIGTERM to
its own PID, SIGKILL after 15 s.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from . import comfy_env

HOST = "127.0.0.1"
BASE_ARGS = ["--cpu", "--disable-auto-launch", "--disable-api-nodes", "--log-stdout"]

# Seeded into the fresh user dir so the frontend opens straight onto the graph: no
# first-run template browser, no update toasts. Frontend 1.27.x also throws "Cannot read
# properties of undefined (reading 'id')" at startup unless the three canvas navigation
# values it would write while registering settings are already stored.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Notification.ShowVersionUpdates": False,
    "Comfy.InstalledVersion": "1.27.10",
    "Comfy.Canvas.NavigationMode": "legacy",
    "Comfy.Canvas.LeftMouseClickBehavior": "panning",
    "Comfy.Canvas.MouseWheelScroll": "zoom",
}


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: validation failed (unknown node, missing model, bad input)."""


class PromptFailed(RuntimeError):
    """The prompt ran and a node raised."""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _error_summary(messages):
    for kind, data in messages or []:
        if kind == "execution_error":
            return "node {} ({}) raised {}: {}\n{}".format(
                data.get("node_id"), data.get("node_type"), data.get("exception_type"),
                data.get("exception_message"), "".join(data.get("traceback") or [])[-2000:])
        if kind == "execution_interrupted":
            return "interrupted at node {} ({})".format(data.get("node_id"), data.get("node_type"))
    return "no execution_error message in history"


class ComfyServer:
    """A running server; made by comfy_server()."""

    def __init__(self, proc, port, base_dir, log_path):
        self.proc, self.port, self.base_dir, self.log_path = proc, port, base_dir, log_path
        self.url = "http://{}:{}".format(HOST, port)
        self.startup_s = None

    # -- plumbing
    def request(self, path, data=None, timeout=30, raw=False):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = r.read()
        return out if raw else (json.loads(out) if out else None)

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- API
    def object_info(self, node_class=None):
        return self.request("/object_info" + ("/" + urllib.parse.quote(node_class) if node_class else ""))

    def free(self):
        """Drop cached node outputs and loaded models, so the next prompt runs every node."""
        self.request("/free", {"unload_models": True, "free_memory": True})
        time.sleep(1.0)  # the worker applies the flag when it next wakes up

    def post_prompt(self, api_json):
        """Queue an API-format prompt ({...} or {"prompt": {...}}); its prompt_id."""
        prompt = api_json.get("prompt", api_json) if isinstance(api_json, dict) else api_json
        try:
            resp = self.request("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as e:
            raise PromptRejected("prompt rejected ({}): {}".format(e.code, e.read().decode(errors="replace"))) from None
        return resp["prompt_id"]

    def wait(self, prompt_id, timeout=300):
        """The /history entry of a finished prompt; PromptFailed on an execution error,
        TimeoutError (after interrupting it) when it does not finish in time."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited with code {}\n{}".format(self.proc.returncode, self.log_tail()))
            entry = (self.request("/history/" + prompt_id) or {}).get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("status_str") == "success" and status.get("completed"):
                return entry
            if status.get("status_str") == "error":
                raise PromptFailed(_error_summary(status.get("messages")))
            time.sleep(0.2)
        running = [q[1] for q in self.request("/queue").get("queue_running", [])]
        if prompt_id in running:
            self.request("/interrupt", {"prompt_id": prompt_id})
        else:
            self.request("/queue", {"delete": [prompt_id]})
        raise TimeoutError("prompt {} did not finish in {}s\n{}".format(prompt_id, timeout, self.log_tail()))

    def run(self, api_json, timeout=300):
        return self.wait(self.post_prompt(api_json), timeout)

    def output_images(self, history):
        """Local paths of every image the history entry lists (output and temp/preview)."""
        paths = []
        for node_out in (history.get("outputs") or {}).values():
            for img in node_out.get("images") or []:
                root = os.path.join(self.base_dir, img.get("type") or "output")
                paths.append(os.path.join(root, img.get("subfolder") or "", img["filename"]))
        return paths


def _extra_model_paths(models_dir, custom_nodes_dir):
    # JSON strings are valid YAML double-quoted scalars: no quoting surprises in temp paths
    lines = ["integration_tests:"]
    if models_dir:
        for kind in ("checkpoints", "loras", "controlnet", "clip_vision", "vae"):
            lines.append("    {}: {}".format(kind, json.dumps(os.path.join(os.path.abspath(models_dir), kind))))
    lines.append("    custom_nodes: {}".format(json.dumps(custom_nodes_dir)))
    return "\n".join(lines) + "\n"


def _prepare(work, comfy_dir, custom_nodes, models_dir):
    base = os.path.join(work, "base")
    for sub in ("input", "output", "temp", "user/default", "custom_nodes", "models"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    shipped_inputs = os.path.join(comfy_dir, "input")  # example.png, for LoadImage graphs
    if os.path.isdir(shipped_inputs):
        for name in os.listdir(shipped_inputs):
            if os.path.isfile(os.path.join(shipped_inputs, name)):
                shutil.copy2(os.path.join(shipped_inputs, name), os.path.join(base, "input", name))
    with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
        json.dump(FRONTEND_SETTINGS, f, indent=1)
    nodes_dir = os.path.join(work, "custom_nodes")
    os.makedirs(nodes_dir)
    for entry in custom_nodes:
        name, src = entry if isinstance(entry, (tuple, list)) else (None, entry)
        src = os.path.abspath(os.fspath(src))
        os.symlink(src, os.path.join(nodes_dir, name or os.path.basename(src.rstrip(os.sep))))
    config = os.path.join(work, "extra_model_paths.yaml")
    with open(config, "w") as f:
        f.write(_extra_model_paths(models_dir, nodes_dir))
    return base, config


def _stop(proc, grace=15):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def comfy_server(custom_nodes=(), models_dir=None, extra_args=(), ready_timeout=120, keep_dir=None):
    """Start ComfyUI from $COMFYUI_PATH; yield a ComfyServer; stop it on exit.

    custom_nodes: pack folders (or (link_name, folder) pairs) symlinked into a fresh
    custom_nodes dir; models_dir: folder with checkpoints/ loras/ controlnet/ ...
    The Python is $COMFYUI_PYTHON, else this interpreter. The temp dir is removed on a
    clean exit and kept (its path printed) when the body raised, or if keep_dir is true
    or $COMFY_IT_KEEP is set."""
    reason = comfy_env.missing_reason()
    if reason:
        raise RuntimeError(reason)
    comfy_dir = comfy_env.comfy_path()
    work = tempfile.mkdtemp(prefix="comfy-it-server-")
    base, config = _prepare(work, comfy_dir, custom_nodes, models_dir)
    port = free_port()
    log_path = os.path.join(work, "server.log")
    cmd = [os.environ.get("COMFYUI_PYTHON") or sys.executable, "main.py", "--listen", HOST, "--port", str(port),
           *BASE_ARGS, "--base-directory", base, "--extra-model-paths-config", config,
           "--database-url", "sqlite:///" + os.path.join(work, "comfyui.db"), *extra_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    srv = ComfyServer(proc, port, base, log_path)
    failed = True
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ComfyUI exited with code {} during startup\n{}".format(
                    proc.returncode, srv.log_tail()))
            try:
                srv.request("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.time() - t0 > ready_timeout:
                    raise TimeoutError("ComfyUI not ready after {}s\n{}".format(ready_timeout, srv.log_tail()))
                time.sleep(0.25)
        srv.startup_s = time.time() - t0
        yield srv
        failed = False
    finally:
        _stop(proc)
        if failed or keep_dir or os.environ.get("COMFY_IT_KEEP"):
            print("comfy_server: kept {} (log: {})".format(work, log_path), file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
