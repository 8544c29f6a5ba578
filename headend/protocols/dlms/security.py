"""Ciphering of xDLMS APDUs with the global keys (security suite 0), and invocation counters.

Both glo-ciphering (service-specific tags: glo-get-request 0xC8 ...) and
general-glo-ciphering (0xDB, with the sender's system title) are understood; answers use the
form of the request. Invocation counters never repeat: the client's come from a durable
store, reserved (committed) before use, and a peer's counter must grow (a meter starting
at 0 is fine).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from headend.protocols.dlms import axdr, codec
from headend.storage.sqlite_db import connect_durable, write_transaction

GLO = {0xC0: 0xC8, 0xC1: 0xC9, 0xC3: 0xCB, 0xC4: 0xCC, 0xC5: 0xCD, 0xC7: 0xCF}
UNGLO = {v: k for k, v in GLO.items()}
GENERAL_GLO = 0xDB


class ProtectionError(ValueError):
    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


@dataclass
class Protection:
    keys: codec.Keys
    own_title: bytes
    peer_title: bytes
    next_counter: Callable[[], int]
    peer_counter: int = -1
    general: bool = False

    def wrap(self, apdu: bytes, counter: int | None = None) -> bytes:
        """`counter`: one reserved beforehand (off the event loop: a reservation is an fsync)."""
        if counter is None:
            counter = self.next_counter()
        body = bytes([codec.SC_AUTH_ENC]) + counter.to_bytes(4, "big")
        body += codec.encrypt(codec.SC_AUTH_ENC, self.own_title, counter, self.keys, apdu)
        if self.general:
            return bytes([GENERAL_GLO, 8]) + self.own_title + axdr.encode_length(len(body)) + body
        if apdu[0] not in GLO:
            raise ProtectionError(f"no glo-ciphered form for APDU 0x{apdu[0]:02x}")
        return bytes([GLO[apdu[0]]]) + axdr.encode_length(len(body)) + body

    def unwrap(self, apdu: bytes) -> bytes:
        r = axdr.Reader(apdu)
        try:
            tag = r.take(1)[0]
            if tag == GENERAL_GLO:
                title = r.take(r.length())
                if title and title != self.peer_title:
                    raise ProtectionError(f"system title {title.hex()} is not the peer's", apdu)
                self.general = True
            elif tag not in UNGLO:
                raise ProtectionError(f"expected a ciphered APDU, got tag 0x{tag:02x}", apdu)
            body = r.take(r.length())
        except axdr.AxdrError as exc:
            raise ProtectionError(f"ciphered APDU cut short: {exc}", apdu) from None
        if r.pos != len(apdu) or len(body) < 5 + 12:
            raise ProtectionError("ciphered APDU of the wrong length", apdu)
        sc, counter = body[0], int.from_bytes(body[1:5], "big")
        if sc != codec.SC_AUTH_ENC:
            raise ProtectionError(f"security control 0x{sc:02x}; only authenticated encryption is accepted", apdu)
        if counter <= self.peer_counter:
            raise ProtectionError(f"invocation counter {counter} not above {self.peer_counter}: a replay", apdu)
        try:
            plain = codec.decrypt(sc, self.peer_title, counter, self.keys, body[5:])
        except codec.AcseError as exc:
            raise ProtectionError(str(exc), apdu) from None
        self.peer_counter = counter
        return plain


def hls_reply(title: bytes, counter: int, keys: codec.Keys, challenge: bytes) -> bytes:
    """f(challenge) for reply_to_HLS_authentication: SC || IC || GMAC(SC || AK || challenge)."""
    return bytes([codec.SC_AUTH]) + counter.to_bytes(4, "big") + codec.gmac(title, counter, keys, challenge)


def hls_check(value: bytes, title: bytes, keys: codec.Keys, challenge: bytes) -> bool:
    if len(value) != 17 or value[0] != codec.SC_AUTH:
        return False
    return hls_reply(title, int.from_bytes(value[1:5], "big"), keys, challenge) == value


class InvocationCounters:
    """Durable invocation counters of this client: reserved before use, never reused.

    An AES-GCM nonce is the sender's system title and its invocation counter, so a counter
    sequence belongs to a (system title, key) pair: meters that share global keys share one
    sequence (each sees it increase, with gaps), and no nonce is ever used twice under a
    key. A new sequence starts above every counter this store has handed out before, so a
    meter never sees a counter go back (upgrades from per-meter counters included).
    """

    def __init__(self, path: str | Path) -> None:
        self._db = connect_durable(Path(path))
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (meter TEXT PRIMARY KEY, next INTEGER NOT NULL)")
        self._lock = threading.Lock()

    @staticmethod
    def scope(system_title: bytes, keys: bytes) -> str:
        return f"{system_title.hex()}:{hashlib.sha256(keys).hexdigest()[:16]}"

    def reserve(self, scope: str) -> int:
        with self._lock, write_transaction(self._db) as db:
            row = db.execute("SELECT next FROM counters WHERE meter = ?", (scope,)).fetchone()
            if row is not None:
                value = row[0]
            else:
                value = db.execute("SELECT coalesce(max(next), 1) FROM counters").fetchone()[0]
            if value > 0xFFFFFFFF:
                raise ProtectionError(f"{scope}: invocation counter exhausted; the global keys must be changed")
            db.execute("INSERT OR REPLACE INTO counters (meter, next) VALUES (?, ?)", (scope, value + 1))
        return int(value)

    def close(self) -> None:
        self._db.close()
