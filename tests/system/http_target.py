"""An HTTP/1.1 target for the HTTP tests, run as a process: `python http_target.py PORT NAME`.

The standard library's threading HTTP server, keep-alive on:

    GET  /id                 -> NAME
    PUT or POST /hash        -> the SHA-256 (hex) of the request body, plain or chunked
    GET  /chunked?size=N     -> N bytes (random.Random(N)), sent chunked (no Content-Length)
    GET  /headers            -> the request's headers, one `name: value` a line, as received

It prints "ready" once it listens.
"""

from __future__ import annotations

import hashlib
import random
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    name = "target"

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/id":
            self._send(200, self.name.encode())
        elif url.path == "/headers":
            self._send(200, "".join(f"{name}: {value}\n" for name, value in self.headers.items()).encode())
        elif url.path == "/chunked":
            size = int(parse_qs(url.query)["size"][0])
            data = random.Random(size).randbytes(size)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, size, CHUNK):
                piece = data[start : start + CHUNK]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, b"not here\n")

    def _body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                left = size
                while left:
                    piece = self.rfile.read(min(left, CHUNK))
                    left -= len(piece)
                    yield piece
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                piece = self.rfile.read(min(left, CHUNK))
                if not piece:
                    return
                left -= len(piece)
                yield piece

    def do_PUT(self) -> None:
        if urlsplit(self.path).path != "/hash":
            self._send(404, b"not here\n")
            return
        digest = hashlib.sha256()
        for piece in self._body():
            digest.update(piece)
        self._send(200, digest.hexdigest().encode())

    do_POST = do_PUT


def main() -> None:
    port, Handler.name = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
