"""Fuzz the checkpoint reader: mutated safetensors files and config.json files.

Each example runs in this process under a timer (a hang fails the example) and must either
succeed or raise a :class:`nexus_sli.NexusSLIError`; any other exception fails the test. When
the reader accepts a mutated file, every tensor it returns must hold exactly the bytes of its
span in that file, and that span must lie inside the file: nothing is read from outside it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from nexus_sli import NexusSLIError, UniversalSLIProcessor
from nexus_sli._checkpoint import SafetensorsCheckpoint, load_config, read_config_dict

from ._helpers import FIGURES
from .conftest import scaled

EXAMPLE_SECONDS = 10.0


class HangError(Exception):
    """An example ran past EXAMPLE_SECONDS."""


@contextlib.contextmanager
def time_limit(seconds: float = EXAMPLE_SECONDS) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise HangError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------- safetensors bytes
def _base_file() -> bytes:
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.arange(4, dtype=torch.int64),
        "c": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
        "d": torch.zeros(0, dtype=torch.uint8),
        "e": torch.tensor(7.0, dtype=torch.float16),
    }
    return save(tensors, metadata={"format": "pt", "note": "fuzz"})


BASE = _base_file()
BASE_HEADER_LEN = struct.unpack("<Q", BASE[:8])[0]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3"]
JUNK_DTYPES = ["U16", "U32", "U64", "C64", "F8_E8M0", "F4", "", "f32", "F32 ", "X"]
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
SIZES.update({"U8": 1, "BOOL": 1, "F8_E4M3": 1})

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def flipped(draw: st.DrawFn) -> bytes:
    data = bytearray(BASE)
    header_end = 8 + BASE_HEADER_LEN
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, header_end + 8) | st.integers(0, len(data) - 1))
        data[where] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def header_length(draw: st.DrawFn) -> bytes:
    value = draw(
        st.sampled_from(
            [0, 1, 2, 7, 8, BASE_HEADER_LEN - 1, BASE_HEADER_LEN + 1, len(BASE), 2**63, 2**64 - 1]
        )
        | st.integers(0, 2**64 - 1)
    )
    return struct.pack("<Q", value) + BASE[8:]


@st.composite
def truncated_or_extended(draw: st.DrawFn) -> bytes:
    cut = draw(st.integers(0, len(BASE)))
    return BASE[:cut] + draw(st.binary(max_size=64))


@st.composite
def rebuilt(draw: st.DrawFn) -> bytes:
    """A header from scratch: mostly consistent (so the reader gets past safetensors' own
    checks), with one field perturbed now and then."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=0, max_size=4, unique=True))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = SIZES[dtype] * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=6), st.text(max_size=6) | json_values, max_size=3)
        )
    perturb = draw(st.booleans())
    if names and perturb:
        victim = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        victim[field] = draw(
            st.sampled_from(JUNK_DTYPES)
            | st.lists(st.integers(-(2**64), 2**64), max_size=4)
            | json_values
        )
    body = draw(st.binary(min_size=offset, max_size=offset)) + draw(st.binary(max_size=16))
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 9))
    length = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 8]))
    return struct.pack("<Q", max(length, 0)) + raw + body


@st.composite
def json_edited(draw: st.DrawFn) -> bytes:
    """The base header with one value replaced by arbitrary JSON (length kept consistent)."""
    header = json.loads(BASE[8 : 8 + BASE_HEADER_LEN])
    key = draw(st.sampled_from(sorted(header)))
    entry = header[key]
    field = draw(st.sampled_from(sorted(entry)))
    entry[field] = draw(json_values)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + BASE[8 + BASE_HEADER_LEN :]


safetensors_files = st.one_of(
    flipped(), header_length(), truncated_or_extended(), rebuilt(), json_edited()
)


