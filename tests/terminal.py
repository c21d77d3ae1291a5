"""A command run under a pseudo-terminal, and the screen a terminal would show for its output:
for the progress bar's tests and its screenshot (benchmarks/progress_bar.py)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

_CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclasses.dataclass
class PtyRun:
    returncode: int
    chunks: list[tuple[float, str]]  # (seconds since the start, text) as the terminal got it

    @property
    def output(self) -> str:
        return "".join(text for _, text in self.chunks)


def run_in_pty(
    command: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    columns: int,
    rows: int = 50,
    stderr=None,
    timeout: float = 300,
) -> PtyRun:
    """Runs `command` with its stdout (and its stderr, unless given) on a terminal of
    `columns` x `rows`; returns what that terminal received."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}  # the size is the pty's
    env.setdefault("TERM", "xterm-256color")
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave if stderr is None else stderr,
    )
    os.close(slave)
    start, chunks = time.monotonic(), []
    try:
        while True:
            if time.monotonic() - start > timeout:
                proc.kill()
                raise TimeoutError(f"{command} ran over {timeout}s")
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append((time.monotonic() - start, data.decode(errors="replace")))
    finally:
        os.close(master)
    return PtyRun(proc.wait(), chunks)


def screen(output: str, columns: int) -> list[str]:
    """The rows a terminal `columns` wide shows for `output`: carriage returns, line feeds,
    erase-to-end-of-line (ESC [ K), wrapping at the right margin; other CSI codes ignored."""
    rows, row, col = [[]], 0, 0
    i = 0
    while i < len(output):
        csi = _CSI.match(output, i)
        if csi:
            if csi.group().endswith("K"):
                del rows[row][col:]
            i = csi.end()
            continue
        char = output[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
        elif char >= " ":
            if col == columns:  # a character past the margin wraps to the next row
                row, col = row + 1, 0
            while len(rows) <= row:
                rows.append([])
            line = rows[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
        while len(rows) <= row:
            rows.append([])
    return ["".join(r).rstrip() for r in rows]
