"""Everything that talks to the Hugging Face hub, through huggingface_hub only.

huggingface_hub itself honours HF_TOKEN, HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT; this module
turns its exceptions into one-line qtool errors and never prints a token.
"""

from __future__ import annotations

from pathlib import Path

from qtool.errors import HubError


def fetch_config(repo_id: str, *, revision: str | None = None) -> Path:
    """Download (or find in the cache) only config.json of `repo_id`."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as exc:  # mapped precisely in the hub issue's work
        raise HubError(f"cannot fetch config.json: {type(exc).__name__}", path=repo_id) from None
