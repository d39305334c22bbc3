"""The checks every install passes before it is committed to the cache.

:func:`smoke_check` runs the new binary once (``llama-server --version``) so that an archive for
the wrong CPU, a missing shared library or a broken build fails at install time with a clear
reason, not at the first ``serve``. :func:`parse_version_output` reads what it printed.

A GPU build installed on a host that has its GPU must also see that GPU:
:func:`check_devices` runs ``llama-server --list-devices`` and refuses the install when no
device of the build's backend is listed, naming why (a library that did not load, a driver
too old, no Vulkan driver). Without it, a CUDA build whose runtime libraries are missing passes
``--version`` and then serves on the CPU. The resolver decides when the check applies
(:func:`device_requirement`: the variant's backend, and whether this host has that GPU).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from llama_proc._childenv import child_environment
from llama_proc._proc import run_with_timeout
from llama_proc.backends import get_backend
from llama_proc.devices import Device, parse_device_list
from llama_proc.diagnosis import Cause, diagnose, diagnose_gpu
from llama_proc.errors import DeviceNotFoundError, ProvisionError
from llama_proc.provision.host.selection import runtime_problems

if TYPE_CHECKING:
    from pathlib import Path

    from llama_proc.provision.host.host_info import HostInfo
    from llama_proc.provision.manifest_records import Variant

__all__ = [
    "DEVICE_TIMEOUT",
    "SMOKE_TIMEOUT",
    "DeviceRequirement",
    "check_devices",
    "device_requirement",
    "parse_version_output",
    "smoke_check",
]

SMOKE_TIMEOUT: Final = 60.0
"""Seconds ``llama-server --version`` may take (first runs on slow disks load many libraries)."""
_VERSION_LINE_RE: Final = re.compile(r"^\s*version:\s*(.+?)\s*$", re.MULTILINE)
_BUILD_NUMBER_RE: Final = re.compile(
    r"^(?:(\d+)\s*\((\w+)\)|.*\(build\s+(\d+),\s*commit\s+(\w+)\))"
)
_TAIL_LINES: Final = 3
DEVICE_TIMEOUT: Final = 120.0
"""Seconds ``llama-server --list-devices`` may take (a first CUDA context on a big GPU is slow)."""
_LIBRARY_SUFFIXES: Final = (".so", ".dll", ".dylib")
_LOAD_SNIPPET: Final = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"
"""Loads one library in a throw-away interpreter, so the loader's complaint can be read."""
_OUTPUT_TAIL: Final = 6


def parse_version_output(text: str) -> dict[str, Any]:
    """Pull the ``version:`` line (and build number / commit) out of ``--version`` output.

    Formats: ``version: 10216 (876a432)`` and ``version: 0.6.0-dev (build 11434, commit abc)``.
    """
    match = _VERSION_LINE_RE.search(text)
    if match is None:
        return {"version": None, "build_number": None, "commit": None}
    line = match.group(1)
    parts = _BUILD_NUMBER_RE.match(line)
    number = commit = None
    if parts:
        number = int(parts.group(1) or parts.group(3))
        commit = parts.group(2) or parts.group(4)
    return {"version": f"version: {line}", "build_number": number, "commit": commit}


def smoke_check(
    binary: Path, *, timeout: float = SMOKE_TIMEOUT, library_path: str | None = None
) -> str:
    """Run ``binary --version`` and return its output (llama-server prints it to stderr).

    A failure is decoded by :func:`llama_proc.diagnosis.diagnose`, the same decoder the runtime
    uses for a server that fails to start, so both name a cause the same way.

    Args:
        binary: the llama-server to run.
        timeout: seconds it may take.
        library_path: a folder searched first for shared libraries (``LD_LIBRARY_PATH``; the
            CUDA driver stub of a build made where there is no NVIDIA driver).

    Raises:
        ProvisionError: it did not start, failed, crashed or hung.
    """
    env = child_environment()
    if library_path is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (library_path, env.get("LD_LIBRARY_PATH", "")) if p
        )
    ran = run_with_timeout([str(binary), "--version"], timeout, env=env, cwd=binary.parent)
    if ran is None:
        msg = (
            f"{binary} cannot run on this host: it could not be started (missing, not "
            "executable, or made for another system); fetch again or pick another --variant"
        )
        raise ProvisionError(msg)
    if ran.timed_out:
        msg = f"{binary} --version did not finish within {timeout:g}s; the binary looks broken"
        raise ProvisionError(msg)
    if ran.returncode != 0:
        tail = " | ".join(ran.output.strip().splitlines()[-_TAIL_LINES:]) or "no output"
        cause = diagnose(ran.output, ran.returncode)
        why = str(cause) if cause.is_known else f"exit code {ran.returncode}"
        msg = f"{binary} --version failed ({why}): {tail}"
        raise ProvisionError(msg)
    return ran.output


@dataclass(frozen=True)
class DeviceRequirement:
    """A GPU build that must list a device of its backend before it is installed."""

    backend: str
    """``cuda``, ``rocm``, ``vulkan`` or ``metal``."""
    gpu: str
    """What host detection found, for messages (e.g. ``an NVIDIA GPU (driver 580.65)``)."""
    hints: tuple[str, ...] = ()
    """Host facts that may explain a missing device (no Vulkan driver, gfx not in the build)."""

    @property
    def label(self) -> str:
        """The backend as messages spell it (``CUDA``, ``ROCm``...)."""
        backend = get_backend(self.backend)
        return backend.label if backend is not None else self.backend


