"""Checks that every public name of funcdp has an entry in the API reference.

    python docs/check_api_coverage.py

Public names are those in ``__all__`` of ``funcdp`` and of its public subpackages
(``funcdp.nn``, ``funcdp.optim``, ``funcdp.distributed``, and any other subpackage whose
name does not start with ``_``). An entry is a mkdocstrings directive ``::: path`` in
``docs/api/*.md``. Name ``N`` of module ``M`` counts as documented when a directive's last
path component is ``N`` and either

- the path is ``M.N``, or
- it is on ``M``'s page (``api/funcdp.md`` for ``funcdp``, ``api/optim.md`` for
  ``funcdp.optim``...) or under ``M``'s private counterpart (``funcdp._src.`` for
  ``funcdp``, ``funcdp._src.optim.`` for ``funcdp.optim``), and it resolves to the same
  object.

Exits 1 listing the undocumented names (and directives that do not resolve), else prints
``API coverage: N names, all documented``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"
DIRECTIVE = re.compile(r"^\s*:::\s+([\w.]+)\s*$", re.MULTILINE)
_MISSING = object()


def public_modules() -> list[Any]:
    sys.path.insert(0, str(ROOT))
    import funcdp

    mods = [funcdp]
    for info in pkgutil.iter_modules(funcdp.__path__):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"funcdp.{info.name}"))
    return mods


def resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def directives() -> list[tuple[str, str]]:
    """``(page file name, path)`` for every ``::: path`` in docs/api/*.md."""
    found = []
    for page in sorted(API.glob("*.md")):
        for path in DIRECTIVE.findall(page.read_text()):
            found.append((page.name, path))
    return found


def page_of(module: str) -> str:
    return module.rsplit(".", 1)[-1] + ".md"


def private_prefix(module: str) -> str:
    sub = module[len("funcdp"):]
    return f"funcdp._src{sub}."


def documented(module: Any, name: str, entries: list[tuple[str, str]]) -> bool:
    mname = module.__name__
    obj = getattr(module, name)
    for page, path in entries:
        if path.rsplit(".", 1)[-1] != name:
            continue
        if path == f"{mname}.{name}":
            return True
        if (page == page_of(mname) or path.startswith(private_prefix(mname))) and (
                resolve(path) is obj):
            return True
    return False


def main() -> int:
    entries = directives()
    broken = [f"{page}: ::: {path}" for page, path in entries if resolve(path) is _MISSING]
    missing = []
    total = 0
    for module in public_modules():
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(f"{module.__name__} has no __all__")
            continue
        for name in names:
            total += 1
            if not documented(module, name, entries):
                missing.append(f"{module.__name__}.{name}")
    if broken:
        print("API directives that do not resolve:")
        print("\n".join(f"  {b}" for b in broken))
    if missing:
        print(f"API coverage: {len(missing)} of {total} public names have no entry in "
              f"docs/api/*.md:")
        print("\n".join(f"  {m}" for m in missing))
    if broken or missing:
        return 1
    print(f"API coverage: {total} names, all documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
