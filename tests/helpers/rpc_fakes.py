"""A fake llama.cpp RPC worker speaking just enough of the protocol to test probes.

The real worker (ggml-rpc-server) is used wherever behaviour matters; this fake only stands in
for what a single build cannot show: a worker from another llama.cpp build (a different
protocol version), a peer that drops the handshake, or one that never answers.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Literal, Self

Mode = Literal["answer", "silent", "close", "oversized"]

HELLO = 14
DEVICE_COUNT = 15
GET_DEVICE_MEMORY = 11
MiB = 1024 * 1024


class FakeRpcWorker:
    """TCP server on 127.0.0.1:<free port>.

    Modes: ``answer`` replies like an rpc-server of ``version``; ``silent`` accepts and reads
    but never answers (a worker busy with another client); ``close`` hangs up after the first
    command (a build that rejects our HELLO); ``oversized`` answers HELLO with an absurd size.
    """

    def __init__(
        self,
        mode: Mode = "answer",
        version: tuple[int, int, int] = (7, 0, 0),
        devices: tuple[tuple[int, int], ...] = ((1000 * MiB, 2000 * MiB),),
    ) -> None:
        self.mode = mode
        self.version = version
        self.devices = devices
        self.commands: list[int] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.close()
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._clients.append(client)
            threading.Thread(target=self._session, args=(client,), daemon=True).start()

    def _recv(self, client: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = client.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _session(self, client: socket.socket) -> None:
        client.settimeout(10)
        with contextlib.suppress(OSError, EOFError), client:
            while not self._stop.is_set():
                command, size = struct.unpack("<BQ", self._recv(client, 9))
                payload = self._recv(client, size)
                self.commands.append(command)
                if self.mode == "close":
                    return
                if self.mode == "silent":
                    self._stop.wait(30)
                    return
                if self.mode == "oversized":
                    client.sendall(struct.pack("<Q", 1 << 40))
                    return
                reply = self._reply(command, payload)
                client.sendall(struct.pack("<Q", len(reply)) + reply)

    def _reply(self, command: int, payload: bytes) -> bytes:
        if command == HELLO:
            return bytes([*self.version, 0]) + bytes(24)
        if command == DEVICE_COUNT:
            return struct.pack("<I", len(self.devices))
        if command == GET_DEVICE_MEMORY:
            (index,) = struct.unpack("<I", payload)
            return struct.pack("<QQ", *self.devices[index])
        return b""
