"""Text an app or a client wrote, made safe to store and to show on the user's terminal."""

from __future__ import annotations

# printable: control characters (terminal escapes, newlines) become '?'. Defined with the probes, which
# run inside instances too, without mlserve.
from mlserve_runtime.health import printable as printable


def log_line(text: str) -> str:
    """One line of an app's log: tabs stay; every other control or format character (escape sequences,
    carriage returns, bidirectional overrides) is shown escaped, as \\x1b or \\u202e, never acted on."""
    return "".join(c if c.isprintable() or c == "\t" else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
