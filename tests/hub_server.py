"""A stand-in for the Hugging Face hub's file endpoints on 127.0.0.1, speaking what huggingface_hub reads.

HEAD/GET `/{owner}/{repo}/resolve/{revision}/{path}` answer with `X-Repo-Commit`, `ETag`, `Content-Length`
and `Accept-Ranges`; a GET with `Range: bytes=N-` gets `206 Partial Content`. Unknown repos answer 404 with
the hub's `X-Error-Code: RepoNotFound`, unknown files `EntryNotFound`. Point `HF_ENDPOINT` at `url`.

Faults for tests, per file name (`faults[path] = ...`):
  - ("cut", n): every GET body stops after absolute byte n and the connection closes (a network failure
    that does not heal: resumed requests make no progress);
  - ("call", n, fn): fn() runs in the server thread once byte n has been sent, then the body completes.
"""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20


class HubServer:
    def __init__(self, files: dict[str, dict[str, Path | bytes]]):
        """files: repo id ('Yuanshi/LinFusion-1-5') -> {path in repo: file on disk or bytes}."""
        self.files = {repo: {name: Path(v) if not isinstance(v, bytes) else v for name, v in entries.items()}
                      for repo, entries in files.items()}
        self.faults: dict[str, tuple] = {}
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, Range header)
        self.authorizations: list[str | None] = []               # each request's Authorization header
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def content(self, repo: str, name: str) -> bytes | None:
        value = self.files.get(repo, {}).get(name)
        return value.read_bytes() if isinstance(value, Path) else value

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # keep test output quiet
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                hub.authorizations.append(self.headers.get("Authorization"))
                parts = self.path.split("?")[0].lstrip("/").split("/", 4)
                if len(parts) != 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound")
                repo, revision, name = f"{parts[0]}/{parts[1]}", parts[3], parts[4]
                if repo not in hub.files or revision not in ("main", COMMIT):
                    return self._error(404, "RepoNotFound" if repo not in hub.files else "RevisionNotFound")
                data = hub.content(repo, name)
                if data is None:
                    return self._error(404, "EntryNotFound")
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes="):
                    start = int(ranged[len("bytes="):].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if body:
                    try:
                        self._send(data, start, hub.faults.get(name))
                    except (BrokenPipeError, ConnectionResetError):   # the client gave up (a cancel)
                        self.close_connection = True

            def _send(self, data: bytes, start: int, fault):
                pos = start
                while pos < len(data):
                    end = min(pos + CHUNK, len(data))
                    if fault and fault[0] == "cut" and end > fault[1]:
                        self.wfile.write(data[pos:max(pos, fault[1])])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(data[pos:end])
                    if fault and fault[0] == "call" and pos < fault[1] <= end:
                        self.wfile.flush()
                        fault[2]()
                    pos = end

            def _error(self, status: int, code: str):
                message = f"{code}: {self.path}".encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(message)

        return Handler
