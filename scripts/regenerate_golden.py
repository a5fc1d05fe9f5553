"""Rewrite tests/golden/*.txt from the current code (NumPy), for tests/test_golden.py.

    .venv/bin/python scripts/regenerate_golden.py

Run it only when a change to what the user reads is intended; then review the change with
``git diff tests/golden`` and commit it with the change that caused it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from golden_cases import CASES, GOLDEN, demo  # noqa: E402


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    outputs = {name: case(np, "cpu") + "\n" for name, case in CASES.items()}
    outputs["demo"] = demo()
    for name, text in outputs.items():
        path = GOLDEN / f"{name}.txt"
        old = path.read_text(encoding="utf-8") if path.exists() else None
        path.write_text(text, encoding="utf-8")
        print(f"{'unchanged' if old == text else 'rewrote  '} {path.relative_to(ROOT)}")
    print("review with: git diff tests/golden")


if __name__ == "__main__":
    main()
