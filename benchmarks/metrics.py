"""Live Prometheus metrics for long runs (text exposition format over plain HTTP, loopback only)."""

from __future__ import annotations

import http.server
import threading


class MetricsServer:
    """Serves `GET /metrics` with the gauges set through `set`. Binds 127.0.0.1 by default."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", prefix: str = "pathways") -> None:
        self._values: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self.prefix = prefix
        server_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.rstrip("/") not in ("/metrics", ""):
                    self.send_error(404)
                    return
                body = server_self.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep the benchmark's output clean
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="metrics")
        self._thread.start()

    def set(self, name: str, value: float, help_text: str = "") -> None:
        with self._lock:
            self._values[name] = (float(value), help_text)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (value, help_text) in sorted(self._values.items()):
                full = f"{self.prefix}_{name}"
                if help_text:
                    lines.append(f"# HELP {full} {help_text}")
                lines.append(f"# TYPE {full} gauge")
                lines.append(f"{full} {value:.6g}")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
