"""The dashboard server's own protections (.streamlit/config.toml, issue 16 item 9): XSRF
and CORS stay on, it listens on 127.0.0.1, and a WebSocket whose Host header is not a
loopback name is refused, so a web page that rebinds its DNS name to 127.0.0.1 cannot
drive the dashboard from a visitor's browser. Checked in the file, as Streamlit reads it,
and against the real server (raw WebSocket handshakes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import streamlit_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".streamlit" / "config.toml"
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def test_config_keeps_the_protections_on():
    server = tomllib.loads(CONFIG.read_text())["server"]
    assert server["enableXsrfProtection"] is True
    assert server["enableCORS"] is True and server.get("corsAllowedOrigins", []) == []
    assert set(server["allowedHosts"]) == LOOPBACK and "*" not in server["allowedHosts"]
    assert server["address"] == "127.0.0.1"
    assert tomllib.loads(CONFIG.read_text())["browser"]["gatherUsageStats"] is False


def test_streamlit_reads_them_and_refuses_foreign_hosts():
    code = """
import json
from streamlit import config
config.get_config_options(force_reparse=True)
from streamlit.web.server.starlette.starlette_websocket import is_host_allowed
hosts = ["127.0.0.1:8501", "localhost:8501", "[::1]:8501", "LOCALHOST", "evil.example:8501",
         "127.0.0.1.evil.example", "localhost.evil.example:8501", "evil.example@127.0.0.1", ""]
print(json.dumps({"xsrf": config.get_option("server.enableXsrfProtection"),
                  "cors": config.get_option("server.enableCORS"),
                  "hosts": {h: is_host_allowed(h) for h in hosts}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["xsrf"] is True and got["cors"] is True
    assert got["hosts"] == {"127.0.0.1:8501": True, "localhost:8501": True, "[::1]:8501": True, "LOCALHOST": True,
                            "evil.example:8501": False, "127.0.0.1.evil.example": False,
                            "localhost.evil.example:8501": False, "evil.example@127.0.0.1": False, "": False}


def _handshake(port: int, host: str, origin: str | None = None) -> str:
    """The status line the server answers a WebSocket upgrade of /_stcore/stream with."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall((f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   + (f"Origin: {origin}\r\n" if origin else "") + "\r\n").encode())
        return s.recv(4096).decode("latin-1").split("\r\n")[0]


@pytest.mark.slow
def test_the_server_refuses_a_rebound_or_foreign_websocket(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()
    with streamlit_server(tmp_path / "data", tmp_path / "models", tmp_path / "streamlit.log") as url:
        port = int(url.rsplit(":", 1)[1])
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert " 101 " in _handshake(port, host, f"http://{host}"), host
        # DNS rebinding: the page's own name, now pointing at 127.0.0.1, is its origin and Host
        assert " 403 " in _handshake(port, f"evil.example:{port}", f"http://evil.example:{port}")
        # another site's page opening ws://127.0.0.1 (cross-site WebSocket hijacking)
        assert " 403 " in _handshake(port, f"127.0.0.1:{port}", "http://evil.example")
    log = (tmp_path / "streamlit.log").read_text()
    assert "Rejecting WebSocket connection" in log
    # judging the foreign Origin did not send the server off the machine (checkip.amazonaws.com)
    assert "external IP" not in log
