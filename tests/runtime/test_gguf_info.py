"""GGUF header reading and the memory estimate.

Small models are written on the fly with ``gguf``'s own writer; the real SmolLM2 GGUF checks
the values a published model carries, and the real llama-server's RSS checks the estimate.
``read_model_info`` (our header reader) must give exactly what the same fields read with
``gguf``'s GGUFReader (llama.cpp's own reader) give: :func:`_reference_info` below.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from tiny_gguf import write_model

from llama_proc.errors import InvalidArgumentError, ModelFileError
from llama_proc.models import gguf_info
from llama_proc.models.gguf_info import (
    ESTIMATE_ERROR_BOUND,
    LOGIT_BYTES,
    PROCESS_OVERHEAD,
    SLOT_STATE_BYTES,
    ModelInfo,
    cached_model_info,
    estimate_memory,
    read_model_info,
)

if TYPE_CHECKING:
    from llama_proc.config import Settings

MIB = 1 << 20
SERVE_TIMEOUT = 120.0
WORDS_PER_TOKEN = 0.75  # English words per SmolLM2 token, roughly


def test_header_values_of_a_written_model(tmp_path: Path) -> None:
    model = write_model(tmp_path / "tiny.gguf", layers=3, heads=8, kv_heads=2, embedding=64)
    info = read_model_info(model)
    assert (info.architecture, info.name, info.n_layer) == ("llama", "tiny test model", 3)
    assert (info.context_length, info.embedding_length, info.n_head) == (1024, 64, 8)
    assert info.n_head_kv == (2, 2, 2)
    assert info.kv_heads == 2
    # No key_length in the header: llama.cpp's own default, embedding / heads.
    assert (info.key_length, info.value_length) == (8, 8)
    assert info.quantization == "F16"
    assert info.vocab_size == 100
    assert info.parameter_count == 3 * (64 * 64 + 64)
    assert info.tensor_bytes == 3 * (64 * 64 * 2 + 64 * 4)
    assert info.file_size == model.stat().st_size
    assert info.parts == (model,)
    assert info.to_dict()["path"] == str(model)


def test_per_layer_kv_heads_and_explicit_head_size(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", layers=3, kv_heads=[4, 0, 2], key_length=32)
    info = read_model_info(model)
    assert info.n_head_kv == (4, 0, 2)
    assert (info.key_length, info.value_length) == (32, 32)
    estimate = estimate_memory(info, ctx_size=100, kv_type="f16")
    # Layer by layer: a layer without KV heads (a recurrent one) holds no KV cache.
    assert estimate.kv_cache == 100 * (4 + 0 + 2) * (32 + 32) * 2


def test_quantization_without_a_file_type_is_the_dominant_tensor_type(tmp_path: Path) -> None:
    info = read_model_info(write_model(tmp_path / "m.gguf", file_type=None))
    assert info.quantization == "F16"


def test_estimate_adds_weights_kv_cache_slots_and_overhead(tmp_path: Path) -> None:
    info = read_model_info(write_model(tmp_path / "m.gguf", layers=4, kv_heads=2, embedding=64))
    est = estimate_memory(info, ctx_size=2048, n_parallel=3)
    kv = 2 * 4 * 2048 * 2 * 8 * 2  # 2 (K and V) * layers * ctx * kv heads * head size * f16
    assert est.kv_cache == kv
    assert est.weights == info.tensor_bytes
    assert est.slots == 3 * (100 * LOGIT_BYTES + SLOT_STATE_BYTES)
    assert est.overhead == PROCESS_OVERHEAD
    assert est.total == info.tensor_bytes + kv + est.slots + PROCESS_OVERHEAD
    assert est.to_dict()["total"] == est.total
    # q8_0 stores 32 elements in 34 bytes; the trained context is the default (llama's -c 0).
    assert estimate_memory(info, ctx_size=2048, kv_type="Q8_0").kv_cache == kv // 2 * 34 // 32
    assert estimate_memory(info).ctx_size == 1024


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"kv_type": "q3_k"}, "unknown KV cache type", id="kv-type"),
        pytest.param({"n_parallel": 0}, "at least 1", id="slots"),
        pytest.param({"ctx_size": -1}, "ctx_size", id="ctx"),
    ],
)
def test_estimate_refuses_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    info = read_model_info(write_model(tmp_path / "m.gguf"))
    with pytest.raises(InvalidArgumentError, match=match):
        estimate_memory(info, **kwargs)


def test_split_model_counts_every_part(tmp_path: Path) -> None:
    write_model(tmp_path / "big.gguf", layers=4, split_max_tensors=3)
    parts = sorted(tmp_path.glob("big-*-of-*.gguf"))
    assert len(parts) == 3
    info = read_model_info(parts[0])
    whole = read_model_info(write_model(tmp_path / "one" / "big.gguf", layers=4))
    assert info.parts == tuple(parts)
    assert info.tensor_bytes == whole.tensor_bytes
    assert info.parameter_count == whole.parameter_count
    assert info.file_size == sum(p.stat().st_size for p in parts)
    parts[2].unlink()
    with pytest.raises(ModelFileError, match=r"big-00003-of-00003\.gguf is missing"):
        read_model_info(parts[0])


def test_not_a_gguf_file_is_a_model_file_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        read_model_info(bad)
    with pytest.raises(ModelFileError, match="does not exist"):
        read_model_info(tmp_path / "missing.gguf")
    truncated = tmp_path / "t.gguf"
    whole = write_model(tmp_path / "w.gguf").read_bytes()
    truncated.write_bytes(whole[:200])
    with pytest.raises(ModelFileError, match=r"t\.gguf"):
        read_model_info(truncated)


# ----------------------------------------------------------------------------- both readers
def _reference_info(model: Path) -> ModelInfo:
    """The header fields read with gguf's GGUFReader (the reader this module used before)."""
    reader = GGUFReader(model, "r")

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    def integer(key: str) -> int | None:
        v = value(key)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    def per_layer(key: str, n_layer: int) -> tuple[int, ...]:
        v = value(key)
        if isinstance(v, list):
            return tuple(int(x) for x in v)
        return (int(v),) * n_layer if isinstance(v, int) and not isinstance(v, bool) else ()

    arch = value("general.architecture")
    parts = gguf_info._parts(model, integer("split.count"))
    tensors = list(reader.tensors)
    for part in parts[1:]:
        tensors.extend(GGUFReader(part, "r").tensors)
    n_layer = integer(f"{arch}.block_count") or 0
    n_head = per_layer(f"{arch}.attention.head_count", n_layer)
    n_head_kv = per_layer(f"{arch}.attention.head_count_kv", n_layer) or n_head
    embedding = integer(f"{arch}.embedding_length")
    head_max = max(n_head, default=0)
    key_length = integer(f"{arch}.attention.key_length") or (
        embedding // head_max if embedding and head_max else None
    )
    file_type = integer("general.file_type")
    if file_type is not None and LlamaFileType(file_type) != LlamaFileType.GUESSED:
        name = LlamaFileType(file_type).name
        quantization: str | None = "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    else:
        by_type: dict[str, int] = {}
        for t in tensors:
            kind = GGMLQuantizationType(int(t.tensor_type)).name
            by_type[kind] = by_type.get(kind, 0) + int(t.n_bytes)
        quantization = max(by_type, key=by_type.__getitem__)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return ModelInfo(
        path=model,
        architecture=arch,
        name=value("general.name") or None,
        size_label=value("general.size_label") or None,
        parameter_count=sum(int(t.n_elements) for t in tensors),
        n_layer=n_layer,
        context_length=integer(f"{arch}.context_length"),
        embedding_length=embedding,
        n_head=head_max or None,
        n_head_kv=n_head_kv,
        key_length=key_length,
        value_length=integer(f"{arch}.attention.value_length") or key_length,
        vocab_size=integer(f"{arch}.vocab_size") or (len(tokens.data) if tokens else None),
        quantization=quantization,
        sliding_window=integer(f"{arch}.attention.sliding_window"),
        expert_count=integer(f"{arch}.expert_count"),
        tensor_bytes=sum(int(t.n_bytes) for t in tensors),
        file_size=sum(p.stat().st_size for p in parts),
        parts=parts,
    )


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"kv_heads": [4, 0, 2], "layers": 3, "key_length": 32}, id="per-layer"),
        pytest.param({"file_type": None}, id="no-file-type"),
        pytest.param({"file_type": 1024}, id="guessed"),
        pytest.param({"layers": 4, "split_max_tensors": 3}, id="split"),
    ],
)
def test_same_info_as_the_gguf_package_reader(tmp_path: Path, options: dict[str, Any]) -> None:
    write_model(tmp_path / "m.gguf", **options)
    first = min(tmp_path.glob("*.gguf"))
    assert read_model_info(first) == _reference_info(first)


