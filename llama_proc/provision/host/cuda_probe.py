"""The CUDA probe: a short-lived child that calls cuInit, and the parser of what it prints.

The child reads the driver's CUDA version and each GPU's name and compute capability. Running
cuInit in a child keeps a forking caller's CUDA usable and lets a wedged driver time out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

_CU_ATTR_CC_MAJOR: Final = 75

_CU_ATTR_CC_MINOR: Final = 76

_CUDA_PROBE_SCRIPT: Final = """
import ctypes, json, sys
lib = None
for name in sys.argv[1:]:
    try:
        lib = ctypes.CDLL(name)
        break
    except OSError:
        pass
out = {}
if lib is None:
    out["error"] = "libcuda not found"
else:
    v = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
        out["cuda"] = v.value
    rc = lib.cuInit(0)
    out["init"] = rc
    if rc == 0:
        n = ctypes.c_int()
        devices = []
        if lib.cuDeviceGetCount(ctypes.byref(n)) == 0:
            for i in range(n.value):
                d = ctypes.c_int()
                if lib.cuDeviceGet(ctypes.byref(d), i) != 0:
                    continue
                ma, mi = ctypes.c_int(), ctypes.c_int()
                lib.cuDeviceGetAttribute(ctypes.byref(ma), @MAJOR@, d)
                lib.cuDeviceGetAttribute(ctypes.byref(mi), @MINOR@, d)
                buf = ctypes.create_string_buffer(256)
                lib.cuDeviceGetName(buf, 256, d)
                devices.append([buf.value.decode("utf-8", "replace"), f"{ma.value}.{mi.value}"])
        out["devices"] = devices
print(json.dumps(out))
""".replace("@MAJOR@", str(_CU_ATTR_CC_MAJOR)).replace("@MINOR@", str(_CU_ATTR_CC_MINOR))


def cuda_version_from_int(value: int) -> str | None:
    """``cuDriverGetVersion``'s integer (``12040``) -> ``"12.4"``."""
    if value <= 0:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


@dataclass(frozen=True)
class CudaProbe:
    """What the ``cuInit`` child process found."""

    cuda_version: str | None
    gpus: tuple[str, ...]
    compute_capabilities: tuple[str, ...]
    error: str | None = None


def parse_cuda_probe(text: str) -> CudaProbe:
    """Parse the JSON line the CUDA probe child prints (never raises)."""
    try:
        data = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
    except (json.JSONDecodeError, IndexError):
        return CudaProbe(None, (), (), f"unreadable probe output: {text.strip()[:200]!r}")
    if not isinstance(data, dict):
        return CudaProbe(None, (), (), "unreadable probe output")
    cuda = data.get("cuda")
    version = cuda_version_from_int(cuda) if isinstance(cuda, int) else None
    devices = data.get("devices") or []
    names = tuple(str(d[0]) for d in devices if isinstance(d, list) and len(d) == 2)
    caps = tuple(str(d[1]) for d in devices if isinstance(d, list) and len(d) == 2)
    error = data.get("error")
    if error is None and data.get("init", 0) != 0:
        error = f"cuInit failed with CUresult {data['init']}"
    return CudaProbe(version, names, caps, str(error) if error else None)
