"""Everything that talks to the Hugging Face hub, through huggingface_hub only.

huggingface_hub honours HF_TOKEN, HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT, but some of them only as read
when it was first imported. We read them again on every call and pass endpoint, cache folder and offline
mode explicitly, so a value set after import (a test, a notebook) still counts. The token is left to
huggingface_hub (it reads HF_TOKEN per request); this module never prints one: every message goes
through redact().

Failures become one-line HubErrors (exit 2):
  401/403   gated, private or refused token -> hint to set HF_TOKEN and accept the license
  404       repository, revision or file not found
  offline   HF_HUB_OFFLINE=1 and nothing cached
  network   connection refused or dropped -> "run again to resume" (finished files stay in the cache)
  no route  one short connection attempt fails before anything is asked: the cache is used if it has the
            files, else one line that names a matching local preset (no 20 s of huggingface_hub retries)
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from qtool.core.errors import HubError, OutputError, QtoolError, WeightsError

ACCESS_HINT = "set HF_TOKEN to a token with access; accept the model's license on the hub"

# Small top-level files a checkpoint needs besides its weights: config, tokenizer, generation
# settings, chat templates, the model card. Anything in a subfolder (onnx/, original/, ...) is skipped.
SMALL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "*.tiktoken",
    "*.jinja",
    "*.json",
    "*.txt",
    "*.md",
]
# fnmatch's `*` also matches `/`, so "*/*" keeps only top-level files.
SKIPPED = ["*/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf",
           "*.tflite", "*.ot", "*.npz", "*.safetensors"]
WEIGHT_PATTERNS = ["*.safetensors"]
# Mistral-format duplicates of the same weights (consolidated.safetensors) sit beside the HF shards.
WEIGHT_SKIPPED = ["*/*", "consolidated*.safetensors"]

_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")  # real tokens: hf_ + 34 letters/digits
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def redact(text: str) -> str:
    """Remove anything that looks like an HF token, and the values of HF_TOKEN/HUGGING_FACE_HUB_TOKEN."""
    text = str(text)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = (os.environ.get(var) or "").strip()
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _TOKEN_RE.sub("hf_***", text)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def _endpoint() -> str:
    value = os.environ.get("HF_ENDPOINT")
    if value:
        return value.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hf_home() -> str:
    value = os.environ.get("HF_HOME")
    if value:
        return os.path.expandvars(os.path.expanduser(value))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface")


def _cache_dir() -> str:
    value = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if value:
        return os.path.expandvars(os.path.expanduser(value))
    return os.path.join(_hf_home(), "hub")


PROBE_SECONDS = 2.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached, after one short TCP connection attempt; None when it can be (or when a
    proxy stands between us and it: then huggingface_hub finds out itself)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlsplit(endpoint)
    if not url.hostname:
        return None
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
    return None


def _hub_kwargs(no_route: str | None = None) -> dict:
    return {"endpoint": _endpoint(), "cache_dir": _cache_dir(), "local_files_only": _offline() or bool(no_route)}


def _no_route() -> str | None:
    return None if _offline() else unreachable(_endpoint())


def _unreachable_error(repo_id: str, revision: str | None, what: str, why: str) -> HubError:
    from qtool.core.presets import preset_for_hub_id

    preset = preset_for_hub_id(repo_id)
    hint = (f"a local preset matches: qtool estimate {preset}" if preset and
            what == "config.json" else "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache")
    return HubError(f"cannot reach {_endpoint()} ({why}) and {what} (revision {revision or 'main'}) is not in the "
                    f"cache at HF_HOME={_hf_home()}", path=repo_id, hint=hint)


@contextlib.contextmanager
def _progress_bars(show: bool):
    """huggingface_hub's tqdm bars (stderr) only when asked for; restored afterwards. They write to
    stderr, which qtool holds back from libraries (qtool.core.logs), so let them through while shown."""
    from qtool.core.logs import passthrough

    with passthrough() if show else contextlib.nullcontext(), _bars_enabled(show):
        yield


@contextlib.contextmanager
def _bars_enabled(show: bool):
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    # HF_HUB_DISABLE_PROGRESS_BARS set by the user wins (and the library warns if we try to override it).
    if show == (not was_disabled) or constants.HF_HUB_DISABLE_PROGRESS_BARS is not None:
        yield
        return
    (enable_progress_bars if show else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _map_error(exc: BaseException, repo_id: str, revision: str | None, what: str) -> QtoolError:
    """One line for whatever huggingface_hub (or the network under it) raised."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    endpoint = _endpoint()
    chain = list(_chain(exc))

    if _offline() and any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in chain):
        return HubError(f"offline (HF_HUB_OFFLINE=1) and {repo_id} ({what}, revision {rev}) is not in the cache "
                        f"at HF_HOME={_hf_home()}", hint="unset HF_HUB_OFFLINE to download it")

    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, RevisionNotFoundError):
            return HubError(f"revision {rev!r} not found on {endpoint}, HTTP {status}", path=repo_id)
        if isinstance(e, RemoteEntryNotFoundError):
            return HubError(f"{what} not found at revision {rev!r} on {endpoint}, HTTP {status}", path=repo_id)
        if isinstance(e, GatedRepoError) or (isinstance(e, HfHubHTTPError) and status in (401, 403)):
            kind = "gated repository" if isinstance(e, GatedRepoError) else "access denied"
            reason = "no token sent" if status == 401 and not _token_present() else "token refused"
            return HubError(f"{kind}: HTTP {status}, {reason}, on {endpoint}", path=repo_id, hint=ACCESS_HINT)
        if isinstance(e, RepositoryNotFoundError):
            return HubError(f"repository not found on {endpoint}, HTTP {status}", path=repo_id,
                            hint="check the id; if it is private, " + ACCESS_HINT)
        if isinstance(e, HfHubHTTPError) and status is not None:
            return HubError(f"the hub at {endpoint} answered HTTP {status} for {what}; run again later", path=repo_id)
    for e in chain:
        if isinstance(e, _transport_errors()) or "Consistency check failed" in str(e):
            kept = f", finished files stay in {_cache_dir()}" if what == "the checkpoint" else ""
            # a streamed shard (qtool.quantize.fetch) is not resumed: the run starts over
            again = f" while fetching {what}; run again" if what.endswith(".safetensors") else "; run again to resume"
            return HubError(f"connection to {endpoint} failed{again} ({type(e).__name__}{kept})", path=repo_id)
    if isinstance(exc, LocalEntryNotFoundError):
        return HubError(f"connection to {endpoint} failed; run again to resume", path=repo_id)
    first = redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else ""
    return HubError(f"hub request for {what} failed: {type(exc).__name__}: {first}", path=repo_id)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures under huggingface_hub: httpx2's (hub 2.x) or httpx's (hub 1.x), whichever is there.

    Neither is our dependency; without them a dropped connection still surfaces as huggingface_hub's
    LocalEntryNotFoundError (handled in _map_error) or the OS errors below."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _token_present() -> bool:
    if (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip():
        return True
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # a broken token file is no reason to hide the real error
        return False


def _redacted(err: QtoolError) -> QtoolError:
    err.args = (redact(str(err)),)
    return err


@contextlib.contextmanager
def _one_line(repo_id: str, revision: str | None, what: str, no_route: str | None = None):
    """Whatever huggingface_hub raises inside becomes one redacted QtoolError line."""
    try:
        yield
    except QtoolError:
        raise
    except Exception as exc:  # noqa: BLE001 - everything from the hub becomes one line
        if no_route:
            raise _redacted(_unreachable_error(repo_id, revision, what, no_route)) from None
        full = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _DISK_FULL), None)
        if full is not None:
            raise _redacted(OutputError(f"{os.strerror(full.errno).lower()} downloading {what}", path=repo_id,
                                        hint="free some space or choose another --out")) from None
        raise _redacted(_map_error(exc, repo_id, revision, what)) from None


