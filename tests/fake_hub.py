"""A small fake Hugging Face Hub on 127.0.0.1 for the upload tests: it answers the endpoints huggingface_hub uses to create
a repo and commit files (whoami, repos/create, preupload, commit), keeps every committed file in memory, and records every
call. Files are always asked for inline ("regular" upload mode), so no LFS or Xet storage is involved."""
import base64, json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.calls = []            # (method, path) in order
        self.repos = {}            # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [message, ...]}
        self.unknown = []          # requests the fake does not implement
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass

            def _send(self, code, obj=None):
                data = b"" if obj is None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD": self.wfile.write(data)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def do_HEAD(self): self._route()
            def do_GET(self): self._route()
            def do_POST(self): self._route()

            def _route(self):
                path = unquote(urlparse(self.path).path)
                body = self._body() if self.command == "POST" else b""
                hub.calls.append((self.command, path))
                parts = path.strip("/").split("/")
                if path == "/api/whoami-v2":
                    return self._send(200, {"type": "user", "name": "tester", "orgs": [],
                                            "auth": {"accessToken": {"role": "write", "displayName": "fake"}}})
                if path == "/api/validate-yaml":             # the model card's metadata check
                    return self._send(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create" and self.command == "POST":
                    d = json.loads(body or b"{}")
                    repo_id = f"{d.get('organization') or 'tester'}/{d['name']}"
                    private = bool(d.get("private")) or d.get("visibility") == "private"   # older / newer huggingface_hub
                    hub.repos.setdefault(repo_id, {"private": private, "files": {}, "commits": [], "type": d.get("type") or "model"})
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if len(parts) >= 5 and parts[0] == "api" and parts[1] in ("models", "datasets") and parts[4] in ("preupload", "commit"):
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in hub.repos: return self._send(404, {"error": f"Repository {repo_id} not found"})
                    if parts[4] == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                          for f in files]})
                    repo = hub.repos[repo_id]
                    for line in body.decode().splitlines():
                        if not line.strip(): continue
                        item = json.loads(line)
                        if item["key"] == "header": repo["commits"].append(item["value"].get("summary", ""))
                        elif item["key"] == "file":
                            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{len(repo['commits']):040d}",
                                            "commitOid": f"{len(repo['commits']):040d}"})
                hub.unknown.append((self.command, path))
                return self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start(); return self

    def __exit__(self, *a):
        self.server.shutdown(); self.server.server_close(); self.thread.join(5)
