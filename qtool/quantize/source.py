"""Step 1: where the weights come from (a local folder, or a hub id downloaded with qtool.core.hub)."""

from __future__ import annotations

from pathlib import Path

from qtool.core.errors import BadInput

def resolve_source(ref: str, *, revision: str | None = None, progress: bool = False) -> tuple[Path, str, str | None]:
    """A local checkpoint directory, or a hub id downloaded with qtool.core.hub. -> (dir, display name, revision)."""
    from qtool.core.models import is_hub_id

    path = Path(ref).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long for the filesystem, say
        raise BadInput(f"not a usable path ({exc.strerror})", path=ref[:80] + ("..." if len(ref) > 80 else "")) from None
    if exists:
        if not path.is_dir():
            raise BadInput("expected a checkpoint directory (config.json + *.safetensors)", path=path)
        return path, path.resolve().name, revision
    if is_hub_id(ref):
        from qtool.core import hub

        folder, sha = hub.download_checkpoint(ref, revision=revision, progress=progress)
        return Path(folder), ref, sha or revision
    raise BadInput("no such checkpoint directory, and not a hub id (org/name)", path=ref)


def default_destination(source_name: str) -> Path:
    return Path.cwd() / f"{source_name.rstrip('/').split('/')[-1]}-bnb-4bit"
