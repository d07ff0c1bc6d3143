"""A small app like many real ones: SQLite, a UNIQUE column, and no notion of Haven-Index.

Delivered twice, a request is rejected the second time (400 UNIQUE constraint failed), as
the third-party app that exposed the idempotency divergence did.

    python3 unique_items.py HOST PORT DB
    POST /items  body = a name   -> 201 {"id": N, "name": "..."} | 400 UNIQUE constraint failed: items.name
    GET  /items                  -> 200 [[id, name], ...] in id order
"""
import http.server
import json
import sqlite3
import sys

host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
db.execute("PRAGMA synchronous=OFF")
db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL)")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        name = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        if self.path != "/items":
            return self.answer(404, "no such path")
        try:
            cursor = db.execute("INSERT INTO items (name) VALUES (?)", (name,))
        except sqlite3.IntegrityError as e:
            return self.answer(400, str(e))
        self.answer(201, json.dumps({"id": cursor.lastrowid, "name": name}))

    def do_GET(self):
        if self.path != "/items":
            return self.answer(404, "no such path")
        rows = db.execute("SELECT id, name FROM items ORDER BY id").fetchall()
        self.answer(200, json.dumps(rows))

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
