"""Why did llama-server (or rpc-server) fail? One decoder for its log and exit status.

llama-server exits with status 1 for nearly every startup failure; the reason is only in its
log. Both layers decode failures here, so they name the same causes the same way:
provisioning's ``--version`` smoke check and the runtime's start/crash errors. Patterns were
taken from the b11434 sources and checked against real runs::

    error: invalid argument: --bogus                          (unknown flag)
    error while handling argument "-c": stoi                  (bad flag value)
    error while handling environment variable "LLAMA_ARG_..." (bad inherited variable)
    E gguf_init_from_reader: invalid magic characters: ...    (not GGUF)
    E srv  load_model: failed to load model, 'x.gguf'         (any model load failure)
    E srv  start: couldn't bind HTTP server socket, ...       (port in use)
    ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer  (out of memory)
    error while loading shared libraries: libcudart.so.12     (install incomplete, Linux)
    dyld[..]: Library not loaded: @rpath/libggml.dylib        (install incomplete, macOS)
    libc.so.6: version `GLIBC_2.38' not found                 (built for a newer Linux)
    E Failed to connect to 10.0.0.9:50052                     (RPC worker unreachable)

GPU backends (``ggml_cuda_init`` serves CUDA and ROCm, ``GGML_CUDA_NAME`` naming which)::

    load_backend: failed to load .../libggml-cuda.so: libcudart.so.12: cannot open ...
    ggml_cuda_init: failed to initialize CUDA: CUDA driver version is insufficient for ...
    ggml_cuda_init: failed to initialize ROCm: no ROCm-capable device is detected
    CUDA error: no kernel image is available for execution on the device
    warning: no usable GPU found, --gpu-layers option will be ignored

:func:`diagnose_gpu` decodes only these: why a GPU build sees no GPU (provisioning's device
check) or put its layers on the CPU (the runtime's start check).

Usage::

    cause = diagnose(output_lines, returncode)
    print(cause.kind, cause.summary)   # "illegal_instruction", "illegal instruction: ..."

A leaf module: it imports only the standard library.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Cause", "CauseKind", "diagnose", "diagnose_gpu", "explain_rpc_failure"]

CauseKind = Literal[
    "bad_flag",
    "bad_model",
    "port_in_use",
    "out_of_memory",
    "damaged_library",
    "missing_library",
    "libc_too_old",
    "illegal_instruction",
    "rpc",
    "gpu_driver_too_old",
    "no_gpu_device",
    "gpu_arch_unsupported",
    "gpu_init_failed",
    "no_gpu_backend",
    "no_vulkan_driver",
    "cpu_fallback",
    "killed",
    "crashed",
    "unknown",
]
"""The stable name of a cause; code branches on it, people read :attr:`Cause.text`."""


@dataclass(frozen=True)
class Cause:
    """A decoded failure: a stable ``kind`` and one sentence for people (also ``str()``)."""

    kind: CauseKind
    text: str

    @property
    def summary(self) -> str:
        """The sentence for people (the same as ``str(cause)``)."""
        return self.text

    @property
    def is_known(self) -> bool:
        """Whether a rule recognised the failure (``kind`` is not ``"unknown"``)."""
        return self.kind != "unknown"

    def __str__(self) -> str:
        return self.text


_ILLEGAL_INSTRUCTION_TEXT: Final = (
    "illegal instruction: this llama-server uses CPU features this host cannot run; "
    "`llama-proc fetch --force` installs one proven to compute here (its compute check turns "
    "off the CPU feature group that crashes); to turn off more, name the groups: "
    "`LLAMA_PROC_CPU_OFF=avx512 llama-proc fetch --force` (`llama-proc doctor` lists this "
    "host's groups)"
)
_WINDOWS_ILLEGAL_INSTRUCTION: Final = 0xC000001D
"""``STATUS_ILLEGAL_INSTRUCTION``: the exit status Windows reports for the same crash."""
_SHELL_SIGNAL_BASE: Final = 128
"""A shell (or a shim script) reports death by signal N as exit status 128 + N."""

_Rule = tuple[CauseKind, re.Pattern[str], str]
_RULES: Final[tuple[_Rule, ...]] = (
    (
        "bad_flag",
        re.compile(r"error: (?:invalid|unknown) argument:? (?P<detail>.+)", re.IGNORECASE),
        "bad flag: llama-server does not know {detail}",
    ),
    (
        "bad_flag",
        re.compile(r'error while handling argument "(?P<detail>[^"]+)"'),
        "bad flag: the value given for {detail} is invalid",
    ),
    (
        "bad_flag",
        re.compile(r'error while handling environment variable "(?P<detail>[^"]+)"'),
        "bad flag: the environment variable {detail} holds an invalid value",
    ),
    (
        "bad_flag",
        re.compile(r"(?:expected value for argument|unrecognized argument)(?P<detail>.*)"),
        "bad flag: a flag is missing its value or is not recognised{detail}",
    ),
    (
        "port_in_use",
        re.compile(
            r"couldn't bind HTTP server socket(?P<detail>.*)|address already in use",
            re.IGNORECASE,
        ),
        "port in use: another process is listening on the address{detail}",
    ),
    (
        "out_of_memory",
        re.compile(
            r"(?P<detail>out of memory|failed to allocate|cudaMalloc failed|unable to allocate"
            r"|std::bad_alloc|ErrorOutOfDeviceMemory|insufficient memory)",
            re.IGNORECASE,
        ),
        (
            "out of memory: the model or its context does not fit ({detail}); lower "
            "ctx_size, n_gpu_layers or parallel, or use a smaller quantisation"
        ),
    ),
)
"""Checked first: their log lines are followed by generic "failed to load model" lines."""

_LOAD_RULES: Final[tuple[_Rule, ...]] = (
    (
        "illegal_instruction",
        re.compile(r"illegal instruction", re.IGNORECASE),
        _ILLEGAL_INSTRUCTION_TEXT,
    ),
    (
        "libc_too_old",
        re.compile(r"version [`'\"]?(?P<detail>GLIBC_[\d.]+)[`'\"]? not found"),
        (
            "C library too old: this llama-server needs {detail}, newer than this host's; "
            "use a build made for this system (or build from source)"
        ),
    ),
    (
        "missing_library",
        re.compile(
            r"error while loading shared libraries: (?P<detail>libcuda\.so\.1|libnvidia-[\w.-]+)"
        ),
        (
            "the NVIDIA driver is not installed ({detail} comes with it): this CUDA build runs "
            "only where there is an NVIDIA GPU and its driver; use --variant cpu (or auto) here"
        ),
    ),
    (
        "damaged_library",
        re.compile(
            r"error while loading shared libraries: (?P<detail>[^:]+: (?:invalid ELF header|"
            r"file too short|ELF load command [\w ]+|unexpected reloc type \w+))"
        ),
        (
            "damaged shared library: {detail} (the file is not a library the loader can read); "
            "`llama-proc fetch --force` re-installs it (`llama-proc cache verify` lists what "
            "else changed)"
        ),
    ),
    (
        "missing_library",
        re.compile(r"(?:error while loading shared libraries|Library not loaded): (?P<detail>.+)"),
        "missing shared library: {detail}; the install is incomplete or needs a GPU runtime",
    ),
    (
        "bad_model",
        re.compile(r"gguf_init\w*: (?P<detail>.+)"),
        "bad model file: {detail}",
    ),
    (
        "bad_model",
        re.compile(r"(?:error loading model|failed to load model)[:,]? ?(?P<detail>.*)"),
        "bad model file: llama.cpp could not load it {detail}",
    ),
)
"""Checked after the RPC rules: an unreachable worker is followed by model-load errors."""

_GPU_RULES: Final[tuple[_Rule, ...]] = (
    (
        "gpu_driver_too_old",
        re.compile(
            r"(?P<detail>CUDA driver version is insufficient for CUDA runtime version"
            r"|forward compatibility was attempted on non supported HW"
            r"|the provided PTX was compiled with an unsupported toolchain)"
        ),
        (
            "GPU driver too old: {detail}; update the NVIDIA driver, or use a build made for an "
            "older CUDA version"
        ),
    ),
    (
        "missing_library",
        re.compile(r"failed to load (?P<detail>\S*(?:\.so|\.dll|\.dylib)\S*: .+)"),
        (
            "a GPU backend library could not be loaded: {detail}; the install is incomplete "
            "(its runtime archive, e.g. cudart, is missing) or the GPU runtime is not installed"
        ),
    ),
    (
        "gpu_arch_unsupported",
        re.compile(
            r"(?P<detail>no kernel image is available for execution on the device"
            r"|invalid device function|Unable to find code object for all current devices"
            r"|for GPU arch\s*:\s*\w+)"
        ),
        (
            "this build has no code for this GPU ({detail}); use a build that includes its "
            "architecture (compute capability or gfx target), or build from source"
        ),
    ),
    (
        "no_vulkan_driver",
        re.compile(r"(?P<detail>ERROR_INCOMPATIBLE_DRIVER|ErrorIncompatibleDriver)"),
        (
            "no Vulkan driver (ICD) for a GPU is installed ({detail}); install the GPU's Vulkan "
            "driver (Mesa RADV/ANV, or the NVIDIA driver's Vulkan ICD)"
        ),
    ),
    (
        "no_gpu_device",
        re.compile(r"(?P<detail>no (?:CUDA|ROCm|MUSA)-capable device is detected)"),
        (
            "no usable GPU device: {detail}; check that the GPU is visible here (driver loaded, "
            "CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES, a container's --gpus)"
        ),
    ),
    (
        "gpu_init_failed",
        re.compile(r"failed to initialize (?P<detail>(?:CUDA|ROCm|MUSA): .+)"),
        "the GPU runtime failed to start ({detail}); check the GPU driver",
    ),
    (
        "no_gpu_backend",
        re.compile(r"(?P<detail>no usable GPU found)"),
        (
            "this llama-server has no usable GPU backend (built without GPU support, or its GPU "
            "library failed to load); use a GPU variant (--variant cuda, rocm or vulkan)"
        ),
    ),
)
"""Why a GPU build sees no GPU; most specific first (a driver error is inside an init line)."""

_LOG_PREFIX: Final = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")


def diagnose(lines: str | Sequence[str], returncode: int | None) -> Cause:
    """Decode why llama-server (or its ``--version`` smoke check) failed.

    Out-of-memory, flag and port errors are checked first (generic "failed to load model"
    lines follow them), then RPC worker failures, then loader and model errors, newest line
    first, and last the exit status (a signal).

    Args:
        lines: the process's output, as lines or as one text.
        returncode: its exit status (negative = killed by that signal; None = unknown).

    Returns:
        The cause; ``kind == "unknown"`` carries the last error line, if any.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    texts = [_strip(line) for line in lines]
    cause = _match(_RULES, texts)
    if cause is not None:
        return cause
    rpc = explain_rpc_failure(lines)
    if rpc is not None:
        return Cause("rpc", rpc)
    cause = _match(_LOAD_RULES, texts) or _match(_GPU_RULES, texts)
    if cause is not None:
        return cause
    signal_cause = _signal_cause(returncode)
    if signal_cause is not None:
        return signal_cause
    last_error = next(
        (t for t, line in zip(reversed(texts), reversed(lines), strict=True) if _is_error(line)),
        None,
    )
    if last_error:
        return Cause("unknown", last_error)
    return Cause("unknown", "no error message in the log")


