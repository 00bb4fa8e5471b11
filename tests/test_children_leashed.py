"""Every process a test, a benchmark or the demo starts dies with its parent, whatever killed
the parent: each ``subprocess.Popen`` in tests/, bench/ and segflow/ starts its program through
:func:`segflow.runtime.leash.leashed` (the kernel's death signal), or says in the call why it
does not need to. A plain ``Popen`` left the scale-out test's services running for an hour
after its pytest was killed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALL = re.compile(r"subprocess\.Popen\(")


def test_every_popen_is_leashed() -> None:
    unleashed = []
    for folder in ("tests", "bench", "segflow", "services"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            for m in CALL.finditer(text):
                call = text[m.end() : m.end() + 400]
                if "leashed(" not in call.split(")\n")[0] and "not leashed:" not in call:
                    line = text.count("\n", 0, m.start()) + 1
                    unleashed.append(f"{path.relative_to(ROOT)}:{line}")
    assert unleashed == [], unleashed
