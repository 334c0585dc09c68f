"""`qtool estimate` (placeholder until its issue lands)."""

HELP = "estimate (not implemented yet)"


def estimate(model: str) -> None:
    from qtool.errors import QtoolError

    raise QtoolError("not implemented yet")
