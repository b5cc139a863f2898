"""A small in-memory Hugging Face Hub for tests: enough HTTP for ``huggingface_hub``'s push and pull paths.

Routes (model repos; no auth, no LFS/Xet, no branches other than ``main``):

* ``POST /api/repos/create`` (409 if it exists), ``POST /api/validate-yaml`` (parses the card's YAML)
* ``POST /api/models/{ns}/{name}/preupload/{rev}`` (every file ``regular``),
  ``POST /api/models/{ns}/{name}/commit/{rev}`` (NDJSON: ``header``, ``file`` base64, ``deletedFile``,
  ``deletedFolder``)
* ``GET /api/models/{ns}/{name}[/revision/{rev}]`` (model info with ``sha`` and ``siblings``),
  ``GET /api/models/{ns}/{name}/tree/{rev}[/{path}]`` (``?recursive=``)
* ``HEAD``/``GET /{ns}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``;
  missing repos, revisions and files answer 404 with the ``X-Error-Code`` the client maps to its errors.

Run standalone with ``python tests/hub_server.py [port]``; in tests use :class:`LocalHub` as a context manager.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)

    def head(self) -> Commit | None:
        return self.commits[-1] if self.commits else None

    def at(self, revision: str) -> Commit | None:
        """``main`` (or an empty repo's ``main``), or a full commit sha."""
        if revision == "main":
            return self.head() or Commit("0" * 40, {}, "", _now())
        return next((c for c in self.commits if c.oid == revision), None)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "METHOD path" of every request, in order

    def commit(self, repo: Repo, revision: str, lines: list[dict]) -> Commit:
        parent = repo.at(revision)
        if parent is None:
            raise KeyError(revision)
        files = dict(parent.files)
        message = ""
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError(f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                raise ValueError(f"unsupported commit operation {key!r} (this test Hub has no LFS/Xet)")
        seed = json.dumps([parent.oid, message, sorted((p, git_blob_sha(d)) for p, d in files.items())])
        new = Commit(hashlib.sha1(seed.encode() + str(time.time_ns()).encode()).hexdigest(), files, message, _now())
        repo.commits.append(new)
        return new


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


class HubHandler(BaseHTTPRequestHandler):
    server_version = "LocalHub/1.0"
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass made by LocalHub

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # --- plumbing -----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str | None, message: str):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _route(self, method: str):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append(f"{method} {path}")
        for pattern, handler in ROUTES.get(method, []):
            match = re.fullmatch(pattern, path)
            if match:
                try:
                    return handler(self, query=query, **match.groupdict())
                except Exception as error:  # a bug here should fail tests loudly, not hang them
                    return self._error(500, None, f"{type(error).__name__}: {error}")
        self._error(404, None, f"no route for {method} {path}")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    # --- helpers ------------------------------------------------------------------------------------
    def _repo(self, repo: str) -> Repo | None:
        found = self.state.repos.get(repo)
        if found is None:
            self._error(404, "RepoNotFound", f"Repository {repo} not found")
        return found

    def _revision(self, repo: Repo, rev: str) -> Commit | None:
        commit = repo.at(unquote(rev))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _repo_at(self, repo: str, rev: str) -> tuple[Repo, Commit] | None:
        """The repo and the commit ``rev`` names, or ``None`` after answering 404."""
        found = self._repo(repo)
        commit = self._revision(found, rev) if found is not None else None
        return (found, commit) if commit is not None else None

    # --- routes ---------------------------------------------------------------------------------------
    def create_repo(self, query):
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            return self._error(400, None, "this test Hub only hosts model repos")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:  # the Hub's 409 also carries the url (the client reads it)
                message = "You already created this model repo"
                return self._json(409, {"error": message, "url": f"{self._base()}/{repo_id}"},
                                  {"X-Error-Message": message})
            self.state.repos[repo_id] = Repo(repo_id, bool(payload.get("private")))
        self._json(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, query):
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return self._error(400, None, f"invalid YAML: {error}")
        if metadata is not None and not isinstance(metadata, dict):
            return self._error(400, None, "metadata must be a mapping")
        for entry in (metadata or {}).get("model-index", []) or []:
            if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("results"), list):
                return self._error(400, None, '"model-index" entries need "name" and "results"')
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, query, repo, rev):
        found = self._repo(repo)
        if found is None:
            return
        payload = json.loads(self._body() or b"{}")
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in payload.get("files", [])]
        self._json(200, {"files": files, "commitOid": (found.head() or Commit("0" * 40, {}, "", "")).oid})

    def commit(self, query, repo, rev):
        found = self._repo(repo)
        if found is None:
            return
        if query.get("create_pr"):
            return self._error(400, None, "this test Hub has no pull requests")
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        with self.state.lock:
            try:
                new = self.state.commit(found, unquote(rev), lines)
            except KeyError:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            except ValueError as error:
                return self._error(400, None, str(error))
        self._json(200, {"commitUrl": f"{self._base()}/{repo}/commit/{new.oid}", "commitOid": new.oid,
                         "success": True, "pullRequestUrl": None})

    def model_info(self, query, repo, rev="main"):
        located = self._repo_at(repo, rev)
        if located is None:
            return
        found, commit = located
        self._json(200, {
            "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid, "private": found.private,
            "lastModified": commit.date, "tags": [], "library_name": "transformers",
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    def tree(self, query, repo, rev, path=None):
        path = path or ""
        located = self._repo_at(repo, rev)
        if located is None:
            return
        found, commit = located
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            for depth in range(1, rest.count("/") + 1):
                folders.add(prefix + "/".join(rest.split("/")[:depth]))
            data = commit.files[name]
            entries.append({"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)})
        if prefix and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        directories = [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                       for f in sorted(folders)]
        self._json(200, directories + entries)

    def resolve(self, query, repo, rev, path):
        located = self._repo_at(repo, rev)
        if located is None:
            return
        found, commit = located
        data = commit.files.get(path)
        if data is None:
            return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                         "X-Error-Message": "Entry not found",
                                                         "X-Repo-Commit": commit.oid}, "text/plain")
        self._send(200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha(data)}"',
                               "Accept-Ranges": "none"}, "application/octet-stream")


ROUTES = {
    "POST": [
        (r"/api/repos/create", HubHandler.create_repo),
        (r"/api/validate-yaml", HubHandler.validate_yaml),
        (rf"/api/models/{_REPO}/preupload/{_REV}", HubHandler.preupload),
        (rf"/api/models/{_REPO}/commit/{_REV}", HubHandler.commit),
    ],
    "GET": [
        (rf"/api/models/{_REPO}", HubHandler.model_info),
        (rf"/api/models/{_REPO}/revision/{_REV}", HubHandler.model_info),
        (rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", HubHandler.tree),
        (rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", HubHandler.resolve),
    ],
    "HEAD": [(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", HubHandler.resolve)],
}


class LocalHub:
    """A :class:`HubState` served on ``127.0.0.1`` from a daemon thread.

    ```python
    with LocalHub() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, ...}
    ```
    """

    def __init__(self, port: int = 0) -> None:
        self.state = HubState()
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="local-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


if __name__ == "__main__":
    import sys

    with LocalHub(int(sys.argv[1]) if len(sys.argv) > 1 else 8765) as hub:
        print(f"local Hub at {hub.endpoint} (Ctrl-C to stop)")
        try:
            hub.thread.join()
        except KeyboardInterrupt:
            pass
