"""The output transaction: a staging directory beside the destination, renamed into place on success.

Nothing is written at the destination until everything succeeded: `staging_dir` creates
`.<name>.qtool-tmp-XXXX` beside it and renames it into place at the end; on any error, Ctrl-C or signal the
staging directory is removed and the destination is untouched (with --force, an existing destination
is replaced only after success). `check_destination` refuses, before any work, what cannot end well.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qtool.core import signals
from qtool.core.errors import BadInput, OutputError

_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file too large (file-size limit reached)"}


def output_error(exc: BaseException, destination: Path) -> OutputError | None:
    """A full disk, quota or file-size limit while writing -> one clear line naming the file; else None.

    Every file is written in the staging folder, which is gone by now: name it as it would have been
    in the destination."""
    if not isinstance(exc, OSError) or exc.errno not in _DISK_FULL:
        return None
    where = Path(destination) / Path(exc.filename).name if exc.filename else "the output"
    return OutputError(f"{_DISK_FULL[exc.errno]} writing {where}; nothing was left at {destination}")


def staging_name(dest: Path) -> str:
    return f".{dest.name}.qtool-tmp-"


def check_destination(dest: Path, *, force: bool, source: Path | None = None) -> None:
    """Refuse what we must not overwrite, or cannot write, before any work is done."""
    dest = Path(dest)
    short = str(dest)[:80] + ("..." if len(str(dest)) > 80 else "")
    try:
        dest.exists()
        os.pathconf(_missing_parents(dest)[0], "PC_NAME_MAX")
    except OSError as exc:
        raise BadInput(f"not a usable path ({exc.strerror})", path=short) from None
    if len(_missing_parents(dest)[1]) > 32:
        raise BadInput(f"would create {len(_missing_parents(dest)[1])} missing folders above the destination",
                       path=short, hint="create its parent folder first")
    if len(staging_name(dest).encode()) + 8 > os.pathconf(_missing_parents(dest)[0], "PC_NAME_MAX"):
        raise BadInput("name too long: the staging folder beside it would not fit the filesystem's limit", path=short)
    if dest.exists() or dest.is_symlink():
        if not force:
            raise BadInput("destination already exists", path=dest, hint="pass --force to replace it after success")
        if not dest.is_dir() or dest.is_symlink():
            raise BadInput("destination exists and is not a directory", path=dest)
    cwd = Path.cwd().resolve()
    if dest.resolve() == cwd or dest.resolve() in cwd.parents:
        raise BadInput("destination is the working directory or contains it: it cannot be replaced from inside",
                       path=dest, hint="cd elsewhere or choose another --out")
    if source is not None:
        src, dst = Path(source).resolve(), dest.resolve()
        if dst == src or src in dst.parents:
            raise BadInput(f"destination is inside the source checkpoint {source}", path=dest)
        if dst in src.parents:
            raise BadInput(f"destination contains the source checkpoint {source}", path=dest)
    _check_parent(dest)


def _parent(dest: Path) -> Path:
    return dest.parent if str(dest.parent) else Path(".")


def _missing_parents(dest: Path) -> tuple[Path, list[Path]]:
    """(nearest existing ancestor of dest, the folders above dest that do not exist yet, outermost first).
    Raises BadInput when an ancestor exists but is not a directory."""
    missing: list[Path] = []
    p = _parent(dest)
    while not p.exists():
        if p.is_symlink():  # a dangling link: mkdir would fail on it
            raise BadInput(f"cannot create the destination: {p} is a broken symlink", path=dest)
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise BadInput(f"cannot create the destination: parent {p} is not a directory", path=dest)
    return p, missing[::-1]


def _folder_error(exc: OSError, dest: Path, where: Path) -> BadInput | OutputError:
    """mkdir/mkdtemp failing beside the destination -> one line naming the folder. A full disk is an
    output error (exit 1); anything else says the destination is not a place to write (exit 2)."""
    if exc.errno == errno.ENOTDIR:
        return BadInput(f"cannot create the destination: a parent of it is not a directory ({where})", path=dest)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInput(f"cannot create the destination: {where} is not writable ({exc.strerror})", path=dest)
    if exc.errno in _DISK_FULL:
        return OutputError(f"cannot create the destination in {where}: {exc.strerror or exc}", path=dest)
    return BadInput(f"cannot create the destination in {where}: {exc.strerror or exc}", path=dest)


def _check_parent(dest: Path) -> None:
    """The destination's folder (or the nearest one that exists) must take a new subfolder: try it."""
    existing, _ = _missing_parents(dest)
    with signals.held():  # made and removed at once: a signal between the two would leave it behind
        try:
            probe = tempfile.mkdtemp(prefix=staging_name(dest), dir=existing)
        except OSError as exc:
            raise _folder_error(exc, dest, existing) from None
        with contextlib.suppress(OSError):
            os.rmdir(probe)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_dir(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh directory beside `dest`; on success it becomes `dest`, on any failure it vanishes
    (and so do the parent folders created for it)."""
    dest = Path(dest)
    parent = _parent(dest)
    _, created = _missing_parents(dest)
    tmp: Path | None = None

    def undo() -> None:  # on failure, and what qtool.core.signals' watchdog runs if it must end the process
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):  # innermost first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    try:
        with signals.cleanup(undo):
            try:
                with signals.held():  # the folder exists only once `tmp` names it for undo()
                    parent.mkdir(parents=True, exist_ok=True)
                    tmp = Path(tempfile.mkdtemp(prefix=staging_name(dest), dir=parent))
            except OSError as exc:
                raise _folder_error(exc, dest, parent) from None
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a folder made by mkdir would not be
            with signals.commit_section():  # a signal from here on is held; once renamed, it is ignored
                _move_into_place(tmp, dest, parent, force)
                signals.mark_committed()
    except BaseException:
        undo()
        raise


def _move_into_place(tmp: Path, dest: Path, parent: Path, force: bool) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if not force:
        raise BadInput("destination appeared while writing", path=dest)
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.qtool-old-", dir=parent))
    try:
        os.rename(dest, old / "d")
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old / "d", dest)  # put the previous output back
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            old.rmdir()  # empty unless the old output could not be put back
        raise
    shutil.rmtree(old, ignore_errors=True)
