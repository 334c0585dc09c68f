"""The one error hierarchy. Library code raises these; the CLI maps them to a line and an exit code."""

from __future__ import annotations

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3
EXIT_NOT_FINITE = 4
EXIT_INTERRUPTED = 130


def one_line(exc: BaseException, limit: int = 400) -> str:
    """A library's message as one line: its lines joined, so the reason after "...validator 'x':" survives."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class QtoolError(Exception):
    """Base class: `str(err)` is the one line shown to the user."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, path: object | None = None, hint: str | None = None):
        self.path = path
        self.hint = hint
        text = f"{path}: {message}" if path is not None else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class BadInput(QtoolError):
    """The user gave something we cannot use: a path, a file, a value."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInput):
    """A setting or a config.json is malformed or unknown."""


class WeightsError(BadInput):
    """A checkpoint file is missing, corrupt, unsafe or does not match its config."""


class HubError(BadInput):
    """The hub refused, was unreachable, or we are offline without a cached copy."""


class DeviceError(BadInput):
    """No usable device (e.g. CUDA asked for, none present)."""


class DoesNotFit(QtoolError):
    """Memory needed exceeds the budget."""

    exit_code = EXIT_DOES_NOT_FIT


class NotFinite(QtoolError):
    """Loss or gradients went NaN/inf."""

    exit_code = EXIT_NOT_FINITE


class RecipeFailed(QtoolError):
    """The recipe's own libraries failed while running the steps (not qtool, not the input): e.g. torch.compile."""

    exit_code = EXIT_INTERNAL


class OutputError(QtoolError):
    """The output could not be written: disk full, quota exceeded, file-size limit. Nothing is left behind."""

    exit_code = EXIT_INTERNAL


# Signals (130 SIGINT, 143 SIGTERM, 129 SIGHUP) are not QtoolErrors: see qtool.core.signals.Stopped.
