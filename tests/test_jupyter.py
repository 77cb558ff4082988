"""The chapters open in Jupyter from the set-up the README describes: ``make lab`` starts
JupyterLab (``jupyter lab --ip=127.0.0.1 --no-browser book/``) from the project's environment.

This test starts that same server (``python -m jupyterlab`` is ``jupyter lab``) on localhost, on a
free port, with a token of its own and temporary Jupyter/IPython folders (the reader's own are not
touched), waits for ``GET /api/status``, starts the kernel the chapters name in their metadata
through the REST API, runs a cell over the kernel's websocket that imports ``efficientml``, and
checks its printed output and its ``execute_reply``. The kernel and the server are always shut
down, and the test checks that no process is left behind.

Skipped only where JupyterLab is not installed (``requirements.txt`` pins it; the project's
``.venv`` has it).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "book" / "01_learning_rates.ipynb"
TIMEOUT = 60  # seconds for the whole test: server start, kernel start (imports torch), one cell, shutdown
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (requirements.txt pins it)")
pytest.importorskip("jupyter_server", reason="jupyter_server is not installed here (requirements.txt pins "
                                             "jupyterlab, which brings it; `make setup` installs it)")
pytest.importorskip("jupyterlab", reason="JupyterLab is not installed here (requirements.txt pins it; `make setup` "
                                         "installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Process ids below ``pid`` (Linux /proc; elsewhere none are found and only the group is killed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        if not Path("/proc").is_dir():
            try:
                os.kill(pid, 0)
                return True
            except OSError:
                return False
        return False


def kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(os.getpgid(pid), sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.time() + 5
        while alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if not alive(pid):
            return


class JupyterLab:
    """``jupyter lab`` on 127.0.0.1 serving ``book/``, driven through its REST API."""

    def __init__(self, home: Path):
        self.port, self.token = free_port(), secrets.token_hex(24)
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                         ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                         ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces")]:
            env[var] = str(home / sub)
        env.pop("JUPYTER_TOKEN", None)
        self.log = open(home / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}", str(ROOT / "book")]
            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # as `make lab` does
            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.processes: set[int] = {self.proc.pid}  # the server, and the kernels it starts (their own sessions)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
            return json.loads(text) if text else None

    def wait_ready(self, deadline: float) -> dict:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}")
            try:
                return self.request("GET", "/api/status", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    raise TimeoutError("jupyter lab did not answer /api/status in time")
                time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def close(self) -> list[int]:
        """Shut the server down (its kernels with it); kill what is left. Returns the processes that were left."""
        if self.proc.poll() is None:
            self.processes |= descendants(self.proc.pid)
            try:
                self.request("POST", "/api/shutdown", timeout=5)
                self.proc.wait(15)
            except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
                pass
        deadline = time.time() + 10
        while any(alive(p) for p in self.processes) and time.time() < deadline:
            time.sleep(0.1)
        left = sorted(p for p in self.processes if alive(p))
        for pid in left:
            kill_group(pid)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        return left


def execute(ws, code: str, deadline: float) -> tuple[str, dict]:
    """Run ``code`` over a kernel's channels websocket: (its stdout, its execute_reply content)."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "channel": "shell", "buffers": [], "metadata": {}, "parent_header": {},
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": "5.3"},
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    stdout, reply, idle = [], None, False
    while reply is None or not idle:  # the reply (shell) and the kernel going idle (iopub, after every output)
        ws.settimeout(max(0.1, deadline - time.time()))
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "stream" and msg["content"]["name"] == "stdout":
            stdout.append(msg["content"]["text"])
        elif kind == "error":
            stdout.append("\n".join(msg["content"]["traceback"]))
        elif kind == "execute_reply":
            reply = msg["content"]
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    return "".join(stdout), reply


def test_chapter_kernel_runs_efficientml_in_jupyterlab(tmp_path):
    import efficientml
    from efficientml.data import data_root

    deadline = time.time() + TIMEOUT
    kernel_name = json.loads(CHAPTER.read_text())["metadata"]["kernelspec"]["name"]
    lab = JupyterLab(tmp_path)
    ws, left = None, []
    try:
        status = lab.wait_ready(deadline)
        assert "started" in status, status
        listing = lab.request("GET", "/api/contents/")
        assert CHAPTER.name in {f["name"] for f in listing["content"]}, "the server's root is not book/"
        assert kernel_name in lab.request("GET", "/api/kernelspecs")["kernelspecs"], \
            f"the chapters' kernel {kernel_name!r} is not available"

        kernel = lab.request("POST", "/api/kernels", {"name": kernel_name}, timeout=30)
        lab.processes |= descendants(lab.proc.pid)
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel['id']}/channels?token={lab.token}",
            timeout=max(1, deadline - time.time()), suppress_origin=True)
        lab.processes |= descendants(lab.proc.pid)
        out, reply = execute(ws, "import efficientml, efficientml.data\n"
                                 "print('efficientml', efficientml.__version__)\n"
                                 "print('data', efficientml.data.data_root())\n", deadline)
        assert reply["status"] == "ok", f"the cell failed: {reply}\n{out}"
        assert out.splitlines() == [f"efficientml {efficientml.__version__}", f"data {data_root()}"], out

        ws.close()
        ws = None
        lab.request("DELETE", f"/api/kernels/{kernel['id']}", timeout=15)
        assert kernel["id"] not in {k["id"] for k in lab.request("GET", "/api/kernels")}
    except Exception as e:
        raise AssertionError(f"{e}\n--- jupyter lab's log ---\n{lab.output()}") from e
    finally:
        if ws is not None:
            ws.close()
        left = lab.close()
    assert not left, f"processes left running after the server shut down (killed now): {left}"
