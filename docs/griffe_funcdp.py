"""A Griffe extension that renders funcdp's docstrings as their authors meant them.

funcdp's docstrings are Google style with a few Sphinx habits that Griffe's Google parser
reads differently. This extension rewrites the docstring text for the docs only (the
source is not touched):

- ``Example:`` becomes ``Examples:`` (Griffe parses only the plural as a section of
  doctests; the singular becomes an admonition whose ``>>>`` lines render as quotes);
- an argument line naming several parameters (``a, b: ...`` or ``*args, **kwargs: ...``)
  becomes one line per parameter, so each is matched to the signature;
- Sphinx roles (``:func:`x```, ``:class:`x```...) become plain code (``x``), and a
  reST literal-block marker ``::`` a plain colon.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_LITERAL = re.compile(r"::\n\n")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params):\s*$")
_MULTI = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):\s*(.*)$")


def _split_params(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    in_args = False
    args_indent = 0
    param_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SECTION.match(line):
            in_args = True
            args_indent = len(line) - len(line.lstrip())
            param_indent = None
            out.append(line)
            i += 1
            continue
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if in_args and stripped and indent <= args_indent:
            in_args = False
        if in_args and stripped and param_indent is None:
            param_indent = indent
        m = _MULTI.match(line) if in_args and indent == param_indent else None
        if m is None:
            out.append(line)
            i += 1
            continue
        pad, names, first = m.groups()
        # The description: this line's rest and the more indented lines that follow.
        desc = [first]
        i += 1
        while (i < len(lines) and lines[i].strip()
               and len(lines[i]) - len(lines[i].lstrip()) > len(pad)):
            desc.append(lines[i].strip())
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{pad}{name}: {' '.join(desc)}")
    return "\n".join(out)


def _rewrite(text: str) -> str:
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _ROLE.sub(r"`\1`", text)
    text = _LITERAL.sub(":\n\n", text)
    return _split_params(text)


class FuncdpDocstrings(griffe.Extension):
    """Rewrites each object's docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value)
