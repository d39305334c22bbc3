"""A stand-in for llama-server, only for faults a real server cannot be made to produce.

Run as ``[sys.executable, fake_llama_server.py, --port N, --mode M, ...]``. It logs in
llama.cpp's format (``0.00.012.345 I srv ...``) to stderr and serves:

* ``/health``: 503 ``Loading model`` until ready, then 200 (or never, by mode);
* ``/argv``: its command line; ``/env``: its environment (to check what the runtime passes);
* ``/v1/models``: a model list, or a hang (mode ``hang-after-health``).

Modes: ``ready`` (after ``--delay`` s), ``never-ready`` (503 forever, keeps logging),
``silent`` (503 forever, prints nothing: a stalled load), ``exit`` (prints a load error and
exits with ``--exit-code``), ``hang-after-health`` (healthy, then every other route hangs),
``ignore-term`` (ready, ignores SIGTERM so only SIGKILL stops it), ``lose-first-term`` (ready,
loses the first SIGTERM and exits on the second, like llama-server's shutdown race), ``dots`` (like never-ready
but only prints progress dots without newlines).

GPU builds (``--fake-gpu cuda|rocm|vulkan``) see their device only when their runtime library
(``libcudart.so.12``, ``libamdhip64.so.6``, ``libvulkan.so.1``) is a file in ``--fake-lib-dir``
(a shim passes its own folder); a library whose text holds ``insufficient-driver`` stands for a
driver too old for it. ``--list-devices`` prints upstream's list (or ``(none)`` plus the loader
error a debug build of ggml logs), and a server given ``--n-gpu-layers`` logs where the layers
went (b11434's lines: "using device", "offloaded N/M layers", "model buffer size", or "no usable
GPU found" for a CPU build). ``--version`` prints ``version: 11434 (abcdef0)``.

The compute check: ``POST /completion`` with a token-id prompt and ``n_probs`` answers the way
llama-server does (``completion_probabilities`` of a greedy continuation), computed honestly
with llama-proc's pure-Python reference on the check's tiny model; ``--fake-compute wrong``
adds 1.0 to every log-probability (a kernel that computes wrong numbers), ``nan`` answers NaN.
A file ``fake-cpu`` in ``--fake-lib-dir`` makes the server die with SIGILL right after
``llama threadpool init`` (where real broken kernels die), by lines:
``sigill-if-lib NAME`` (a ``libggml-cpu-NAME.so`` lies in that folder: ggml's loader would take
it) and ``sigill-unless-flag FLAG`` (``--fake-cflags``, which a fake build bakes into its shim,
lacks FLAG).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

START = time.monotonic()


def log(level: str, text: str) -> None:
    elapsed = time.monotonic() - START
    minutes, seconds = divmod(elapsed, 60)
    stamp = f"{int(minutes) // 60}.{int(minutes) % 60:02d}.{seconds:06.3f}"
    sys.stderr.write(f"{stamp} {level} srv  {text}\n")
    sys.stderr.flush()


def log_raw(level: str, text: str) -> None:
    """A line of llama.cpp's own log (no ``srv`` component), as ``load_tensors`` prints them."""
    elapsed = time.monotonic() - START
    minutes, seconds = divmod(elapsed, 60)
    stamp = f"{int(minutes) // 60}.{int(minutes) % 60:02d}.{seconds:06.3f}"
    sys.stderr.write(f"{stamp} {level} {text}\n")
    sys.stderr.flush()


GPU_RUNTIME = {"cuda": "libcudart.so.12", "rocm": "libamdhip64.so.6", "vulkan": "libvulkan.so.1"}
GPU_LIBRARY = {"cuda": "libggml-cuda.so", "rocm": "libggml-hip.so", "vulkan": "libggml-vulkan.so"}
GPU_DEVICE = {
    "cuda": ("CUDA0", "NVIDIA H100 80GB HBM3", "0000:01:00.0", 81079, 80500),
    "rocm": ("ROCm0", "AMD Radeon RX 7900 XTX", "0000:03:00.0", 24560, 24000),
    "vulkan": ("Vulkan0", "AMD Radeon RX 7900 XTX (RADV NAVI31)", "0000:03:00.0", 24560, 24000),
}


