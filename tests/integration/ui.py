"""The MLflow UI as a logged-in user's browser sees it: headless Chromium, and a loopback proxy that adds
the stack's MLflow login to every request (a user types it once into the browser's prompt; a headless
browser cannot, and a login in the URL makes the UI's own fetches fail)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}


def chromium_flags(profile: Path) -> list[str]:
    """Headless Chromium that makes no request beyond the page it is given."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (bash infra/setup.sh --test installs it)"
    return [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=20000",
    ]  # fmt: skip


@contextlib.contextmanager
def logged_in(env: dict[str, str]) -> Iterator[str]:
    """A base URL on 127.0.0.1 that serves the stack's MLflow (``env``) with its login added."""
    target = urlparse(env["MLFLOW_TRACKING_URI"])
    host, port = target.hostname, target.port
    login = f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}"
    auth = "Basic " + base64.b64encode(login.encode()).decode()
    origin = f"http://{host}:{port}"

    class Forward(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host", "authorization"}}
            # As if the page came from MLflow itself: its Host and CORS checks see its own origin.
            headers |= {"Host": f"{host}:{port}", "Authorization": auth}
            if "Origin" in headers:
                headers["Origin"] = origin
            conn = http.client.HTTPConnection(host, port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
            finally:
                conn.close()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
