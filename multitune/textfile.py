"""Reading a text file the user gave us (a config, a data file): its text, or one line naming the
line of its first byte that is not UTF-8, instead of a UnicodeDecodeError traceback."""

from __future__ import annotations

from pathlib import Path

from multitune.errors import MultituneError


def read_text(path: Path, encoding: str = "utf-8") -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MultituneError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None