def fetch_config(repo_id: str, *, revision: str | None = None) -> Path:
    """Download (or find in the cache) only config.json of `repo_id`; no weights are touched."""
    from huggingface_hub import hf_hub_download

    no_route = _no_route()
    with _one_line(repo_id, revision, "config.json", no_route), _progress_bars(False):
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, **_hub_kwargs(no_route)))


def _small_files(repo_id: str, revision: str | None, progress: bool, no_route: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    with _one_line(repo_id, revision, "the checkpoint", no_route), _progress_bars(progress):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SMALL_FILES,
                                        ignore_patterns=SKIPPED, **_hub_kwargs(no_route)))
    return folder, folder.name if _SHA_RE.match(folder.name) else (revision or "")


def checkpoint_files(repo_id: str, *, revision: str | None = None, progress: bool = False
                     ) -> tuple[Path, str, list[str] | None]:
    """The small files of a checkpoint (config, index, tokenizer, ...) in the cache, without its weights.
    -> (snapshot folder, commit sha, weight files by name: the index's shards, or ["model.safetensors"] (what
    transformers loads without an index); None when the hub cannot be asked (offline, unreachable) or the
    repo has neither: only a listing finds its weights, as download_checkpoint does)."""
    from huggingface_hub import HfApi

    no_route = _no_route()
    folder, sha = _small_files(repo_id, revision, progress, no_route)
    if _offline() or no_route:
        return folder, sha, None
    weights, _ = _weight_selection(folder)
    if weights != WEIGHT_PATTERNS:
        return folder, sha, weights
    with _one_line(repo_id, sha, "model.safetensors"):
        single = HfApi(endpoint=_endpoint()).file_exists(repo_id, "model.safetensors", revision=sha)
    return folder, sha, ["model.safetensors"] if single else None


