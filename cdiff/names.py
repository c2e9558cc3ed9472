"""Class and domain names made safe where they become file names, MLflow keys or Markdown.

Class names come from image folders, datasets and adapter files a user may be handed: a class
called `../../x` or `<script>` must not write outside an output folder or inject into a report.
"""

from __future__ import annotations

_MARKDOWN_SPECIAL = set("\\`*_{}[]#|")


def safe_name(text: str, fallback: str = "class") -> str:
    """Letters, digits, '-' and '_' only (anything else becomes '_'): no path separators, no '..'."""
    out = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in str(text))
    return out.strip("_") or fallback


def safe_names(names: list[str]) -> list[str]:
    """safe_name of each, made unique (`a/b` and `a_b` both map to `a_b`: the second becomes `a_b-2`)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        base = safe_name(name)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def markdown_text(text: str) -> str:
    """Plain text for a Markdown table cell: specials escaped, HTML neutralised, one line."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return "".join(f"\\{c}" if c in _MARKDOWN_SPECIAL else c for c in text)