def test_same_info_as_the_gguf_package_reader_on_the_real_model(smol_model: Path) -> None:
    began = time.perf_counter()
    ours = read_model_info(smol_model)
    elapsed = time.perf_counter() - began
    assert ours == _reference_info(smol_model)
    assert elapsed < 0.5, f"read_model_info took {elapsed:.3f} s"


def test_cached_info_follows_the_files_identity(
    tmp_path: Path, smol_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model.gguf"
    shutil.copyfile(smol_model, model)
    reads: list[Path] = []
    real = gguf_info.read_model_info

    def counting(path: Any) -> ModelInfo:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(gguf_info, "read_model_info", counting)
    first = cached_model_info(model)
    assert cached_model_info(model) is first
    assert len(reads) == 1
    # Another file under the same name (another quantization, say): read again.
    write_model(tmp_path / "other.gguf")
    os.replace(tmp_path / "other.gguf", model)
    second = cached_model_info(model)
    assert len(reads) == 2
    assert second.tensor_bytes != first.tensor_bytes
    assert cached_model_info(model) is second
    model.unlink()
    with pytest.raises(ModelFileError, match="does not exist"):
        cached_model_info(model)


# ----------------------------------------------------------------------------- the real model
def test_real_model_header(smol_model: Path) -> None:
    info = read_model_info(smol_model)
    assert (info.architecture, info.n_layer, info.context_length) == ("llama", 30, 8192)
    assert (info.n_head, info.kv_heads, info.key_length, info.value_length) == (9, 3, 64, 64)
    assert (info.embedding_length, info.vocab_size, info.quantization) == (576, 49152, "Q4_1")
    assert info.size_label == "135M"
    assert 134_000_000 < info.parameter_count < 135_000_000
    assert info.tensor_bytes < info.file_size == smol_model.stat().st_size


def _rss(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/<pid>/status")
def test_estimate_matches_the_real_servers_rss(
    llama_server_bin: Path, smol_model: Path, real_settings: Settings
) -> None:
    from llama_proc.server import LlamaServer

    info = read_model_info(smol_model)
    errors: dict[int, tuple[float, float]] = {}
    for ctx in (512, 2048, 8192):
        estimate = estimate_memory(info, ctx_size=ctx, n_parallel=1).total
        server = LlamaServer(
            smol_model, binary=llama_server_bin, ctx_size=ctx, parallel=1, threads=2
        )
        server.start(timeout=SERVE_TIMEOUT)
        try:
            time.sleep(0.2)  # let the warm-up's pages settle
            idle = _rss(server.pid or 0)["VmRSS"]
            # Serve a prompt that fills most of the context: the compute buffers are used then.
            words = int(ctx * 0.6 * WORDS_PER_TOKEN)
            text = " ".join(["apple banana cherry"] * (words // 3))
            server.client.chat([{"role": "user", "content": text}], max_tokens=4)
            peak = _rss(server.pid or 0)["VmHWM"]
        finally:
            server.stop()
        errors[ctx] = ((estimate - idle) / idle, (estimate - peak) / peak)
    report = {c: f"idle {i:+.1%}, serving {p:+.1%}" for c, (i, p) in errors.items()}
    print(f"memory estimate error against VmRSS: {report}")
    for ctx, (idle_error, peak_error) in errors.items():
        assert abs(idle_error) <= ESTIMATE_ERROR_BOUND, (ctx, report)
        assert abs(peak_error) <= ESTIMATE_ERROR_BOUND, (ctx, report)


# -- hostile counts: one line, at once ---------------------------------------------------------


def _hostile(path: Path, **values: tuple[int, str]) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    for key, (value, kind) in values.items():
        getattr(writer, f"add_{kind}")(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    ("values", "match"),
    [
        pytest.param({"llama.block_count": (200_000_000, "uint32")}, "200000000 layers", id="200M"),
        pytest.param(
            {
                "llama.block_count": (U32_MAX, "uint32"),
                "llama.attention.head_count": (U32_MAX, "uint32"),
                "llama.attention.head_count_kv": (U32_MAX, "uint32"),
                "llama.context_length": (U32_MAX, "uint32"),
            },
            "layers",
            id="u32-max",
        ),
        pytest.param(
            {
                "llama.block_count": (U64_MAX, "uint64"),
                "llama.attention.key_length": (U64_MAX, "uint64"),
            },
            "block_count",
            id="u64-max",
        ),
        pytest.param(
            {"llama.block_count": (8, "uint32"), "llama.attention.head_count_kv": (-1, "int32")},
            "head_count_kv",
            id="negative",
        ),
        pytest.param(
            {"llama.block_count": (8, "uint32"), "llama.context_length": (U64_MAX, "uint64")},
            "context_length",
            id="context",
        ),
    ],
)
def test_hostile_counts_are_refused_at_once(
    tmp_path: Path, values: dict[str, tuple[int, str]], match: str
) -> None:
    path = _hostile(tmp_path / "hostile.gguf", **values)
    assert path.stat().st_size < 4096
    began = time.perf_counter()
    with pytest.raises(ModelFileError, match=match) as info:
        estimate_memory(read_model_info(path), 4096)
    assert time.perf_counter() - began < 0.5
    assert "\n" not in str(info.value)


def test_a_split_count_beyond_the_cap_is_one_short_line(tmp_path: Path) -> None:
    path = _hostile(tmp_path / "m-00001-of-65535.gguf", **{"split.count": (65535, "uint16")})
    began = time.perf_counter()
    with pytest.raises(ModelFileError, match="65535 parts") as info:
        read_model_info(path)
    assert time.perf_counter() - began < 0.5
    assert len(str(info.value)) < 400