def diagnose_gpu(lines: str | Sequence[str]) -> Cause | None:
    """Decode why a GPU build of llama-server sees no GPU, or None if its output does not say.

    Reads ``--list-devices`` output or a server log: a backend library that failed to load,
    a driver too old for the build's CUDA, no device visible, no code for this GPU, no
    Vulkan driver, or a build without a usable GPU backend.

    Args:
        lines: the output, as lines or as one text.

    Returns:
        The cause, or None when no GPU rule matches.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    return _match(_GPU_RULES, [_strip(line) for line in lines])


def _signal_cause(returncode: int | None) -> Cause | None:
    if returncode is None:
        return None
    if returncode in (-signal.SIGILL, _SHELL_SIGNAL_BASE + signal.SIGILL) or (
        returncode & 0xFFFFFFFF == _WINDOWS_ILLEGAL_INSTRUCTION
    ):
        return Cause("illegal_instruction", _ILLEGAL_INSTRUCTION_TEXT)
    if returncode >= 0:
        return None
    sig = -returncode
    if sig == getattr(signal, "SIGKILL", 9):
        return Cause("killed", "killed by SIGKILL (by the out-of-memory killer or another process)")
    name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
    return Cause("crashed", f"crashed with signal {name}")


def _strip(line: str) -> str:
    return _LOG_PREFIX.sub("", line).strip()


def _match(rules: Sequence[_Rule], texts: Sequence[str]) -> Cause | None:
    for kind, pattern, template in rules:
        for text in reversed(texts):
            match = pattern.search(text)
            if match:
                detail = (match.groupdict().get("detail") or "").strip().rstrip(".")
                return Cause(kind, " ".join(template.format(detail=detail).split()))
    return None


def _is_error(line: str) -> bool:
    match = _LOG_PREFIX.match(line)
    if match:
        return match.group(0).strip().endswith(" E")
    return "error" in line.lower()


# ----------------------------------------------------------------------------- RPC workers
_MISMATCH_RE: Final = re.compile(r"RPC server version mismatch: (\S+)")
_HANDSHAKE_RE: Final = re.compile(r"RPC handshake failed for (\S+)")
_CONNECT_RE: Final = re.compile(r"Failed to connect to (\S+)")
_CRASHED_RE: Final = re.compile(r"Remote RPC server crashed or returned malformed response")
_UNSUPPORTED_RE: Final = re.compile(r"RPC not supported in this build")


def _found(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1).rstrip(".:,") if pattern.groups else match.group(0)


def explain_rpc_failure(log_lines: Sequence[str]) -> str | None:
    """Turn llama-server's RPC failure log lines into one cause, or None if there is none.

    llama-server aborts (SIGABRT) while parsing ``--rpc`` when a worker is unreachable or
    speaks another protocol version; its log is the only record of which worker failed.
    """
    text = "\n".join(log_lines)
    version = _found(_MISMATCH_RE, text)
    worker = _found(_HANDSHAKE_RE, text)
    if version is not None:
        who = f"RPC worker {worker}" if worker else "an RPC worker"
        return (
            f"{who} speaks RPC protocol v{version}, not this llama-server's: run the same "
            "llama.cpp build on both ends"
        )
    if worker is not None:
        return (
            f"the RPC handshake with worker {worker} failed: it runs another llama.cpp build; "
            "run the same build on both ends"
        )
    if (endpoint := _found(_CONNECT_RE, text)) is not None:
        return (
            f"llama-server could not connect to RPC worker {endpoint}; start it "
            "(llama-proc rpc-worker) and check the address"
        )
    if _found(_CRASHED_RE, text):
        return (
            "an RPC worker crashed or dropped the connection (out of memory on the worker, or "
            "it was stopped); check the worker's log"
        )
    if _found(_UNSUPPORTED_RE, text):
        return "this llama-server was built without GGML_RPC; use the rpc (or cpu) variant"
    return None
