"""`qtool quantize` (placeholder until its issue lands)."""

HELP = "quantize (not implemented yet)"


def quantize(model: str) -> None:
    from qtool.errors import QtoolError

    raise QtoolError("not implemented yet")
