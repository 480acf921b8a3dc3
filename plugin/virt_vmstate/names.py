"""What a name from domain XML, the bus or the config must look like.  Pure code.

A name that passes ``is_name`` can become a file name or a program argument:
it is ASCII, starts with a letter or digit, and holds no ``/`` and no ``..``.
Written without ``re``, which the hook would otherwise import for nothing else.
"""

from __future__ import annotations

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_HEX = frozenset("0123456789abcdef")


def is_name(text: str, max_len: int = 64, punctuation: str = "_.-") -> bool:
    """1 to ``max_len`` letters, digits or ``punctuation``, the first a letter or digit, no ``..``."""
    if not 0 < len(text) <= max_len or text[0] not in _ALNUM or ".." in text:
        return False
    allowed = _ALNUM.union(punctuation)
    return all(ch in allowed for ch in text)


def is_hex(text: str, length: int) -> bool:
    """Exactly ``length`` lowercase hex digits."""
    return len(text) == length and all(ch in _HEX for ch in text)


def canonical_uuid(text: str) -> str | None:
    """The UUID in libvirt's form (lowercase, 8-4-4-4-12), or None when ``text`` is not one.

    Accepts what libvirt accepts in a domain's ``<uuid>``: any case, dashes or none.
    """
    digits = text.strip().lower().replace("-", "")
    if not is_hex(digits, 32):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
