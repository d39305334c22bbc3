"""Turn llama-server's last log lines and exit status into one human cause.

llama-server exits with status 1 for nearly every startup failure; the reason is only in its
log. Patterns were taken from the b11434 sources and checked against real runs::

    error: invalid argument: --bogus                          (unknown flag)
    error while handling argument "-c": stoi                  (bad flag value)
    error while handling environment variable "LLAMA_ARG_..." (bad inherited variable)
    E gguf_init_from_reader: invalid magic characters: ...    (not GGUF)
    E srv  load_model: failed to load model, 'x.gguf'         (any model load failure)
    E srv  start: couldn't bind HTTP server socket, ...       (port in use)
    ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer  (out of memory)
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Cause", "CauseKind", "diagnose"]

CauseKind = Literal[
    "bad_flag",
    "bad_model",
    "port_in_use",
    "out_of_memory",
    "missing_library",
    "illegal_instruction",
    "rpc",
    "killed",
    "crashed",
    "unknown",
]


@dataclass(frozen=True)
class Cause:
    """A decoded startup failure: a stable ``kind`` and a sentence for people."""

    kind: CauseKind
    text: str

    def __str__(self) -> str:
        return self.text


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
_MODEL_RULES: Final[tuple[_Rule, ...]] = (
    (
        "missing_library",
        re.compile(r"error while loading shared libraries: (?P<detail>.+)"),
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
_LOG_PREFIX: Final = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")


def _strip(line: str) -> str:
    return _LOG_PREFIX.sub("", line).strip()


def diagnose(lines: Sequence[str], returncode: int | None) -> Cause:
    """Decode why llama-server stopped from its log tail and exit status.

    Out-of-memory and port conflicts are checked first (their log lines are followed by
    generic "failed to load model" lines), then the rest, newest line first.
    """
    texts = [_strip(line) for line in lines]
    cause = _match(_RULES, texts)
    if cause is not None:
        return cause
    # A missing RPC worker is followed by generic model-load errors: check it before them.
    rpc = _rpc_cause(lines)
    if rpc is not None:
        return Cause("rpc", rpc)
    cause = _match(_MODEL_RULES, texts)
    if cause is not None:
        return cause
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGILL:
            return Cause(
                "illegal_instruction",
                "illegal instruction: this llama-server uses CPU features the host lacks; "
                "use a portable build (LLAMA_PROC_VARIANT=cpu with a portable build)",
            )
        if sig == signal.SIGKILL:
            return Cause(
                "killed", "killed by SIGKILL (by the out-of-memory killer or another process)"
            )
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return Cause("crashed", f"crashed with signal {name}")
    last_error = next(
        (t for t, line in zip(reversed(texts), reversed(lines), strict=True) if _is_error(line)),
        None,
    )
    if last_error:
        return Cause("unknown", last_error)
    return Cause("unknown", "no error message in the log")


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


def _rpc_cause(lines: Sequence[str]) -> str | None:
    try:
        from llama_proc.runtime.rpc import explain_rpc_failure
    except ImportError:  # pragma: no cover - shipped together
        return None
    return explain_rpc_failure(lines)
