"""A null-modem cable made of two real pseudo-terminals.

`NullModem` opens two pty pairs and copies bytes between their master sides, so a program
that opens `a` (a simulator) and one that opens `b` (the head-end) talk as over an RS-232 /
RS-485 line, through the kernel's tty layer, with pyserial on both ends.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import tty
from types import TracebackType


class NullModem:
    def __init__(self) -> None:
        self._masters: list[int] = []
        self._slaves: list[int] = []
        self.names: list[str] = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._masters.append(master)
            self._slaves.append(slave)
            self.names.append(os.ttyname(slave))
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, name="null-modem", daemon=True)
        self.bytes_carried = 0

    @property
    def a(self) -> str:
        return self.names[0]

    @property
    def b(self) -> str:
        return self.names[1]

    def start(self) -> NullModem:
        self._thread.start()
        return self

    def _pump(self) -> None:
        sel = selectors.DefaultSelector()
        for i, fd in enumerate(self._masters):
            sel.register(fd, selectors.EVENT_READ, i)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    sel.close()
                    return
                src = self._masters[key.data]
                dst = self._masters[1 - key.data]
                try:
                    data = os.read(src, 4096)
                except (BlockingIOError, OSError):
                    continue
                self.bytes_carried += len(data)
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(dst, view)
                    except BlockingIOError:
                        continue
                    view = view[n:]

    def close(self) -> None:
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join(timeout=5)
        for fd in (*self._masters, *self._slaves, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._masters.clear()
        self._slaves.clear()

    def __enter__(self) -> NullModem:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
