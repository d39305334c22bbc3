"""Serve the tiny model with an installed llama-server and check what it computes.

:func:`run_compute_check` starts the binary on the model :mod:`.tiny_model` writes, with the
host's thread count, waits for it (warm-up included: that is where broken CPU kernels die),
asks twice for a greedy continuation of a 40-token prompt (the batched path) with the top
log-probabilities of every generated token (the single-token path), and passes when

- the process lives through it all,
- every log-probability is finite,
- both runs give the same tokens and log-probabilities (within :data:`REPEAT_TOLERANCE`), and
- each reported log-probability is within :data:`LOGPROB_TOLERANCE` of the pure-Python
  reference (:mod:`.reference`) on the same tokens.

The result is a :class:`ComputeReport`: the verdict, its reason in one line, the CPU features
and weight buffers the server reported (``AMX``, ``CPU_REPACK``...), the timings and, when the
process died, the signal. :attr:`ComputeReport.points_at_cpu` says whether a failure looks like
a CPU-kernel problem (an illegal instruction or wrong numbers), which the ladder
(:mod:`.ladder`) may cure by turning a CPU feature group off.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from llama_proc._childenv import child_environment
from llama_proc._proc import KILL_WAIT, free_port, group_popen_kwargs, kill_tree
from llama_proc.provision.compute.reference import Reference, log_softmax
from llama_proc.provision.compute.tiny_model import FIRST_WORD, make_tiny_model, write_gguf
from llama_proc.runtime.health import wait_until_healthy

if TYPE_CHECKING:
    from llama_proc.provision.compute.tiny_model import TinyModel

__all__ = [
    "COMPUTE_TIMEOUT",
    "LOGPROB_TOLERANCE",
    "ComputeReport",
    "compare_with_reference",
    "run_compute_check",
]

logger = logging.getLogger(__name__)

COMPUTE_TIMEOUT: Final = 90.0
"""Seconds the whole check may take (a few on 2 cores; a first CUDA context can take long)."""
REQUEST_TIMEOUT: Final = 60.0
"""Seconds one completion request may stay silent."""
LOGPROB_TOLERANCE: Final = 0.35
"""Largest allowed difference between a reported log-probability and the reference's.

Exact agreement is out of reach for one reason: ggml rounds every quantized product's
activations to 8-bit codes, and float32 sums in SIMD order (and the attention's F16
accumulation) move some values across a rounding boundary, which flips a code and carries on
through the layers. Measured with the pinned build on AVX-512 and AVX2 paths: at most 0.155
over 12 prompts x 4 positions x 5 tokens (the same model without the 8-bit emulation in the
reference: 0.20). Kernels that compute wrong numbers are off by far more: the nibble halves
of one weight matrix swapped gave 1.4 to 8.7, one negated row of 64 gave 2.4."""
REPEAT_TOLERANCE: Final = 1e-3
"""Largest allowed difference between the two runs' log-probabilities."""
PROMPT_TOKENS: Final = 40
GENERATED_TOKENS: Final = 4
TOP_N: Final = 5
CONTEXT: Final = 256
VERBOSE_FLAGS: Final = ["-lv", "4"]
_UNKNOWN_FLAG: Final = "invalid argument"
_HOST: Final = "127.0.0.1"
_MIN_REQUEST_WAIT: Final = 1.0
_LOG_TAIL: Final = 12
_LOG_LIMIT: Final = 1 << 20
_SYSTEM_INFO_RE: Final = re.compile(r"system_info:.*?\|(?P<rest>.*)$", re.MULTILINE)
_FEATURE_RE: Final = re.compile(r"([A-Z][A-Z0-9_]*) = 1\b")
_BUFFER_RE: Final = re.compile(r"load_tensors:\s+(\S+) model buffer size", re.MULTILINE)


@dataclass(frozen=True)
class ComputeReport:
    """What one compute check saw."""

    ok: bool
    reason: str
    """One line: what passed, or what failed and where."""
    seconds: float
    threads: int
    gpu_layers: int = 0
    tokens: tuple[int, ...] = ()
    max_error: float | None = None
    """Largest difference from the reference's log-probabilities (None: not compared)."""
    cpu_features: tuple[str, ...] = ()
    """Features the server's ggml CPU backend reported as on (``AVX2``, ``AMX_INT8``...)."""
    buffers: tuple[str, ...] = ()
    """The weight buffers the server used (``CPU``, ``CPU_REPACK``, ``AMX``, ``CUDA0``...)."""
    signal: str | None = None
    """The signal that killed the server (``SIGILL``), if one did."""
    wrong_numbers: bool = False
    log_tail: tuple[str, ...] = field(default=(), repr=False)

    @property
    def points_at_cpu(self) -> bool:
        """Whether a CPU feature may be to blame: an illegal instruction or wrong numbers."""
        return not self.ok and (self.signal == "SIGILL" or self.wrong_numbers)

    def to_json(self) -> dict[str, Any]:
        """The record kept in ``install.json``."""
        return {
            "ok": self.ok,
            "reason": self.reason,
            "seconds": round(self.seconds, 2),
            "threads": self.threads,
            "gpu_layers": self.gpu_layers,
            "tokens": list(self.tokens),
            "max_error": None if self.max_error is None else round(self.max_error, 6),
            "tolerance": LOGPROB_TOLERANCE,
            "cpu_features": list(self.cpu_features),
            "buffers": list(self.buffers),
            "signal": self.signal,
        }


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    with contextlib.suppress(ValueError):
        return signal.Signals(-returncode).name
    return f"signal {-returncode}"


