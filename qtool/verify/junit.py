"""JUnit XML for `qtool verify --junit FILE`: one testsuite, one testcase per check.

A failed check is a <failure>; a check that does not apply (no budget given, inference has no
gradients) is <skipped>. "estimate within tolerance" is informational: when the estimate is off by
more than the tolerance the case is <skipped> with the numbers in its message, so CI shows it but
does not go red. Written atomically: a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from qtool.core.errors import BadInput

TITLES = {
    "loads": "loads",
    "finite_loss": "finite loss",
    "finite_grads": "finite gradients",
    "fits_budget": "fits budget",
    "estimate_within_tolerance": "estimate within tolerance",
}


def junit_tree(report: dict) -> ET.ElementTree:
    model = report.get("model", {}).get("name", "model")
    settings = report.get("settings", {})
    classname = f"qtool.verify.{model}.{settings.get('mode', '')}"
    cases = report.get("checks", {})
    failures = sum(1 for c in cases.values() if c["passed"] is False and not c.get("informational"))
    skipped = sum(1 for c in cases.values() if c["passed"] is None or (c["passed"] is False and c.get("informational")))
    seconds = (report.get("load_seconds") or 0) + sum(s.get("seconds", 0) or 0 for s in report.get("steps", []))
    suite = ET.Element("testsuite", name=f"qtool verify {model}", tests=str(len(cases)), failures=str(failures),
                       errors="0", skipped=str(skipped), time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    device = report.get("device", {})
    for key, value in [("device", device.get("name")), ("mode", settings.get("mode")),
                       ("seq_len", settings.get("seq_len")), ("batch_size", settings.get("batch_size")),
                       *[(f"version.{k}", v) for k, v in (report.get("versions") or {}).items()]]:
        if value is not None:
            ET.SubElement(props, "property", name=str(key), value=str(value))
    for key, check in cases.items():
        case = ET.SubElement(suite, "testcase", classname=classname, name=TITLES.get(key, key))
        message = check.get("message", "")
        if check["passed"] is False and not check.get("informational"):
            ET.SubElement(case, "failure", message=message, type=key).text = message
        elif check["passed"] is None or check["passed"] is False:
            prefix = "informational: " if check.get("informational") else ""
            ET.SubElement(case, "skipped", message=prefix + message)
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(suite)
    return ET.ElementTree(suite)


def check_junit_path(path: Path) -> Path:
    """--junit FILE must be writable where it is: checked before anything is loaded, and again on writing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise BadInput("is a directory: --junit needs a file name", path=path)
    parent = path.parent
    if not parent.exists():
        raise BadInput("--junit: directory does not exist", path=parent)
    if not parent.is_dir():
        raise BadInput("--junit: not a directory", path=parent)
    try:  # the verdict is written as a temporary file renamed into place: try exactly that, now
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"--junit: cannot write in this directory ({exc.strerror or exc})", path=parent) from None
    return path


def write_junit(report: dict, path: Path) -> None:
    path = check_junit_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise BadInput(f"--junit: cannot write in this directory ({exc.strerror or exc})", path=path.parent) from None
    try:
        with os.fdopen(fd, "wb") as f:
            junit_tree(report).write(f, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
