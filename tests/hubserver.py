"""A small Hugging Face hub look-alike for tests: real HTTP on 127.0.0.1, stdlib only.

It serves repos from folders, in the URL layout huggingface_hub 2.4 uses (read from its
file_download.py / hf_api.py / _snapshot_download.py):

  GET  /api/models/{repo}[/revision/{rev}]          repo info: {"id", "sha", "siblings", "gated", ...}
  GET  /api/models/{repo}/tree/{rev}[/{path}]        file listing (recursive=...), LFS info for big files
  HEAD /{repo}/resolve/{rev}/{file}                  ETag / X-Repo-Commit / Content-Length (+ X-Linked-*)
  GET  /{repo}/resolve/{rev}/{file}                  the bytes; honours `Range: bytes=N-[M]` (206)

No X-Xet-* headers and no xetHash in listings, so huggingface_hub falls back to plain HTTP.
Errors carry the hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo),
which is how huggingface_hub tells them apart.

Test knobs: gated repos (401 without a token, 403 with a token that is not allowed), a request log,
`drop(file, after=N, times=k)`: the next k GETs of that file send the headers and N bytes, then
the connection is cut; `hide(file)`: whole-file requests (HEAD, GET without Range) answer 404 while
ranged reads still work (a file that vanishes after its header was read); `rate`: bytes per second
of /resolve/ bodies, shared by all connections as one link would be (None: as fast as it goes).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HUB_ALLOWED_TOKEN = "hf_testALLOWEDtoken0123456789abcdef"  # fake values: tests grep outputs for them
HUB_OTHER_TOKEN = "hf_testOTHERtoken9876543210fedcba"
LFS_MIN_SIZE = 1024  # files at least this big are listed as LFS files, like the hub does for weights


@dataclass
class Repo:
    repo_id: str
    root: Path
    gated: bool = False
    allowed_tokens: set[str] = field(default_factory=set)

    def __post_init__(self):
        self._sha256: dict[tuple, str] = {}
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(name.encode() + b"\0" + self.sha256(name).encode())
        self.sha = digest.hexdigest()  # the "commit" of this snapshot

    def path(self, name: str) -> Path:
        return self.root / name

    def sha256(self, name: str) -> str:
        """Hashed once per file version (every HEAD and GET needs it: hashing 50 MB shards each time made the
        server, not the client, the bottleneck of bench/stream_bench.py)."""
        st = self.path(name).stat()
        key = (name, st.st_size, st.st_mtime_ns)
        if key not in self._sha256:
            self._sha256[key] = hashlib.sha256(self.path(name).read_bytes()).hexdigest()
        return self._sha256[key]

    def git_oid(self, name: str) -> str:
        data = self.path(name).read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    token: str | None


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._drops: dict[str, list[int]] = {}  # file name -> [after_bytes, times_left]
        self.hidden: set[str] = set()
        self.rate: float | None = None  # bytes per second over all connections together
        self._link_free = 0.0  # when the simulated link has sent what it was given
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up -------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, root: Path, *, gated: bool = False, allowed_tokens=()) -> Repo:
        repo = Repo(repo_id, Path(root), gated=gated, allowed_tokens=set(allowed_tokens))
        self.repos[repo_id] = repo
        return repo

    def drop(self, filename: str, *, after: int, times: int = 1) -> None:
        """Cut the connection after `after` body bytes on the next `times` GETs of `filename`."""
        with self._lock:
            self._drops[filename] = [after, times]

    def hide(self, filename: str) -> None:
        """404 for HEAD and un-ranged GETs of `filename` (a header read by Range still works)."""
        self.hidden.add(filename)

    def start(self, port: int = 0) -> "HubServer":
        """Serve on 127.0.0.1:`port` (0: any free port). A given port lets a new server take over the address of
        one stopped before it, so processes started with its HF_ENDPOINT reach the new one."""
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        # shutdown() waits for the loop's next look: every 50 ms, not serve_forever's default 0.5 s
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what happened --------------------------------------------------------------------------
    def files_fetched(self, repo_id: str | None = None) -> list[str]:
        """File names that were GET (not HEAD) through /resolve/, in order."""
        out = []
        for r in self.requests:
            parts = r.path.split("/resolve/", 1)
            if r.method == "GET" and len(parts) == 2 and (repo_id is None or parts[0] == "/" + repo_id):
                out.append(parts[1].split("/", 1)[1])
        return out

    def resolve_requests(self, filename: str) -> list[Request]:
        return [r for r in self.requests if "/resolve/" in r.path and r.path.endswith("/" + filename)]

    def _take_drop(self, filename: str) -> int | None:
        with self._lock:
            rule = self._drops.get(filename)
            if not rule or rule[1] <= 0:
                return None
            rule[1] -= 1
            return rule[0]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "hubserver/1"

    def log_message(self, fmt, *args):  # keep test output quiet; requests are in hub.requests
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head_only: bool = False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None):
        body = json.dumps(data).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})},
                   head_only=self.command == "HEAD")

    def _error(self, status: int, code: str | None, message: str, repo: Repo | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self._json(status, {"error": message}, headers)

    def _find_repo(self, parts: list[str]) -> tuple[Repo | None, list[str]]:
        if len(parts) >= 2 and f"{parts[0]}/{parts[1]}" in self.hub.repos:
            return self.hub.repos[f"{parts[0]}/{parts[1]}"], parts[2:]
        return None, parts[2:]

    def _revision_ok(self, repo: Repo, rev: str) -> bool:
        return rev in ("main", repo.sha)

    def _access_denied(self, repo: Repo) -> bool:
        """Gated repos: metadata is public, files need an allowed token (like the hub)."""
        if not repo.gated:
            return False
        token = self._token()
        if token is None:
            self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access to "
                                          "it and be authenticated to access it. Please log in.")
            return True
        if token not in repo.allowed_tokens:
            self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the "
                                          "authorized list.")
            return True
        return False

    # -- routes ---------------------------------------------------------------------------------
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append(Request(self.command, path, self.headers.get("Range"), self._token()))
        parts = [p for p in path.split("/") if p]
        try:
            if parts[:2] == ["api", "models"]:
                return self._api(parts[2:], parse_qs(url.query))
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts)
            self._error(404, None, "Not Found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _api(self, parts: list[str], query: dict):
        repo, rest = self._find_repo(parts)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not rest or rest[0] == "revision":
            rev = unquote(rest[1]) if len(rest) >= 2 else "main"
            if not self._revision_ok(repo, rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo)
            return self._json(200, {
                "_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": repo.sha, "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
                "tags": [], "siblings": [{"rfilename": name} for name in repo.files],
                "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            })
        if rest[0] == "tree" and len(rest) >= 2:
            rev = unquote(rest[1])
            if not self._revision_ok(repo, rev):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo)
            prefix = "/".join(rest[2:])
            recursive = (query.get("recursive") or ["False"])[0].lower() == "true"
            return self._json(200, self._tree(repo, prefix, recursive))
        self._error(404, None, "Not Found")

    def _tree(self, repo: Repo, prefix: str, recursive: bool) -> list[dict]:
        entries, folders = [], set()
        base = prefix + "/" if prefix else ""
        for name in repo.files:
            if not name.startswith(base):
                continue
            rel = name[len(base):]
            if "/" in rel:
                folder = base + rel.split("/", 1)[0]
                if folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                    "size": 0, "path": folder})
                if not recursive:
                    continue
            size = repo.path(name).stat().st_size
            entry = {"type": "file", "oid": repo.git_oid(name), "size": size, "path": name}
            if size >= LFS_MIN_SIZE:
                entry["lfs"] = {"oid": repo.sha256(name), "size": size, "pointerSize": 134}
            entries.append(entry)
        return entries

    def _resolve(self, parts: list[str]):
        repo, rest = self._find_repo(parts)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        rev, name = unquote(rest[1]), "/".join(rest[2:])
        if not self._revision_ok(repo, rev):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo)
        if self._access_denied(repo):
            return
        if name not in repo.files or (name in self.hub.hidden and not self.headers.get("Range")):
            return self._error(404, "EntryNotFound", f"{name} does not exist on \"{rev}\"", repo)
        data = repo.path(name).read_bytes()
        size = len(data)
        lfs = size >= LFS_MIN_SIZE
        etag = repo.sha256(name) if lfs else repo.git_oid(name)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        if self.command == "HEAD":
            headers["Content-Length"] = str(size)
            return self._send(200, b"", headers, head_only=True)

        status, start, end = 200, 0, size
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].split(",")[0].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else size
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            end = min(end, size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body = data[start:end]
        headers["Content-Length"] = str(len(body))
        cut = self.hub._take_drop(name)
        if cut is None and self.hub.rate:
            return self._send_slowly(status, body, headers, self.hub.rate)
        if cut is None:
            return self._send(status, body, headers)
        # The fault: headers promise the whole body, then the connection dies part-way.
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_slowly(self, status: int, body: bytes, headers: dict, rate: float) -> None:
        import time

        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        step = 64 * 1024
        for i in range(0, len(body), step):
            chunk = body[i: i + step]
            with self.hub._lock:  # one link: the rate is shared by every connection
                start = max(time.monotonic(), self.hub._link_free)
                self.hub._link_free = start + len(chunk) / rate
            time.sleep(max(0.0, start + len(chunk) / rate - time.monotonic()))  # this chunk's turn on the link
            self.wfile.write(chunk)
