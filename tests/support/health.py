"""A local HTTP endpoint a test points a service's health_url (or a business check) at."""

from __future__ import annotations

import http.server
import threading


class HealthEndpoint:
    """Answers every GET with `status` and `body`, which the test changes; counts `hits`."""

    def __init__(self):
        endpoint = self
        self.status, self.body, self.hits = 200, b"ok", 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                endpoint.hits += 1
                self.send_response(endpoint.status)
                self.send_header("Content-Length", str(len(endpoint.body)))
                self.end_headers()
                self.wfile.write(endpoint.body)

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
