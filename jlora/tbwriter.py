"""A minimal TensorBoard scalar writer with no TensorFlow / tensorboardX dependency.

TensorBoard reads ``events.out.tfevents.*`` files: TFRecord framing (length, masked CRC32C of the length, the
payload, masked CRC32C of the payload) around serialized ``Event`` protocol buffers. Scalars need three
messages, encoded here by hand:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
              SessionLog session_log = 7; }
    SessionLog { Status status = 1; }  // START = 1: a restart, see ``purge_step``
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Dict, Iterator, Optional, Tuple


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, summary: bytes = b"", file_version: str = "",
           session_start: bool = False) -> bytes:
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
    if file_version:
        out += _field_bytes(3, file_version.encode())
    if summary:
        out += _field_bytes(5, summary)
    if session_start:  # Event.session_log = 7 { SessionLog.status = 1: START = 1 }
        out += _field_bytes(7, b"\x08\x01")
    return out


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


class SummaryWriter:
    """Appends scalar summaries to a new event file in ``logdir``.

    Args:
      logdir: directory (created); TensorBoard is pointed at it or at a parent.
      purge_step: a resumed run's first new step: the file starts with a ``SessionLog.START`` event at this
        step, on which TensorBoard's reader drops every event of ``logdir`` at a step >= ``purge_step`` read
        before it (what an interrupted run logged after its last checkpoint), so each step appears once.
        (tensorboardX's and ``tf.summary``'s ``purge_step`` work the same way.) The new file's name sorts
        after the directory's existing event files, since TensorBoard reads them in name order.

    Example:
      >>> w = SummaryWriter(f"{tmp}/tb"); w.scalars(10, {"train/loss": 2.3, "train/lr": 1e-4}); w.close()
      >>> import os; os.listdir(f"{tmp}/tb")
      ['events.out.tfevents...']
    """

    def __init__(self, logdir: str, purge_step: Optional[int] = None):
        os.makedirs(logdir, exist_ok=True)
        stamp = int(time.time())
        for old in os.listdir(logdir):  # a later name than every earlier file's, even within one second
            parts = old.split(".")
            if old.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
                stamp = max(stamp, int(parts[3]) + 1)
        name = f"events.out.tfevents.{stamp}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._f.write(_record(_event(0, time.time(), file_version="brain.Event:2")))
        if purge_step is not None:
            self._f.write(_record(_event(purge_step, time.time(), session_start=True)))
        self._f.flush()

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        """Writes one event holding every ``tag: value`` at ``step``."""
        summary = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
            for tag, v in values.items())
        self._f.write(_record(_event(step, time.time(), summary)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_scalars(path: str) -> Iterator[Tuple[int, str, float]]:
    """Yields ``(step, tag, value)`` from an event file, checking every CRC (used by tests and `jlora eval`)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        length_bytes = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", length_bytes)
        (crc_len,) = struct.unpack("<I", data[pos + 8:pos + 12])
        payload = data[pos + 12:pos + 12 + n]
        (crc_data,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        if crc_len != _masked_crc(length_bytes) or crc_data != _masked_crc(payload):
            raise ValueError(f"{path}: corrupt event record at byte {pos}")
        pos += 16 + n
        yield from _parse_event(payload)


def _read_varint(b: bytes, i: int):
    shift = result = 0
    while True:
        byte = b[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, v


def _parse_event(payload: bytes):
    step, summary = 0, None
    for field, v in _fields(payload):
        if field == 2:
            step = v
        elif field == 5:
            summary = v
    if summary is None:
        return
    for field, value in _fields(summary):
        if field != 1:
            continue
        tag, simple = None, None
        for f2, v2 in _fields(value):
            if f2 == 1:
                tag = v2.decode()
            elif f2 == 2:
                (simple,) = struct.unpack("<f", v2)
        if tag is not None and simple is not None:
            yield step, tag, simple
