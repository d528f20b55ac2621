"""The search_data stage with the Serper backend against a loopback imitation of the API: the key from the
environment reaches the server, and appears nowhere in the process output, the MLflow store or its artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from arft_core.search.cache import SearchCache

KEY = "sk-test-0123456789abcdef-do-not-leak"


class FakeSerper(BaseHTTPRequestHandler):
    keys: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeSerper.keys.append(self.headers.get("X-API-KEY", ""))
        results = [{"title": f"{body['q']} {i}", "snippet": f"About {body['q']} ({i}).", "link": f"https://x/{i}"}
                   for i in range(body.get("num", 4))]
        payload = json.dumps({"organic": results}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_serper_key_stays_out_of_logs_and_mlflow(tmp_path, prefect_server):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSerper)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        params = {"search": {"backend": "serper", "serper_url": f"http://127.0.0.1:{server.server_port}/search",
                             "mode": "live"}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "SERPER_API_KEY": KEY}
        proc = subprocess.run([sys.executable, "-m", "arft_core.cli", "data", "search"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert FakeSerper.keys and set(FakeSerper.keys) == {KEY}  # the key was used...
    assert KEY not in proc.stdout + proc.stderr               # ...and never printed or logged
    tracked = [p for p in (tmp_path / "tracking").rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in tracked)
    for path in tracked + [p for p in (tmp_path / "data").rglob("*") if p.is_file()]:
        assert KEY.encode() not in path.read_bytes(), path
    # The teacher's searches (every gold query of the train items) went to the fake, and its snippets are what the
    # search cache now answers them with (what training's replay of the teacher will show in <information>).
    train = json.loads((tmp_path / "data" / "mat_search" / "train.json").read_text())
    queries = [q for item in train for q in (item.get("gold") or {}).get("queries") or []]
    cache = SearchCache(tmp_path / "data" / "search_cache.sqlite")
    assert queries and all(r.snippet.startswith("About ") for q in queries for r in cache.get("serper", q, 4))
