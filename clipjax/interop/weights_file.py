"""Reading a state_dict from a .safetensors or PyTorch file, safely, into numpy.

PyTorch files are opened only with `torch.load(..., weights_only=True)`, which
unpickles tensors and plain containers and refuses code. A TorchScript archive
(OpenAI's original release format) would need `torch.jit.load`, which runs the
archive's program, so it is refused with the one-line conversion to use.

The file may be local (memory-mapped by safetensors) or a URI (`gs://...`, read
whole into memory through `clipjax.paths`, then parsed from the bytes).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from typing import Any

import numpy as np

from clipjax import paths
from clipjax.errors import ClipjaxError

TORCHSCRIPT_HINT = (
    "convert it once with open_clip: `import open_clip, torch; "
    "m = open_clip.load_openai_model(FILE, device='cpu'); "
    "torch.save(m.state_dict(), 'model.pt')`, then import that file")


def read_state_dict(path: str) -> dict[str, Any]:
    """name -> numpy array (training checkpoints keep their nesting: see state_dict.normalize)."""
    path = os.fspath(path)
    if not paths.is_file(path):
        raise ClipjaxError(f"checkpoint {path!r} does not exist")
    local = paths.local(path)
    if local is None:  # remote: one download, then everything reads from memory
        try:
            data = paths.read_bytes(path)
        except OSError as e:
            raise ClipjaxError(f"cannot read checkpoint {path!r}: {e}") from None
        head, source = data[:9], data
    else:
        with paths.open(local, "rb") as f:
            head = f.read(9)
        source = local
    if len(head) < 9:
        raise ClipjaxError(f"checkpoint {path!r} is empty or truncated ({len(head)} bytes)")
    if head[:2] == b"PK":
        _check_zip(path, source)
        return _read_torch(path, source)
    if head[8:9] == b"{" or path.endswith(".safetensors"):
        if isinstance(source, bytes):
            return _read_safetensors_bytes(path, source)
        return _read_safetensors(source)
    return _read_torch(path, source)  # legacy (non-zip) torch.save format


def _as_file(source):
    """A path for a local file, a file object over the bytes of a remote one."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _check_zip(path: str, source) -> None:
    try:
        with zipfile.ZipFile(_as_file(source)) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ClipjaxError(f"checkpoint {path!r} is truncated or corrupt ({e})") from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        hint = TORCHSCRIPT_HINT.replace("FILE", repr(path))
        raise ClipjaxError(
            f"checkpoint {path!r} is a TorchScript archive; clipjax reads plain state_dicts "
            f"with torch.load(weights_only=True) only: {hint}")


def _read_torch(path: str, source) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ClipjaxError(
            f"reading the PyTorch file {path!r} needs torch: pip install 'clipjax[torch]' "
            "(or convert it to .safetensors elsewhere)") from None
    try:
        obj = torch.load(_as_file(source), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ClipjaxError(
                f"checkpoint {path!r} holds Python objects other than tensors and containers; "
                "clipjax loads PyTorch files with weights_only=True only") from None
        raise ClipjaxError(f"cannot read checkpoint {path!r}: truncated or corrupt "
                           f"({message})") from None
    if not isinstance(obj, dict):
        raise ClipjaxError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state_dict")
    return _to_numpy(obj, torch)


def _to_numpy(obj: dict, torch) -> dict[str, Any]:
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.is_floating_point():
                value = value.float()
            value = value.numpy()
        elif isinstance(value, dict):
            value = _to_numpy(value, torch)
        out[key] = value
    return out


@contextlib.contextmanager
def _safetensors_errors(path: str):
    """safetensors' own errors (SafetensorError and friends) as one clear ClipjaxError."""
    try:
        yield
    except ClipjaxError:
        raise
    except Exception as e:
        raise ClipjaxError(f"cannot read checkpoint {path!r}: truncated or corrupt "
                           f"safetensors ({e})") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with _safetensors_errors(path):
        with safe_open(path, framework="np") as f:
            bf16 = []
            for key in f.keys():
                if f.get_slice(key).get_dtype() == "BF16":
                    bf16.append(key)  # numpy has no bfloat16: read the raw bits below
                else:
                    out[key] = f.get_tensor(key)
        if bf16:
            out.update(_read_bf16(path, bf16))
    return out


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4",
                       "U64": "<u8", "BOOL": "?"}


def _read_safetensors_bytes(path: str, data: bytes) -> dict[str, np.ndarray]:
    """A .safetensors file's tensors from its bytes (BF16 widened to float32)."""
    from safetensors import deserialize

    out = {}
    with _safetensors_errors(path):
        for key, t in deserialize(data):
            if t["dtype"] == "BF16":
                bits = np.frombuffer(t["data"], "<u2").astype(np.uint32) << 16
                out[key] = bits.view(np.float32).reshape(t["shape"])
            elif t["dtype"] in _SAFETENSORS_DTYPES:
                out[key] = np.frombuffer(t["data"], _SAFETENSORS_DTYPES[t["dtype"]]).reshape(
                    t["shape"]).copy()
            else:
                raise ClipjaxError(f"checkpoint {path!r}: tensor {key!r} has dtype "
                                   f"{t['dtype']}, which clipjax does not read")
    return out


def _read_bf16(path: str, keys: list[str]) -> dict[str, np.ndarray]:
    out = {}
    with paths.open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for key in keys:
            begin, end = header[key]["data_offsets"]
            f.seek(8 + n + begin)
            bits = np.frombuffer(f.read(end - begin), np.uint16).astype(np.uint32) << 16
            out[key] = bits.view(np.float32).reshape(header[key]["shape"])
    return out
