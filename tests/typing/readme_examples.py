"""Writes every ```python block of the README into one module, each as the
body of a function, for mypy --strict: the examples users copy must type-check.

    python tests/typing/readme_examples.py OUT.py && mypy --strict OUT.py
"""

from __future__ import annotations

import os
import re
import sys
import textwrap

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def module_text(readme: str) -> str:
    parts = ['"""The README\'s Python examples, one function each (made by readme_examples.py)."""\n']
    for n, match in enumerate(BLOCK.finditer(readme), 1):
        line = readme.count("\n", 0, match.start()) + 1
        parts.append(f"\n\ndef readme_line_{line}() -> None:   # example {n}\n")
        parts.append(textwrap.indent(match.group(1), "    "))
    if len(parts) == 1:
        raise SystemExit(f"no ```python blocks in {README}")
    return "".join(parts)


if __name__ == "__main__":
    with open(README, encoding="utf-8") as f:
        text = module_text(f.read())
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write(text)