def device_requirement(variant: Variant, host: HostInfo) -> DeviceRequirement | None:
    """The device check an install of ``variant`` must pass on ``host``, if any.

    Only GPU variants on a host that has their kind of GPU are checked: a CUDA build installed
    on a machine without an NVIDIA GPU (a Docker build stage) cannot show one, and is not
    expected to.
    """
    backend = get_backend(variant.backend)
    probe = backend.host_gpu if backend is not None else None
    gpu = probe(host) if probe is not None else None
    if gpu is None or host.os != variant.os:
        return None
    hints = [b.text for b in runtime_problems(variant, host)]
    if variant.backend == "vulkan" and host.os == "linux" and not host.vulkan_gpu_icds:
        hints.append("no Vulkan driver (ICD) for a GPU is installed")
    return DeviceRequirement(variant.backend, gpu, tuple(hints))


def _backend_libraries(folder: Path, backend: str) -> list[Path]:
    row = get_backend(backend)
    name = row.library if row is not None and row.library else backend
    prefixes = (f"libggml-{name}", f"ggml-{name}")
    return sorted(
        p
        for p in folder.iterdir()
        if p.name.startswith(prefixes) and any(s in p.name for s in _LIBRARY_SUFFIXES)
    )


def _load_errors(binary: Path, backend: str, timeout: float) -> list[str]:
    """Try to load the build's backend library; return the loader's complaints, ggml-style.

    Release builds load GPU backends with ``dlopen`` and stay silent when one fails
    (``GGML_BACKEND_DL``): loading the library again in a child interpreter shows which
    dependency is missing. The lines read like ggml's own ``failed to load <lib>: <why>``.
    """
    errors: list[str] = []
    if getattr(sys, "frozen", False):
        return errors  # a frozen app's executable is not a Python that takes -c
    try:
        libraries = _backend_libraries(binary.parent, backend)
    except OSError:
        return errors
    for library in libraries:
        ran = run_with_timeout(
            [sys.executable, "-c", _LOAD_SNIPPET, str(library)],
            timeout,
            env=child_environment(),
            cwd=binary.parent,
        )
        if ran is None or ran.returncode == 0:
            continue
        lines = [ln.strip() for ln in ran.output.strip().splitlines() if ln.strip()]
        why = lines[-1].removeprefix("OSError: ") if lines else f"exit code {ran.returncode}"
        errors.append(f"failed to load {library}: {why}")
    return errors


def _missing_cause(output: str, binary: Path, need: DeviceRequirement, timeout: float) -> Cause:
    cause = diagnose_gpu(output)
    if cause is None:
        cause = diagnose_gpu(_load_errors(binary, need.backend, timeout))
    if cause is not None:
        return cause
    if need.hints:
        return Cause("no_gpu_device", "; ".join(need.hints))
    return Cause(
        "no_gpu_device",
        f"llama-server printed no reason; run `{binary} --list-devices` to see its output",
    )


def check_devices(
    binary: Path, need: DeviceRequirement, *, timeout: float = DEVICE_TIMEOUT
) -> tuple[Device, ...]:
    """Run ``binary --list-devices`` and require a GPU of ``need.backend``.

    Args:
        binary: the new llama-server (in its staging folder).
        need: the backend and what the host has (:func:`device_requirement`).
        timeout: seconds the listing may take.

    Returns:
        Every listed device (at least one GPU of the backend).

    Raises:
        DeviceNotFoundError: no such device is listed; ``cause`` says why (decoded from the
            output, or from loading the backend library), ``backend`` which backend.
        ProvisionError: the binary did not run, hung, or printed no device list.
    """
    ran = run_with_timeout(
        [str(binary), "--list-devices"], timeout, env=child_environment(), cwd=binary.parent
    )
    if ran is None or ran.timed_out:
        what = "could not be started" if ran is None else f"did not finish within {timeout:g}s"
        msg = f"{binary} --list-devices {what}; the binary looks broken, fetch it again"
        raise ProvisionError(msg)
    devices = parse_device_list(ran.output)
    if devices is None or ran.returncode != 0:
        tail = " | ".join(ran.output.strip().splitlines()[-_OUTPUT_TAIL:]) or "no output"
        msg = (
            f"{binary} --list-devices printed no device list (exit code {ran.returncode}): "
            f"{tail}; this build cannot show whether it sees the GPU, use another build"
        )
        raise ProvisionError(msg)
    if any(d.backend == need.backend and d.is_gpu for d in devices):
        return devices
    cause = _missing_cause(ran.output, binary, need, timeout)
    listed = ", ".join(map(str, devices)) or "none"
    msg = (
        f"the {need.label} build at {binary.parent} sees no {need.label} device although this "
        f"host has {need.gpu} (devices listed: {listed}): {cause}"
    )
    raise DeviceNotFoundError(msg, backend=need.backend, cause=cause.kind)
