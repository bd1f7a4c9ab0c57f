"""Griffe extension for the docs build: read mlopt's docstring conventions as Markdown.

mlopt's docstrings are Google style with two reStructuredText habits, which this extension
rewrites before mkdocstrings parses them (the source files are not changed):

- ``Example:`` (singular) starts the doctest section: renamed ``Examples:`` so that griffe renders
  the ``>>>`` lines as code instead of Markdown text.
- Sphinx roles (``:class:`Problem```, ``:func:`~mlopt.linalg.cg```, ``:mod:`mlopt.runtime```)
  become autorefs cross-references, resolved in the scope of the documented object. A target that
  resolves to an mlopt object gets a required link (so ``mkdocs build --strict`` fails if it is
  not rendered anywhere); anything else (``torch.autograd.grad``, ``ValueError``) is plain code.
- A line ending in ``::`` (a reST literal block follows) ends in ``:`` instead.

Loaded by ``mkdocs.yml`` (``plugins: mkdocstrings: handlers: python: options: extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?P<role>class|func|meth|mod|attr|exc|data|obj):`(?P<target>[^`]+)`")
_EXAMPLE = re.compile(r"^(?P<indent>\s*)Example:\s*$", re.MULTILINE)
_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)
_CALLABLE = {"func", "meth"}


def _lookup(loader: griffe.GriffeLoader, path: str) -> griffe.Object | griffe.Alias | None:
    try:
        return loader.modules_collection[path]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _resolve(obj: griffe.Object, loader: griffe.GriffeLoader, target: str) -> str | None:
    """The mlopt path ``target`` names in the scope of ``obj``, or None."""
    first, _, rest = target.partition(".")
    candidates = []
    if first == "mlopt":
        candidates.append(target)
    else:
        scope: griffe.Object | None = obj
        while scope is not None:  # the object, then each enclosing class and module
            try:
                base = scope.resolve(first)
            except griffe.NameResolutionError:
                scope = scope.parent
                continue
            candidates.append(f"{base}.{rest}" if rest else base)
            break
    for path in candidates:
        if path.startswith("mlopt") and _lookup(loader, path) is not None:
            return path
    return None


def _rewrite(obj: griffe.Object, loader: griffe.GriffeLoader, text: str) -> str:
    def role(match: re.Match[str]) -> str:
        kind, target = match["role"], match["target"].strip()
        short = target.startswith("~")
        target = target.lstrip("~.")
        shown = target.rsplit(".", 1)[-1] if short else target
        if kind in _CALLABLE:
            shown += "()"
        path = _resolve(obj, loader, target)
        return f"[`{shown}`][{path}]" if path else f"`{shown}`"

    text = _EXAMPLE.sub(r"\g<indent>Examples:", text)
    text = _LITERAL.sub(":", text)
    return _ROLE.sub(role, text)


def _walk(obj: griffe.Object, seen: set[int]) -> Any:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    for member in obj.members.values():
        if isinstance(member, griffe.Alias):
            continue
        yield from _walk(member, seen)


class MloptDocstrings(griffe.Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for obj in _walk(pkg, set()):
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, loader, obj.docstring.value)
