"""Decoding startup failures from real llama-server (b11434) log lines."""

from __future__ import annotations

import signal

import pytest

from llama_proc.diagnosis import diagnose

# Captured from real llama-server runs of this project's pinned build (b11434).
BAD_FLAG = ["error: invalid argument: --bogus-flag"]
BAD_VALUE = [
    'error while handling argument "-c": stoi',
    "",
    "usage:",
    "-c,    --ctx-size N                     size of the prompt context",
    "to show complete usage, run with -h",
]
BAD_ENV = ['error while handling environment variable "LLAMA_ARG_CTX_SIZE": stoi']
NOT_GGUF = [
    (
        "0.00.022.438 E common_fit_params: encountered an error while trying to fit params to free "
        "device memory: failed to load model"
    ),
    "0.00.022.468 E gguf_init_from_reader: invalid magic characters: 'F??&', expected 'GGUF'",
    (
        "0.00.022.481 E llama_model_load: error loading model: llama_model_loader: failed to load "
        "model from bad.gguf"
    ),
    "0.00.022.482 E llama_model_load_from_file_impl: failed to load model",
    "0.00.022.486 E cmn  common_init_: failed to load model 'bad.gguf'",
    "0.00.022.491 E srv    load_model: failed to load model, 'bad.gguf'",
    "0.00.022.494 I srv    operator(): operator(): cleaning up before exit...",
    "0.00.023.199 E srv  llama_server: exiting due to model loading error",
]
PORT_IN_USE = [
    "0.00.006.689 I srv  llama_server: initializing ...",
    (
        "0.00.017.559 E srv         start: couldn't bind HTTP server socket, hostname: 127.0.0.1, "
        "port: 49901"
    ),
    "0.00.017.657 I srv    operator(): operator(): cleaning up before exit...",
    "0.00.017.825 E srv  llama_server: exiting due to HTTP server error",
]
OOM = [
    (
        "0.01.100.000 E ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size "
        "68719476736"
    ),
    (
        "0.01.100.100 E llama_init_from_model: failed to initialize the context: failed to allocate "
        "buffer for kv cache"
    ),
    "0.01.100.200 E srv    load_model: failed to load model, 'big.gguf'",
]
MISSING_LIB = [
    (
        "llama-server: error while loading shared libraries: libcudart.so.12: cannot open shared "
        "object file: No such file or directory"
    )
]
NO_DRIVER = [
    (
        "/opt/llama-server: error while loading shared libraries: libcuda.so.1: cannot open shared "
        "object file: No such file or directory"
    )
]


@pytest.mark.parametrize(
    ("lines", "code", "kind", "text"),
    [
        pytest.param(BAD_FLAG, 1, "bad_flag", "does not know --bogus-flag", id="bad-flag"),
        pytest.param(BAD_VALUE, 1, "bad_flag", "value given for -c", id="bad-value"),
        pytest.param(BAD_ENV, 1, "bad_flag", "LLAMA_ARG_CTX_SIZE", id="bad-env"),
        pytest.param(NOT_GGUF, 1, "bad_model", "invalid magic characters", id="not-gguf"),
        pytest.param(PORT_IN_USE, 1, "port_in_use", "port: 49901", id="port"),
        pytest.param(OOM, 1, "out_of_memory", "failed to allocate", id="oom"),
        pytest.param(MISSING_LIB, 127, "missing_library", "libcudart.so.12", id="lib"),
        pytest.param(NO_DRIVER, 127, "missing_library", "NVIDIA driver is not installed", id="drv"),
        pytest.param(
            [
                (
                    "/c/llama-server: error while loading shared libraries: "
                    "/c/libggml-cpu.so.0: invalid ELF header"
                )
            ],
            127,
            "damaged_library",
            "damaged shared library: /c/libggml-cpu.so.0: invalid ELF header",
            id="damaged-lib",
        ),
        pytest.param([], -signal.SIGILL, "illegal_instruction", "CPU features", id="sigill"),
        pytest.param([], -signal.SIGKILL, "killed", "SIGKILL", id="sigkill"),
        pytest.param([], -signal.SIGSEGV, "crashed", "SIGSEGV", id="segv"),
        pytest.param(["0.0.1.0 E srv  something odd"], 1, "unknown", "something odd", id="other"),
        pytest.param(["hello"], 1, "unknown", "no error message", id="nothing"),
    ],
)
def test_diagnose(lines: list[str], code: int, kind: str, text: str) -> None:
    cause = diagnose(lines, code)
    assert cause.kind == kind
    assert text in str(cause)


def test_rpc_failure_beats_generic_model_errors() -> None:
    lines = [
        "0.00.010.000 E Failed to connect to 10.0.0.9:50052",
        "0.00.010.100 E srv    load_model: failed to load model, 'm.gguf'",
    ]
    cause = diagnose(lines, 1)
    assert cause.kind == "rpc"
    assert "10.0.0.9:50052" in cause.text


# Causes the provisioning smoke check used to decode on its own; one decoder knows them now.
GLIBC = [
    (
        "./llama-server: /lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.38' not found "
        "(required by ./llama-server)"
    )
]
DYLD = [
    "dyld[4242]: Library not loaded: @rpath/libggml.dylib",
    "  Referenced from: <ABC> /tmp/llama-server",
]
SHELL_SIGILL = ["/bin/sh: line 1:  4242 Illegal instruction     (core dumped) ./llama-server"]


@pytest.mark.parametrize(
    ("lines", "code", "kind", "text"),
    [
        pytest.param(GLIBC, 1, "libc_too_old", "GLIBC_2.38", id="glibc"),
        pytest.param(DYLD, -signal.SIGABRT, "missing_library", "@rpath/libggml.dylib", id="dyld"),
        pytest.param(SHELL_SIGILL, 132, "illegal_instruction", "CPU features", id="sh-sigill"),
        pytest.param([], 128 + signal.SIGILL, "illegal_instruction", "CPU features", id="132"),
        pytest.param([], 0xC000001D, "illegal_instruction", "CPU features", id="win-sigill"),
    ],
)
def test_diagnose_smoke_check_causes(lines: list[str], code: int, kind: str, text: str) -> None:
    cause = diagnose(lines, code)
    assert cause.kind == kind
    assert text in cause.summary
    assert cause.is_known


def test_diagnose_accepts_one_text() -> None:
    cause = diagnose("\n".join(MISSING_LIB), 127)
    assert cause.kind == "missing_library"
    assert str(cause) == cause.summary
    assert not diagnose("", 1).is_known