def _read_log(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.read(_LOG_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _post_completion(port: int, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    conn = http.client.HTTPConnection(_HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read(_LOG_LIMIT)
    finally:
        conn.close()
    if response.status != 200:
        msg = f"HTTP {response.status}: {raw[:200].decode('utf-8', 'replace')}"
        raise ValueError(msg)
    data = json.loads(raw)
    if not isinstance(data, dict):
        msg = "the answer is not a JSON object"
        raise TypeError(msg)
    return data


Steps = list[tuple[int, dict[int, float]]]
"""Per generated token: (chosen id, {id: logprob} of the top tokens)."""


def _parse_steps(data: dict[str, Any]) -> Steps:
    steps: Steps = []
    for entry in data.get("completion_probabilities") or []:
        top = {int(t["id"]): float(t["logprob"]) for t in entry.get("top_logprobs") or []}
        steps.append((int(entry["id"]), top))
    if len(steps) != GENERATED_TOKENS:
        msg = f"expected {GENERATED_TOKENS} generated tokens with probabilities, got {len(steps)}"
        raise ValueError(msg)
    return steps


def compare_with_reference(
    reference: Reference, prompt: list[int], steps: Steps
) -> tuple[float, str | None]:
    """The largest log-probability difference, and a one-line complaint if it is too large."""
    tokens = prompt + [tok for tok, _ in steps]
    positions = [len(prompt) - 1 + i for i in range(len(steps))]
    worst, where = 0.0, ""
    for i, (logits, (_chosen, top)) in enumerate(
        zip(reference.logits(tokens, positions), steps, strict=True)
    ):
        expected = log_softmax(logits)
        for tok, got in top.items():
            err = abs(got - expected[tok]) if 0 <= tok < len(expected) else math.inf
            if err > worst:
                worst, where = err, f"token {tok} at generated position {i}"
                where += f": server {got:.4f}, reference {expected[tok]:.4f}"
    if worst > LOGPROB_TOLERANCE:
        return worst, (
            f"wrong numbers: log-probability off by {worst:.3f} (tolerance "
            f"{LOGPROB_TOLERANCE}) for {where}"
        )
    return worst, None


def _features(log: str) -> tuple[str, ...]:
    match = _SYSTEM_INFO_RE.search(log)
    return tuple(dict.fromkeys(_FEATURE_RE.findall(match.group("rest")))) if match else ()


def run_compute_check(
    server: Path,
    *,
    threads: int | None = None,
    gpu_layers: int = 0,
    library_path: str | None = None,
    timeout: float = COMPUTE_TIMEOUT,
    workdir: Path | None = None,
) -> ComputeReport:
    """Serve the tiny model with ``server`` and check its answers (see the module docstring).

    Args:
        server: the llama-server binary.
        threads: CPU threads (default: every CPU of this host, as users run it).
        gpu_layers: layers to offload (a GPU variant offloads all of them).
        library_path: a folder to put first on the loader path (a CUDA driver stub).
        timeout: seconds for the whole check.
        workdir: where the model and the log go (a temporary folder inside it).

    Returns:
        The report; a failure is a report with ``ok`` False, never an exception.
    """
    threads = threads or os.cpu_count() or 1
    started = time.monotonic()
    model = make_tiny_model()
    rng = random.Random(len(model.tensors))  # noqa: S311  a fixed prompt, not a secret
    prompt = [rng.randrange(FIRST_WORD, model.n_vocab) for _ in range(PROMPT_TOKENS)]
    with tempfile.TemporaryDirectory(prefix="compute-check-", dir=workdir) as tmp:
        folder = Path(tmp)
        gguf = write_gguf(model, folder / "tiny.gguf")
        argv = [
            str(server), "-m", str(gguf), "--host", _HOST, "-c", str(CONTEXT), "-np", "1",
            "-t", str(threads), "-tb", str(threads), "-ngl", str(gpu_layers),
        ]  # fmt: skip
        extra = {"LD_LIBRARY_PATH": library_path} if library_path else None
        # Info-level logs name the CPU features and weight buffers; a build that predates the
        # verbosity flag refuses it, and is asked again without it.
        outcome, text = _serve(argv + VERBOSE_FLAGS, extra, folder, prompt, started + timeout)
        if outcome.get("returncode") == 1 and _UNKNOWN_FLAG in text:
            outcome, text = _serve(argv, extra, folder, prompt, started + timeout)
    if "spawn_error" in outcome:
        return ComputeReport(
            ok=False,
            reason=f"could not start {server}: {outcome['spawn_error']}",
            seconds=time.monotonic() - started,
            threads=threads,
            gpu_layers=gpu_layers,
        )
    return _report(outcome, text, model, prompt, started, threads, gpu_layers)


def _serve(
    argv: list[str],
    extra: dict[str, str] | None,
    folder: Path,
    prompt: list[int],
    deadline: float,
) -> tuple[dict[str, Any], str]:
    """Start the server, exercise it, kill it: what happened, and its log."""
    log_path = folder / "server.log"
    port = free_port(_HOST)
    with log_path.open("wb") as log:
        try:
            proc = subprocess.Popen(
                [*argv, "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_environment(extra=extra),
                **group_popen_kwargs(),
            )
        except OSError as err:
            return {"spawn_error": str(err)}, ""
        try:
            outcome = _exercise(proc, port, prompt, deadline)
        finally:
            kill_tree(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KILL_WAIT)
    return outcome, _read_log(log_path)


def _exercise(
    proc: subprocess.Popen[bytes], port: int, prompt: list[int], deadline: float
) -> dict[str, Any]:
    """Wait for the server, then ask twice; what happened, for :func:`_report`."""

    def alive() -> bool:
        return proc.poll() is None

    if not wait_until_healthy(_HOST, port, deadline=deadline, is_alive=alive):
        if alive():
            return {"stage": "loading the model", "error": "not ready in time"}
        time.sleep(0.05)
        return {"stage": "loading the model or warming up", "returncode": proc.poll()}
    body = {
        "prompt": prompt,
        "n_predict": GENERATED_TOKENS,
        "n_probs": TOP_N,
        "temperature": 0,
        "cache_prompt": False,
        "ignore_eos": True,
        "seed": 0,
    }
    runs: list[Steps] = []
    for attempt in (1, 2):
        try:
            # Each request may stay silent for REQUEST_TIMEOUT, never past the check's deadline.
            left = min(REQUEST_TIMEOUT, max(deadline - time.monotonic(), _MIN_REQUEST_WAIT))
            runs.append(_parse_steps(_post_completion(port, body, left)))
        except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as err:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)
            if not alive():
                return {"stage": f"computing (request {attempt})", "returncode": proc.poll()}
            return {"stage": f"computing (request {attempt})", "error": str(err)}
    return {"runs": runs}


def _report(
    outcome: dict[str, Any],
    log: str,
    model: TinyModel,
    prompt: list[int],
    started: float,
    threads: int,
    gpu_layers: int,
) -> ComputeReport:
    lines = [line for line in log.splitlines() if line.strip()]
    common: dict[str, Any] = {
        "seconds": time.monotonic() - started,
        "threads": threads,
        "gpu_layers": gpu_layers,
        "cpu_features": _features(log),
        "buffers": tuple(dict.fromkeys(_BUFFER_RE.findall(log))),
        "log_tail": tuple(lines[-_LOG_TAIL:]),
    }
    if "runs" not in outcome:
        stage = outcome.get("stage", "starting")
        code = outcome.get("returncode")
        sig = _signal_name(code)
        if sig is not None:
            why = f"llama-server died with {sig} while {stage}"
        elif code is not None:
            why = f"llama-server exited with status {code} while {stage}"
        else:
            why = f"llama-server failed while {stage}: {outcome.get('error')}"
        return ComputeReport(ok=False, reason=why, signal=sig, **common)
    first, second = outcome["runs"]
    tokens = tuple(tok for tok, _ in first)
    values = [v for _, top in first + second for v in top.values()]
    if not values or not all(math.isfinite(v) for v in values):
        return ComputeReport(
            ok=False,
            reason="wrong numbers: a log-probability is not finite (NaN or infinite)",
            tokens=tokens,
            wrong_numbers=True,
            **common,
        )
    if tokens != tuple(tok for tok, _ in second) or any(
        abs(v - second[i][1].get(tok, math.inf)) > REPEAT_TOLERANCE
        for i, (_, top) in enumerate(first)
        for tok, v in top.items()
    ):
        return ComputeReport(
            ok=False,
            reason="wrong numbers: two identical requests gave different answers",
            tokens=tokens,
            wrong_numbers=True,
            **common,
        )
    worst, complaint = compare_with_reference(Reference(model), prompt, first)
    if complaint is not None:
        return ComputeReport(
            ok=False, reason=complaint, tokens=tokens, max_error=worst, wrong_numbers=True,
            **common,
        )  # fmt: skip
    seconds = time.monotonic() - started
    common["seconds"] = seconds
    return ComputeReport(
        ok=True,
        reason=(
            f"ok: {len(tokens)} tokens twice alike, log-probabilities within {worst:.1e} of "
            f"the reference, in {seconds:.1f} s"
        ),
        tokens=tokens,
        max_error=worst,
        **common,
    )
