from __future__ import annotations

import pickle

import pytest

from llama_proc import errors

CASES = [
    pytest.param(errors.ChecksumMismatchError("http://x/a.tgz", "a" * 64, "b" * 64), id="checksum"),
    pytest.param(
        errors.BuildError(["cmake", "--build", "."], 2, ["e1", "e2"], "no compiler", "/l"),
        id="build",
    ),
    pytest.param(errors.CacheLockTimeoutError("/c/x.lock", 5.0), id="lock"),
    pytest.param(
        errors.ServerStartError("llama-server exited", 1, "bad flag", ["E x"]), id="start"
    ),
    pytest.param(
        errors.ServerNotReadyError("http://127.0.0.1:1", 3.0, "stalled", ["l"]), id="ready"
    ),
    pytest.param(errors.ServerRequestError("boom", 500, "{}"), id="request"),
    pytest.param(errors.ConfigError("bad"), id="config"),
]


@pytest.mark.parametrize("err", CASES)
def test_errors_pickle_round_trip(err):
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)


def test_builtin_bases():
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.CacheLockTimeoutError, TimeoutError)
    assert issubclass(errors.ServerNotReadyError, TimeoutError)
    assert issubclass(errors.InvalidArgumentError, ValueError)


def test_messages_say_what_to_do():
    text = str(errors.ChecksumMismatchError("u", "a", "b"))
    assert "expected a, got b" in text
    assert "deleted" in text
    text = str(errors.BuildError(["cmake"], 1, ["x"], "install a C++ compiler", "/tmp/log"))
    assert "exit code 1" in text
    assert "likely cause: install a C++ compiler" in text
    assert "full log: /tmp/log" in text
    assert "    x" in text
    assert "LLAMA_PROC_LOCK_TIMEOUT" in str(errors.CacheLockTimeoutError("/l", 1))


def test_every_error_is_listed():
    names = {n for n in dir(errors) if n.endswith("Error") and not n.startswith("_")}
    assert names == set(errors.__all__)
