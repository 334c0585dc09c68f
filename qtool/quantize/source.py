"""Step 1: where the weights come from (a local folder, or a hub id downloaded with qtool.core.hub)."""

from __future__ import annotations

from pathlib import Path

from qtool.core.errors import BadInput

def resolve_source(ref: str, *, revision: str | None = None, progress: bool = False, stream: bool | None = None,
                   keep_source: bool = False) -> tuple[Path, str, str | None, object]:
    """A local checkpoint directory, or a hub id: streamed (qtool.quantize.fetch) when `stream` is True, or None
    and the cache lacks its shards; else downloaded with qtool.core.hub. -> (dir, display name, revision,
    HubSource or None)."""
    from qtool.core.models import is_hub_id

    path = Path(ref).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the filesystem, say
        raise BadInput(f"not a usable path ({exc.strerror})", path=ref[:80] + ("..." if len(ref) > 80 else "")) from None
    if exists:
        if not path.is_dir():
            raise BadInput("expected a checkpoint directory (config.json + *.safetensors)", path=path)
        return path, path.resolve().name, revision, None
    if is_hub_id(ref):
        from qtool.core import hub

        if stream is not False:
            from qtool.quantize.fetch import hub_stream

            remote = hub_stream(ref, revision=revision, keep_source=keep_source)
            if remote is not None:
                return remote.folder, ref, remote.sha or revision, remote
        folder, sha = hub.download_checkpoint(ref, revision=revision, progress=progress)
        return Path(folder), ref, sha or revision, None
    raise BadInput("no such checkpoint directory, and not a hub id (org/name)", path=ref)


def default_destination(source_name: str) -> Path:
    return Path.cwd() / f"{source_name.rstrip('/').split('/')[-1]}-bnb-4bit"
