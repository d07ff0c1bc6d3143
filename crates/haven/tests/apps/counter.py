"""A counter that knows nothing of Haven: every POST adds one, and the count is kept in a
file. Delivered twice, a request counts twice, which is what exactly-once must prevent.
While a file named `clock` exists beside FILE, it also appends its own clock to each
answer, so that replica answers differently from the others (what divergence detection
must catch).

    python3 counter.py HOST PORT FILE
    POST /count  -> 201, the new count (+ " at <ns>" while the clock file exists)
    GET  /count  -> 200, the count
"""
import http.server
import os
import sys
import threading
import time

host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
clock = os.path.join(os.path.dirname(path), "clock")
count = int(open(path).read() or 0) if os.path.exists(path) else 0


def save(value):
    # Whole or not at all, so a kill mid-write loses nothing the app answered.
    with open(path + ".tmp", "w") as f:
        f.write(str(value))
    os.replace(path + ".tmp", path)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/count":
            return self.answer(404, "no such path")
        with lock:
            count += 1
            save(count)
            value = count
            # For diagnosis only: which delivery produced which count (the app still
            # ignores Haven-Index when counting).
            with open(path + ".trace", "a") as f:
                f.write(f"{self.headers.get('Haven-Index')} {value}\n")
        text = str(value)
        if os.path.exists(clock):
            text += f" at {time.time_ns()}"
        self.answer(201, text)

    def do_GET(self):
        if self.path != "/count":
            return self.answer(404, "no such path")
        with lock:
            value = count
        self.answer(200, str(value))

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
