"""Class and domain names: checked where they enter, made safe where they become file names, MLflow keys or Markdown.

Class names come from image folders, datasets and adapter files a user may be handed: a class
called `../../x` or `<script>` must not write outside an output folder or inject into a report.
"""

from __future__ import annotations

from cdiff.errors import CdiffError, shown

_MARKDOWN_SPECIAL = set("\\`*_{}[]#|")
MAX_NAME_LENGTH = 100


def check_class_names(names, key: str, limit: int | None = None) -> list[str]:
    """A non-empty list of distinct, printable, non-blank names of at most MAX_NAME_LENGTH characters.

    `limit`: how many classes the model has room for. Undecodable bytes (a non-UTF-8 folder name)
    and control characters are not printable, so they are refused here rather than crash a report later.
    """
    if not isinstance(names, list) or not names:
        raise CdiffError(f"{key}: expected a non-empty list of class names, got {shown(names)}")
    if limit is not None and len(names) > limit:
        raise CdiffError(f"{key}: {len(names)} class names, but the model has room for {limit} classes")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise CdiffError(f"{key}: class names must be non-blank strings, got {shown(name)}")
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise CdiffError(
                f"{key}: class name {shown(name)} must be printable text of at most {MAX_NAME_LENGTH} characters "
                "(no control characters or undecodable bytes): rename it"
            )
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise CdiffError(f"{key}: class name {shown(twice)} appears twice: class names must be distinct")
    return names


def safe_name(text: str, fallback: str = "class") -> str:
    """Letters, digits, '-' and '_' only (anything else becomes '_'): no path separators, no '..'."""
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in str(text))
    return out.strip("_") or fallback


def safe_names(names: list[str]) -> list[str]:
    """safe_name of each, made unique (`a/b` and `a_b` both map to `a_b`: the second becomes `a_b-2`)."""
    out: list[str] = []
    for name in names:
        base = candidate = safe_name(name)
        n = 1
        while candidate in out:  # also when a suffixed name is itself taken (`a_b-2` given as a name)
            n += 1
            candidate = f"{base}-{n}"
        out.append(candidate)
    return out


def markdown_text(text: str) -> str:
    """Plain text for a Markdown table cell: specials escaped, HTML neutralised, one line, valid UTF-8."""
    text = " ".join(str(text).encode("utf-8", "replace").decode("utf-8").split())
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return "".join(f"\\{c}" if c in _MARKDOWN_SPECIAL else c for c in text)
