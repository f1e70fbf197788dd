"""Reading a state_dict from a .safetensors or PyTorch file, safely, into numpy.

PyTorch files are opened only with `torch.load(..., weights_only=True)`, which
unpickles tensors and plain containers and refuses code. A TorchScript archive
(OpenAI's original release format) would need `torch.jit.load`, which runs the
archive's program, so it is refused with the one-line conversion to use.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from clipjax.errors import ClipjaxError

TORCHSCRIPT_HINT = (
    "convert it once with open_clip: `import open_clip, torch; "
    "m = open_clip.load_openai_model(FILE, device='cpu'); "
    "torch.save(m.state_dict(), 'model.pt')`, then import that file")


def read_state_dict(path: str) -> dict[str, Any]:
    """name -> numpy array (training checkpoints keep their nesting: see state_dict.normalize)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ClipjaxError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise ClipjaxError(f"checkpoint {path!r} is empty or truncated ({len(head)} bytes)")
    if head[:2] == b"PK":
        _check_zip(path)
        return _read_torch(path)
    if head[8:9] == b"{" or path.endswith(".safetensors"):
        return _read_safetensors(path)
    return _read_torch(path)  # legacy (non-zip) torch.save format


def _check_zip(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ClipjaxError(f"checkpoint {path!r} is truncated or corrupt ({e})") from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        hint = TORCHSCRIPT_HINT.replace("FILE", repr(path))
        raise ClipjaxError(
            f"checkpoint {path!r} is a TorchScript archive; clipjax reads plain state_dicts "
            f"with torch.load(weights_only=True) only: {hint}")


def _read_torch(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ClipjaxError(
            f"reading the PyTorch file {path!r} needs torch: pip install 'clipjax[torch]' "
            "(or convert it to .safetensors elsewhere)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as f:
            bf16 = []
            for key in f.keys():
                if f.get_slice(key).get_dtype() == "BF16":
                    bf16.append(key)  # numpy has no bfloat16: read the raw bits below
                else:
                    out[key] = f.get_tensor(key)
        if bf16:
            out.update(_read_bf16(path, bf16))
    except ClipjaxError:
        raise
    except Exception as e:  # safetensors_rust.SafetensorError and friends
        raise ClipjaxError(f"cannot read checkpoint {path!r}: truncated or corrupt "
                           f"safetensors ({e})") from None
    return out


def _read_bf16(path: str, keys: list[str]) -> dict[str, np.ndarray]:
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for key in keys:
            begin, end = header[key]["data_offsets"]
            f.seek(8 + n + begin)
            bits = np.frombuffer(f.read(end - begin), np.uint16).astype(np.uint32) << 16
            out[key] = bits.view(np.float32).reshape(header[key]["shape"])
    return out
