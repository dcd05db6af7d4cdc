"""Who can reach `flowsan explore` (issue 25, case 17): on 127.0.0.1 this machine only, as before; on any
other address Voila's own token is required (printed once), tracebacks stay in the log, and a warning says
the page runs a kernel. No browser: plain HTTP against a run whose explorer files are placeholders."""
from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowsan_lib.report import explore_app


def test_voila_requires_a_token_and_hides_tracebacks_off_the_loopback():
    local, exposed = (explore_app.voila_argv("nb.ipynb", 9000, ip) for ip in ("127.0.0.1", "0.0.0.0"))
    assert "--Voila.auto_token=False" in local and "--show_tracebacks=True" in local
    assert "--Voila.auto_token=True" in exposed and "--show_tracebacks=False" in exposed
    assert explore_app.is_loopback("127.0.0.1") and explore_app.is_loopback("localhost")
    assert not explore_app.is_loopback("0.0.0.0") and not explore_app.is_loopback("")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    return conn.getresponse()


@pytest.mark.slow          # a Voila server and its kernel: 30-60 s on 2 busy cores
def test_explore_on_all_addresses_requires_the_token_it_prints_once(tmp_path):
    pytest.importorskip("voila", reason="voila is not installed")
    run = tmp_path / "r"
    for stage, name in (("05_evaluate", "scores.npz"), ("04_flowsan", "outputs_test.npz")):
        (run / stage).mkdir(parents=True)
        (run / stage / name).write_bytes(b"")          # placeholders: only the server's gate is tested here
    port = _free_port()
    log = tmp_path / "voila.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flowsan_lib.cli", "explore", str(run), "--port", str(port),
                                   "--ip", "0.0.0.0"], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "JUPYTER_TOKEN": ""})
    try:
        deadline = time.time() + 120
        while not re.search(r"token=[0-9a-f]{16,}", log.read_text()):
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        token = re.search(r"token=([0-9a-f]{16,})", log.read_text()).group(1)
        bare = _get(port, "/")
        assert bare.status in (302, 403) and "/login" in (bare.getheader("Location") or "/login")
        assert _get(port, "/?token=0123456789abcdef0123").status in (302, 403)      # a wrong token
        page = _get(port, f"/?token={token}")
        body = page.read().decode(errors="replace")
        assert page.status == 200
        # the placeholder scores fail in the kernel (EOFError); on 127.0.0.1 the page shows that traceback
        assert "EOFError" not in body and "Traceback" not in body
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed after 60 s"
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert text.count(token) == 1, "the token must be printed once"
    assert "flowsan: warning: --ip 0.0.0.0 makes the explorer reachable from the network" in text


def test_the_default_stays_on_this_machine_without_a_token():
    from flowsan_lib.cli import parser
    a = parser().parse_args(["explore", "somerun"])
    assert a.ip == "127.0.0.1" and "--Voila.auto_token=False" in explore_app.voila_argv(Path("nb"), a.port, a.ip)