def _spans(data: bytes) -> dict[str, tuple[int, int]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return {
        k: (8 + n + int(v["data_offsets"][0]), 8 + n + int(v["data_offsets"][1]))
        for k, v in header.items()
        if k != "__metadata__"
    }


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    d = tmp_path_factory.mktemp("fuzz_safetensors")
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    return d


@settings(max_examples=scaled(700))
@given(data=safetensors_files)
def test_reader_survives_mutated_safetensors(fuzz_dir: Path, data: bytes) -> None:
    FIGURES["fuzz examples: safetensors files"] += 1
    path = fuzz_dir / "model.safetensors"
    path.write_bytes(data)
    with time_limit():
        try:
            checkpoint = SafetensorsCheckpoint(fuzz_dir)
        except NexusSLIError:
            FIGURES["fuzz: safetensors files refused"] += 1
            return
        spans = _spans(data)
        for name in sorted(checkpoint.names()):
            begin, end = spans[name]
            assert 0 <= begin <= end <= len(data), (name, begin, end, len(data))
            try:
                tensor = checkpoint.get(name)
            except NexusSLIError:
                continue
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert raw == data[begin:end], name
            assert tuple(tensor.shape) == checkpoint.shape(name)
        with contextlib.suppress(NexusSLIError):
            checkpoint.get_many(list(checkpoint.names()))
            checkpoint.fingerprint()
    FIGURES["fuzz: safetensors files accepted"] += 1


# ---------------------------------------------------------------------- config.json
KNOWN_TYPES = ["llama", "gpt2", "bert", "t5", "mistral", "qwen2", "opt", "gpt_neox", "mamba"]


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "typed", "llama-mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=128))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "typed":
        config = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
        config["model_type"] = draw(st.sampled_from(KNOWN_TYPES) | st.text(max_size=8))
        return json.dumps(config).encode()
    config = dict(LLAMA_CONFIG)
    for key in draw(st.lists(st.sampled_from(sorted(LLAMA_CONFIG)), max_size=3)):
        if draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = draw(json_values)
    return json.dumps(config).encode()


LLAMA_CONFIG: dict[str, Any] = {}


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    LLAMA_CONFIG.update(json.loads((tiny_llama / "config.json").read_text()))
    return tmp_path_factory.mktemp("fuzz_config")


@settings(max_examples=scaled(300))
@given(data=config_files())
def test_config_reader_survives_mutated_configs(config_dir: Path, data: bytes) -> None:
    FIGURES["fuzz examples: config.json"] += 1
    (config_dir / "config.json").write_bytes(data)
    with time_limit():
        try:
            raw = read_config_dict(config_dir)
            assert isinstance(raw, dict) and isinstance(raw["model_type"], str)
            load_config(config_dir)
        except NexusSLIError:
            return


# ---------------------------------------------------------------------- configs end to end
small_values: st.SearchStrategy[Any] = (
    st.integers(-2, 130)
    | st.sampled_from([None, True, "silu", "nope", "", 0.5, [], {}, {"type": "linear"}])
    | st.floats(-1, 1e6, allow_nan=False)
)
CRITICAL_KEYS = [
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "pad_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("fuzz_e2e") / "ckpt"
    shutil.copytree(tiny_llama, d)
    return d, json.loads((d / "config.json").read_text())


# Found bugs (the explicit examples): configs that transformers accepts but the family cannot
# build (an unknown hidden_act, an unknown rope type, pad_token_id >= vocab_size) escaped from
# plan_run as KeyError / AssertionError instead of CheckpointError.
@settings(max_examples=scaled(60), phases=[Phase.explicit, Phase.generate])
@given(edits=st.dictionaries(st.sampled_from(CRITICAL_KEYS), small_values, min_size=1, max_size=3))
@example(edits={"hidden_act": "nope"})
@example(edits={"pad_token_id": 100})
@example(edits={"rope_scaling": {"type": "nope"}})
def test_processor_survives_mutated_configs(
    e2e: tuple[Path, dict[str, Any]], edits: dict[str, Any]
) -> None:
    """Mutated configs all the way through UniversalSLIProcessor and one short run."""
    FIGURES["fuzz examples: configs end to end"] += 1
    model_dir, base = e2e
    (model_dir / "config.json").write_text(json.dumps({**base, **edits}))
    with time_limit():
        try:
            proc = UniversalSLIProcessor(model_dir, progress=False)
            proc.run(torch.ones(1, 3, dtype=torch.long))
        except NexusSLIError:
            return
