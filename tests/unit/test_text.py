"""Text from apps and clients, made safe for the record and the user's terminal."""

from __future__ import annotations

from mlserve.text import log_line, printable


def test_printable_replaces_control_characters():
    assert printable("ok\x1b[2J\nnext") == "ok?[2J?next"


def test_a_log_line_shows_escapes_instead_of_acting_on_them():
    line = "\x1b]0;owned\x07\x1b[31mred\x1b[0m\tcol\rback\u202eevil\x9b1m"
    shown = log_line(line)
    assert shown == "\\x1b]0;owned\\x07\\x1b[31mred\\x1b[0m\tcol\\x0dback\\u202eevil\\x9b1m"
    assert all(c.isprintable() or c == "\t" for c in shown)
    assert log_line("plain text: é, 漢字, emoji 🙂") == "plain text: é, 漢字, emoji 🙂"
