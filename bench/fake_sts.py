#!/usr/bin/env python3
"""A minimal stand-in for Google STS (`POST /v1/token`, token exchange) for the cache-hit
benchmark in run.sh. It is not the tests' fake Google (tests/it/support/fake_google.rs), which
checks the subject token like Google does: here only the first request of a device/scope
reaches it (the broker caches the federated token), and the benchmark measures the requests
served from the broker's cache. `GET /count` returns how many exchanges it answered.

usage: fake_sts.py PORT [EXPIRES_IN_SECONDS]   (default 3600; bench/fleet_sim.py compresses time)
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

COUNT = 0
EXPIRES_IN = 3600
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server naming
        global COUNT
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        if self.path != "/v1/token" or form.get("grant_type") != [
            "urn:ietf:params:oauth:grant-type:token-exchange"
        ] or not form.get("subject_token"):
            self._answer(400, {"error": "invalid_request", "error_description": "not a token exchange"})
            return
        with LOCK:
            COUNT += 1
            n = COUNT
        self._answer(
            200,
            {
                "access_token": f"ya29.fake-federated-{n}",
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "Bearer",
                "expires_in": EXPIRES_IN,
            },
        )

    def do_GET(self):  # noqa: N802
        if self.path == "/count":
            self._answer(200, {"count": COUNT})
        else:
            self._answer(404, {"error": "not_found"})

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    if len(sys.argv) > 2:
        EXPIRES_IN = int(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.serve_forever()