def gpu_problem(backend: str | None, lib_dir: str) -> str | None:
    """Why the fake GPU build sees no device (a ggml log line), or None when it sees one."""
    if backend is None:
        return "no GPU backend in this build"
    runtime = os.path.join(lib_dir, GPU_RUNTIME[backend])
    if not os.path.isfile(runtime):
        library = os.path.join(lib_dir, GPU_LIBRARY[backend])
        return (
            f"load_backend: failed to load {library}: {GPU_RUNTIME[backend]}: cannot open "
            "shared object file: No such file or directory"
        )
    with open(runtime, encoding="utf-8", errors="replace") as fh:
        if "insufficient-driver" in fh.read():
            return (
                "ggml_cuda_init: failed to initialize CUDA: CUDA driver version is insufficient "
                "for CUDA runtime version"
            )
    return None


def list_devices(backend: str | None, lib_dir: str) -> int:
    problem = gpu_problem(backend, lib_dir)
    if backend is not None and problem is not None:
        sys.stderr.write(problem + "\n")
    print("Available devices:")
    if backend is None or problem is not None:
        print("  (none)")
    else:
        name, desc, _pci, total, free = GPU_DEVICE[backend]
        print(f"  {name}: {desc} ({total} MiB, {free} MiB free)")
    return 0


def log_placement(backend: str | None, lib_dir: str) -> None:
    """The load lines of a server given --n-gpu-layers: on the GPU, or on the CPU and why."""
    problem = gpu_problem(backend, lib_dir)
    if backend is None:
        sys.stderr.write("warning: no usable GPU found, --gpu-layers option will be ignored\n")
        sys.stderr.write(
            "warning: one possible reason is that llama.cpp was compiled without GPU support\n"
        )
    elif problem is not None:
        log_raw("E", problem)
    else:
        name, desc, pci, _total, free = GPU_DEVICE[backend]
        log_raw(
            "I",
            f"llama_model_load_from_file_impl: using device {name} ({desc}) ({pci}) - {free} MiB free",
        )
    if backend is not None:
        log_raw("I", "load_tensors: offloading output layer to GPU")
        log_raw("I", "load_tensors: offloaded 31/31 layers to GPU")
    if backend is not None and problem is None:
        log_raw("I", f"load_tensors: {GPU_DEVICE[backend][0]:>12} model buffer size =    92.10 MiB")
        log_raw("I", "load_tensors:   CPU_Mapped model buffer size =    15.00 MiB")
    else:
        log_raw("I", "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB")


def cpu_crash(lib_dir: str, cflags: str) -> str | None:
    """Why this fake dies with SIGILL (a ``fake-cpu`` rule that matches), or None."""
    try:
        with open(os.path.join(lib_dir, "fake-cpu"), encoding="utf-8") as fh:
            rules = [line.split() for line in fh if line.strip()]
    except OSError:
        return None
    names = set(os.listdir(lib_dir))
    for kind, value in rules:
        if kind == "sigill-if-lib" and f"libggml-cpu-{value}.so" in names:
            return f"libggml-cpu-{value}.so"
        if kind == "sigill-unless-flag" and value not in cflags.split():
            return f"built without {value}"
    return None