def download_checkpoint(repo_id: str, *, revision: str | None = None, progress: bool = False) -> tuple[Path, str]:
    """Snapshot of what quantizing needs: config, tokenizer, generation config, small text files and the
    safetensors weights (the shards listed in model.safetensors.index.json when there is one). No .bin/.pt/
    .msgpack/.h5/onnx/gguf. Returns (snapshot folder, commit sha).

    Resumable: an interrupted file is resumed with a Range request while this call runs; files that finished
    stay in the cache (HF_HOME), so running again fetches only what is missing.
    """
    from huggingface_hub import snapshot_download

    no_route = _no_route()
    folder, sha = _small_files(repo_id, revision, progress, no_route)
    with _one_line(repo_id, revision, "the checkpoint", no_route), _progress_bars(progress):
        weights, skipped = _weight_selection(folder)
        folder = Path(snapshot_download(repo_id, revision=sha or revision, allow_patterns=weights,
                                        ignore_patterns=skipped, **_hub_kwargs(no_route)))
    _check_weights(folder, repo_id)
    return folder, folder.name if _SHA_RE.match(folder.name) else sha


def cached_file(repo_id: str, sha: str, filename: str) -> Path | None:
    """`filename` of commit `sha` when the HF cache holds it whole, else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=_cache_dir(), revision=sha)
    return Path(found) if isinstance(found, str) else None


HEADER_PROBE = 100_000  # as HfApi.get_safetensors_metadata: most headers fit, one request


def read_remote_header(repo_id: str, sha: str, filename: str) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes) of a safetensors file on the hub, by HTTP range requests as
    HfApi.get_safetensors_metadata makes them (same URL, token and endpoint as a download); nothing else of
    the file is fetched. The caller validates the bytes (qtool.core.checkpoint.parse_safetensors_header)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    from qtool.core.checkpoint import MAX_HEADER_BYTES

    url = hf_hub_url(repo_id, filename, revision=sha, endpoint=_endpoint())

    def get(first: int, last: int):
        response = get_session().get(url, headers={**build_hf_headers(), "range": f"bytes={first}-{last}"})
        hf_raise_for_status(response)
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return response.content, int(total) if total.isdigit() else len(response.content)

    with _one_line(repo_id, sha, filename):
        data, size = get(0, HEADER_PROBE - 1)
        n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
        if not 0 <= n <= min(size - 8, MAX_HEADER_BYTES):
            raise WeightsError(f"corrupt safetensors header: header length {n} does not fit the file ({size} "
                               "bytes) or the limit", path=f"{repo_id}/{filename}")
        if len(data) < 8 + n:
            data += get(len(data), 8 + n - 1)[0]
    return size, n, data[8: 8 + n]


def fetch_file(repo_id: str, sha: str, filename: str, local_dir: Path | None = None) -> Path:
    """One file of commit `sha` through huggingface_hub's own download (resumed by Range when a connection
    drops): into `local_dir`, or into the HF cache when None. -> its path."""
    from huggingface_hub import hf_hub_download

    where = {"local_dir": str(local_dir)} if local_dir is not None else {}
    with _one_line(repo_id, sha, filename), _progress_bars(False):
        return Path(hf_hub_download(repo_id, filename, revision=sha, **_hub_kwargs(), **where))


def _weight_selection(folder: Path) -> tuple[list[str], list[str]]:
    """Which weight files to fetch: the index's shards exactly, else every top-level *.safetensors."""
    # Not qtool.core.checkpoint._read_index: it requires the shards on disk, and they are not downloaded yet.
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError("invalid safetensors index: no weight_map", path=index) from None
        return shards, []
    return WEIGHT_PATTERNS, WEIGHT_SKIPPED


def _check_weights(folder: Path, repo_id: str) -> None:
    # Not qtool.core.checkpoint._read_index: its "missing shard" error names the cache path, this one the repo;
    # shard names are validated there anyway when Checkpoint.open reads this folder next.
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightsError(f"shards listed in model.safetensors.index.json are not in the repository: "
                               f"{', '.join(missing[:3])}", path=repo_id)
    elif not any(folder.glob("*.safetensors")):
        raise WeightsError("no *.safetensors weights in the repository (qtool reads safetensors only; "
                           ".bin/.pt pickles are not loaded)", path=repo_id)
