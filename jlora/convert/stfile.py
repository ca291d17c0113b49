"""Reading and writing safetensors files with numpy only (no torch), with errors that name the file.

The format: 8 bytes little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw tensor bytes
(offsets relative to the end of the header). bfloat16 arrays use `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Mapping, Optional

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A memory-mapped safetensors file; `get(name)` returns a numpy array (a view into the map).

    Args:
      path: the file.

    Raises ValueError naming the file when it is truncated, corrupt or uses an unknown dtype.
    """

    def __init__(self, path: str):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"{self.path}: corrupt or truncated safetensors file (header length {n}, "
                                 f"file size {size})")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        data_size = size - self._data_start
        for name, e in header.items():
            try:
                begin, end = e["data_offsets"]
                dtype, shape = e["dtype"], tuple(int(s) for s in e["shape"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: corrupt safetensors entry for tensor {name!r}") from None
            if dtype not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r} "
                                 f"(supported: {', '.join(DTYPES)})")
            if end > data_size:
                raise ValueError(f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte "
                                 f"{self._data_start + end} but the file has {size} bytes")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize:
                raise ValueError(f"{self.path}: corrupt safetensors entry for tensor {name!r}: "
                                 f"{end - begin} bytes for shape {shape} of {dtype}")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def shape(self, name: str) -> tuple:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self._entries[name]
        begin, end = e["data_offsets"]
        buf = self._map[self._data_start + begin:self._data_start + end]
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None):
    """Writes ``tensors`` to ``path`` atomically (a temporary file in the same folder, then a rename).

    Args:
      path: destination file.
      tensors: name -> numpy array (any dtype in `DTYPES`, including ml_dtypes.bfloat16).
      metadata: string -> string metadata; ``{"format": "pt"}`` is added since transformers expects it.
    """
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")  # (np.ascontiguousarray would make a 0-d tensor 1-d)
        code = _CODES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if code is None:
            raise ValueError(f"{path}: cannot store tensor {name!r} of dtype {a.dtype} in safetensors")
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for a in arrays:
                f.write(a.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
