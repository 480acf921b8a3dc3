"""QEMU's ``-object`` arguments in JSON: flat objects of strings.  Pure code.

The hook reads and writes the dbus-vmstate object's JSON on every incoming
migration; ``json`` imports ``re`` and costs a hook run about as much as its
own work.  So a flat object of strings is written here, and read here when its
strings hold no escapes (what QEMU's arguments and ours look like); anything
else is read with ``json`` by the caller.
"""

from __future__ import annotations

_WHITESPACE = " \t\n\r"
_SHORT_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def dumps(obj: dict[str, str]) -> str:
    """The compact JSON text of a flat object of strings (``json.dumps`` with ``(",", ":")``
    separators and ``ensure_ascii=False``)."""
    return "{" + ",".join(f"{_quote(key)}:{_quote(value)}" for key, value in obj.items()) + "}"


def _quote(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ch < " " for ch in text):
        text = "".join(_SHORT_ESCAPES.get(ch, f"\\u{ord(ch):04x}") if ch < " " else ch for ch in text)
    return f'"{text}"'


def loads(text: str) -> dict[str, str] | None:
    """The object, when ``text`` is a JSON object whose keys and values are all strings
    without escapes; None for anything else (other JSON, or not JSON at all)."""
    pos = _skip(text, 0)
    if text[pos:pos + 1] != "{":
        return None
    pos = _skip(text, pos + 1)
    obj: dict[str, str] = {}
    if text[pos:pos + 1] != "}":
        while True:
            key, pos = _string(text, pos)
            pos = _skip(text, pos)
            if key is None or text[pos:pos + 1] != ":":
                return None
            value, pos = _string(text, _skip(text, pos + 1))
            if value is None:
                return None
            obj[key] = value  # a repeated key: the last one wins, as with json
            pos = _skip(text, pos)
            if text[pos:pos + 1] == "}":
                break
            if text[pos:pos + 1] != ",":
                return None
            pos = _skip(text, pos + 1)
    return obj if _skip(text, pos + 1) == len(text) else None


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _string(text: str, pos: int) -> tuple[str | None, int]:
    if text[pos:pos + 1] != '"':
        return None, pos
    end = text.find('"', pos + 1)
    if end < 0:
        return None, pos
    value = text[pos + 1:end]
    if "\\" in value or any(ch < " " for ch in value):
        return None, pos
    return value, end + 1
