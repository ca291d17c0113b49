"""A restricted reader of ``torch.save`` files (the zip format of torch >= 1.6) that executes no code.

``torch.save(state_dict, path)`` writes a zip archive ``<name>/data.pkl`` (a pickle of the dict whose tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls on *persistent* storages) and one
raw little-endian file per storage, ``<name>/data/<key>``. Unpickling normally imports whatever the pickle names,
which is how a ``.bin`` file can run code. This reader resolves only the handful of names a plain tensor dict
uses (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter`` and
the typed storage classes such as ``torch.FloatStorage``) to numpy implementations, and refuses anything else
with an error naming it. Strides and offsets are checked against the storage size, so a crafted file cannot read
outside its storage. Needs no torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Dict

import ml_dtypes
import numpy as np

_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise pickle.UnpicklingError(f"tensor with size {size}, stride {stride}, offset {storage_offset}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} (stride {stride}, offset {storage_offset}) reads past "
                                     f"its storage of {storage.size} elements")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view)  # a copy: the file's buffer is not kept alive


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGES},
}


def load_torch_file(path: str) -> Dict[str, np.ndarray]:
    """The ``{name: array}`` dict of a ``torch.save``-d state dict, read without running any of its code.

    Args:
      path: a ``.bin``/``.pt`` file in torch's zip format.

    Returns:
      name -> numpy array (float32, float16, bfloat16 (ml_dtypes), integer or bool).

    Raises:
      ValueError naming the file: not a zip-format torch file (the legacy pre-1.6 format is refused too), a pickle
      that names anything but plain tensors, a storage that is missing or too short, or an object that is no
      ``{str: tensor}`` dict.

    Example:
      >>> _ = open("legacy.bin", "wb").write(b"\\x80\\x02}q\\x00.")  # a bare pickle, not torch's zip format
      >>> load_torch_file("legacy.bin")
      Traceback (most recent call last):
      ValueError: legacy.bin: not a torch zip file (torch.save's format since torch 1.6); jlora does not read ...
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch zip file (torch.save's format since torch 1.6); jlora does not read "
                         f"legacy pickle files")
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0][:-len("data.pkl")]
        order = "little"
        if prefix + "byteorder" in zf.namelist():
            order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {order!r}")
        storages = {}

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in _GLOBALS:
                    raise ValueError(f"{path}: refuses to load {module}.{name} (only plain tensor dicts are read; "
                                     f"pickle can run code)")
                return _GLOBALS[(module, name)]

            def persistent_load(self, pid):
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                        and isinstance(pid[1], _StorageType)):
                    raise ValueError(f"{path}: unsupported persistent id {pid!r}")
                _, stype, key, _location, numel = pid
                key = str(key)
                if key not in storages:
                    entry = f"{prefix}data/{key}"
                    try:
                        raw = zf.read(entry)
                    except KeyError:
                        raise ValueError(f"{path}: storage {entry} is missing") from None
                    dt = stype.dtype.newbyteorder("<" if order == "little" else ">")
                    if len(raw) < int(numel) * dt.itemsize:
                        raise ValueError(f"{path}: storage {entry} has {len(raw)} bytes, expected "
                                         f"{int(numel) * dt.itemsize}")
                    arr = np.frombuffer(raw, dtype=dt, count=int(numel))
                    storages[key] = arr.astype(stype.dtype, copy=False)
                return storages[key]

        try:
            obj = Unpickler(io.BytesIO(zf.read(pkls[0]))).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: corrupt torch file ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return dict(obj)
