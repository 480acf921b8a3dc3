"""What a name from domain XML, the bus or the config must look like, and UUIDs.  Pure code.

A name that passes ``is_name`` can become a file name or a program argument:
it is ASCII, starts with a letter or digit, and holds no ``/`` and no ``..``.
Written without ``re``, which the hook would otherwise import for nothing else.
"""

from __future__ import annotations

import os

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


# UUIDs as bytes and back, for the binary formats, without the uuid module (which
# imports platform: 2.7 ms on the path of a migration's Save).

def uuid_bytes(text: str) -> bytes:
    """The 16 bytes of a UUID in any form ``canonical_uuid`` accepts; ValueError otherwise."""
    canonical = canonical_uuid(text)
    if canonical is None:
        raise ValueError(f"{text[:40]!r} is not a UUID")
    return bytes.fromhex(canonical.replace("-", ""))


def uuid_text(raw: bytes) -> str:
    """The canonical form of a UUID's 16 bytes."""
    if len(raw) != 16:
        raise ValueError(f"a UUID is 16 bytes, not {len(raw)}")
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def random_uuid() -> str:
    """A random (version 4) UUID in canonical form."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return uuid_text(bytes(raw))
