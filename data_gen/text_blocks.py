"""Code blocks in text: fenced blocks of a model's answer, and every block of a Markdown document.

Two readings, for two jobs:

* ``code_blocks`` / ``python_blocks``: what a generator accepts (data_gen.textbook, data_gen.exercises):
  closed backtick fences at the start of a line, with their language tag; only blocks tagged
  python / py / python3 are Python (untagged fences often hold output).
* ``all_code_blocks``: everything that may be code, for decontamination (data_gen.decontaminate):
  fences of backticks or tildes (tagged or not, indented or not; an unclosed fence runs to the
  end) and indented blocks, each dedented.
"""
from __future__ import annotations

import re
import textwrap

PYTHON_TAGS = ("python", "py", "python3")
_TAGGED_FENCE = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_FENCE_LINE = re.compile(r"^[ \t]*(`{3,}|~{3,})(.*)$")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, lower-cased; code) of every closed backtick fence."""
    return [(m.group(1).lower(), m.group(2)) for m in _TAGGED_FENCE.finditer(text)]


def python_blocks(text: str) -> list[str]:
    """Blocks tagged python / py / python3 (untagged blocks often hold output, not code)."""
    return [code for lang, code in code_blocks(text) if lang in PYTHON_TAGS]


def _indented(line: str) -> bool:
    return line.startswith(("    ", "\t")) and bool(line.strip())


def all_code_blocks(text: str) -> list[str]:
    """Every code block of a Markdown-style document, dedented, whatever its language tag:
    fenced with backticks or tildes (tagged or not; an unclosed fence runs to the end), and
    indented (4+ spaces or a tab, after a blank line or at the start)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE_LINE.match(lines[i])
        if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
            close = re.compile(rf"^[ \t]*{re.escape(m.group(1)[0])}{{{len(m.group(1))},}}[ \t]*$")
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                j += 1
            blocks.append(textwrap.dedent("\n".join(lines[i + 1:j])))
            i = j + 1
        elif _indented(lines[i]) and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (_indented(lines[j]) or not lines[j].strip()) \
                    and not _FENCE_LINE.match(lines[j]):
                j += 1
            blocks.append(textwrap.dedent("\n".join(lines[i:j])))
            i = j
        else:
            i += 1
    return blocks
