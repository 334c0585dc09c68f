"""`qtool verify` (placeholder until its issue lands)."""

HELP = "verify (not implemented yet)"


def verify(model: str) -> None:
    from qtool.errors import QtoolError

    raise QtoolError("not implemented yet")