def completion(body: dict[str, Any], mode: str) -> dict[str, Any]:
    """What llama-server answers the compute check: a greedy continuation with top logprobs."""
    from llama_proc.provision.compute.reference import Reference, log_softmax
    from llama_proc.provision.compute.tiny_model import make_tiny_model

    reference = Reference(make_tiny_model())
    tokens = [int(t) for t in body["prompt"]]
    probs = []
    for _ in range(int(body.get("n_predict", 1))):
        logits = reference.logits(tokens, [len(tokens) - 1])[0]
        lp = log_softmax(logits)
        order = sorted(range(len(lp)), key=lambda i: -lp[i])[: int(body.get("n_probs", 1))]
        shift = 1.0 if mode == "wrong" else 0.0
        top = [
            {"id": i, "logprob": float("nan") if mode == "nan" else lp[i] + shift} for i in order
        ]
        probs.append({"id": order[0], "logprob": top[0]["logprob"], "top_logprobs": top})
        tokens.append(order[0])
    return {"content": "", "completion_probabilities": probs}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--mode", default="ready")
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--no-listening-line", action="store_true")
    parser.add_argument("--fake-gpu", choices=sorted(GPU_RUNTIME), default=None)
    parser.add_argument("--fake-lib-dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--list-devices", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("--n-gpu-layers", "--gpu-layers", "-ngl", dest="ngl", default=None)
    parser.add_argument("--fake-compute", choices=["right", "wrong", "nan"], default="right")
    parser.add_argument("--fake-cflags", default="")
    args, _unknown = parser.parse_known_args()

    if args.version:
        sys.stderr.write("version: 11434 (abcdef0)\nbuilt with fake-cc for fake-target\n")
        return 0
    if args.list_devices:
        return list_devices(args.fake_gpu, args.fake_lib_dir)

    if args.mode in ("ignore-term",):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.mode == "lose-first-term":
        # llama-server's race: the first SIGTERM is lost, a second one exits at once
        terms: list[int] = []

        def on_term(signum: int, frame: object) -> None:
            terms.append(signum)
            if len(terms) > 1:
                os._exit(1)

        signal.signal(signal.SIGTERM, on_term)

    log("I", "llama_server: initializing ...")
    if args.mode == "exit":
        time.sleep(args.delay)
        log("E", "gguf_init_from_reader: invalid magic characters: 'abcd', expected 'GGUF'")
        log("E", "load_model: failed to load model, 'fake.gguf'")
        return int(args.exit_code)

    ready = threading.Event()
    hang = threading.Event()
    crash = cpu_crash(args.fake_lib_dir, args.fake_cflags)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: object) -> None:
            pass

        def _send(self, status: int, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if hang.is_set():
                time.sleep(3600)
            if self.path == "/completion" and isinstance(body.get("prompt"), list):
                self._send(200, completion(body, args.fake_compute))
            else:
                self._send(404, {"error": {"code": 404, "message": "File Not Found"}})

        def do_GET(self) -> None:
            if self.path == "/health":
                if ready.is_set():
                    self._send(200, {"status": "ok"})
                else:
                    self._send(503, {"error": {"code": 503, "message": "Loading model"}})
            elif self.path == "/argv":
                self._send(200, sys.argv)
            elif self.path == "/env":
                self._send(200, dict(os.environ))
            elif hang.is_set():
                time.sleep(3600)
            else:
                self._send(200, {"object": "list", "data": [{"id": "fake"}]})

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    ThreadingHTTPServer.address_family = family
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError:
        log(
            "E",
            f"start: couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port}",
        )
        log("E", "llama_server: exiting due to HTTP server error")
        return 1
    server.daemon_threads = True
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log("I", "load_model: loading model 'fake.gguf'")
    if args.ngl is not None:
        log_placement(args.fake_gpu, args.fake_lib_dir)

    if crash is not None:
        log_raw("I", "cmn          init: llama threadpool init, n_threads = 2")
        sys.stderr.write(f"fake: illegal instruction ({crash})\n")
        sys.stderr.flush()
        signal.signal(signal.SIGILL, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGILL)
    if args.mode in ("ready", "hang-after-health", "ignore-term", "lose-first-term"):
        time.sleep(args.delay)
        ready.set()
        if args.mode == "hang-after-health":
            hang.set()
        log("I", "llama_server: model loaded")
        if not args.no_listening_line:
            log("I", f"llama_server: listening on http://{args.host}:{port}")
    elif args.mode == "never-ready":
        while True:
            time.sleep(0.1)
            log("I", "load_tensors: still loading")
    elif args.mode == "dots":
        while True:
            time.sleep(0.1)
            sys.stderr.write(".")
            sys.stderr.flush()
    elif args.mode == "silent":
        pass
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    raise SystemExit(main())
