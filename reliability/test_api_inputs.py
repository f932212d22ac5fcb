"""Bad input to the API: every call succeeds with transformers' result or raises nexus_sli's error.

Hypothesis draws ``input_ids`` / ``attention_mask`` (shapes, dtypes, values, memory layouts)
and ``run`` arguments. A call that succeeds is compared with transformers' in-memory forward
on every real token (hidden states, logits) and must leave the caller's tensors untouched; a
call that fails must raise a :class:`nexus_sli.NexusSLIError`. Deterministic tests cover the
constructor's arguments and tensors of unusual kinds (meta, sparse, nested).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_sli import (
    ActivationStoreError,
    ArgumentTypeError,
    CheckpointError,
    InputError,
    NexusSLIError,
    UniversalSLIProcessor,
)

from ._helpers import FIGURES, assert_close_on_tokens
from .conftest import scaled

VOCAB = 64
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
OTHER_DTYPES = [
    torch.bool,
    torch.float32,
    torch.float16,
    torch.float64,
    torch.bfloat16,
    torch.complex64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_complex:
        return values.to(torch.float32).to(dtype)
    if dtype == torch.bool:
        return values != 0
    try:
        return values.to(dtype)
    except (RuntimeError, TypeError):  # a dtype with few kernels on this torch
        return values


def _layout(draw: st.DrawFn, tensor: torch.Tensor, *, expand: bool = True) -> torch.Tensor:
    """The same values in another memory layout (transposed copy, strided slice), or row 0
    expanded over the batch (``expand``: only where that keeps the call valid or invalid)."""
    if tensor.dim() != 2:
        return tensor
    kinds = ["plain", "plain", "transposed", "strided", *(["expanded"] if expand else [])]
    kind = draw(st.sampled_from(kinds))
    if kind == "transposed":
        return tensor.t().contiguous().t()
    if kind == "strided":
        wide = torch.zeros(tensor.shape[0], 2 * tensor.shape[1], dtype=tensor.dtype)
        wide[:, ::2] = tensor
        return wide[:, ::2]
    if kind == "expanded" and tensor.shape[0] > 0:
        return tensor[:1].expand(tensor.shape[0], -1)
    return tensor


#: Ways a call can be wrong; a call with any of them must be refused with a NexusSLIError.
DEFECTS = [
    "ids-dtype",
    "ids-ndim",
    "ids-empty",
    "ids-value",
    "mask-shape",
    "mask-value",
    "mask-dtype",
    "mask-empty-row",
    "batch-size",
]


@st.composite
def ids_tensors(draw: st.DrawFn, defects: frozenset[str]) -> torch.Tensor:
    shape: tuple[int, ...] = (draw(st.integers(1, 5)), draw(st.integers(1, 8)))
    if "ids-ndim" in defects:
        ndim = draw(st.sampled_from([0, 1, 3]))
        shape = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    elif "ids-empty" in defects:
        shape = (shape[0], 0) if draw(st.booleans()) else (0, shape[1])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = torch.randint(0, VOCAB, shape, generator=g)
    if values.numel():
        flat = values.view(-1)
        if "ids-value" in defects:
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(
                st.sampled_from([VOCAB, VOCAB + 1, -1, 2**40])
            )
        elif draw(st.booleans()):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([0, VOCAB - 1]))
    if "ids-dtype" in defects:
        dtype = draw(st.sampled_from(OTHER_DTYPES))
    elif "ids-value" in defects:
        dtype = torch.int64  # keep the bad value representable
    else:
        dtype = draw(st.sampled_from(INT_DTYPES))
    return _layout(draw, _cast(values, dtype), expand="ids-value" not in defects)


@st.composite
def masks(draw: st.DrawFn, ids: torch.Tensor, defects: frozenset[str]) -> torch.Tensor | None:
    if "mask-shape" in defects:
        shape = tuple(draw(st.integers(0, 5)) for _ in range(draw(st.integers(0, 3))))
        if shape == tuple(ids.shape):
            shape = (*shape, 1)
        return torch.ones(shape, dtype=torch.long)
    needs_mask = defects & {"mask-value", "mask-dtype", "mask-empty-row"}
    kind = draw(st.sampled_from(["none", "ones", "left", "right", "holes", "holes"]))
    if kind == "none" and not needs_mask:
        return None
    if ids.dim() != 2:
        return torch.ones_like(ids, dtype=torch.long)
    batch, seq = ids.shape
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        cut = draw(st.integers(0, max(seq - 1, 0)))  # at least one real token per row
        if kind == "left":
            mask[row, :cut] = 0
        elif kind == "right":
            mask[row, seq - cut :] = 0
        elif kind == "holes":
            for col in range(seq):
                mask[row, col] = draw(st.sampled_from([0, 1, 1]))
            if not bool(mask[row].any()) and seq:
                mask[row, draw(st.integers(0, seq - 1))] = 1
    if mask.numel():
        if "mask-value" in defects:
            mask.view(-1)[draw(st.integers(0, mask.numel() - 1))] = draw(st.sampled_from([2, -1]))
        if "mask-empty-row" in defects and batch:
            mask[draw(st.integers(0, batch - 1))] = 0
    if "mask-dtype" in defects:
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.complex64]))
    elif "mask-value" in defects:
        dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    else:
        dtype = draw(
            st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8])
        )
    return _layout(draw, _cast(mask, dtype), expand=not needs_mask)


@st.composite
def calls(
    draw: st.DrawFn,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], frozenset[str]]:
    defects: frozenset[str] = frozenset()
    if draw(st.integers(0, 9)) < 4:
        defects = frozenset(draw(st.sets(st.sampled_from(DEFECTS), min_size=1, max_size=2)))
    ids = draw(ids_tensors(defects))
    mask = draw(masks(ids, defects))
    batch_size = draw(st.integers(-2, 0) if "batch-size" in defects else st.integers(1, 6))
    kwargs = {
        "batch_size": batch_size,
        "output_hidden_states": draw(st.booleans()),
        "output_logits": draw(st.booleans()),
        "resume": draw(st.booleans()),
    }
    return ids, mask, kwargs, defects


@pytest.fixture(scope="module")
def llama_pair(tiny_llama: Path) -> tuple[UniversalSLIProcessor, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # in eval mode
    return UniversalSLIProcessor(tiny_llama, progress=False), model


@settings(max_examples=scaled(200))
@given(call=calls())
def test_run_equals_transformers_or_refuses(
    llama_pair: tuple[UniversalSLIProcessor, Any],
    call: tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], frozenset[str]],
) -> None:
    FIGURES["fuzz examples: run() inputs"] += 1
    proc, model = llama_pair
    ids, mask, kwargs, defects = call
    ids_before = ids.clone()
    mask_before = None if mask is None else mask.clone()
    try:
        result = proc.run(ids, mask, **kwargs)
    except NexusSLIError:
        FIGURES["fuzz: run() calls refused"] += 1
        assert defects, "a valid call was refused"
        return
    finally:
        assert torch.equal(ids, ids_before), "run() modified the caller's input_ids"
        assert mask is None or mask_before is None or torch.equal(mask, mask_before)
    assert not defects, f"a call with {sorted(defects)} was accepted"
    FIGURES["fuzz: run() calls compared with transformers"] += 1
    # It succeeded: the inputs must have been valid, and the result transformers'.
    assert ids.dim() == 2 and ids.numel() > 0 and not ids.dtype.is_floating_point
    ids_long = ids.long()
    assert int(ids_long.min()) >= 0 and int(ids_long.max()) < VOCAB
    mask_long = torch.ones_like(ids_long) if mask is None else mask.long()
    assert bool(((mask_long == 0) | (mask_long == 1)).all()) and bool((mask_long.sum(-1) > 0).all())
    assert torch.equal(result.attention_mask, mask_long)
    with torch.no_grad():
        want = model(input_ids=ids_long, attention_mask=mask_long, output_hidden_states=True)
    assert_close_on_tokens(result.last_hidden_state, want.hidden_states[-1], mask_long)
    if kwargs["output_hidden_states"]:
        assert result.hidden_states is not None
        assert len(result.hidden_states) == len(want.hidden_states)
        for got, expected in zip(result.hidden_states, want.hidden_states, strict=True):
            assert_close_on_tokens(got, expected, mask_long)
    else:
        assert result.hidden_states is None
    if kwargs["output_logits"]:
        assert result.logits is not None
        assert_close_on_tokens(result.logits, want.logits, mask_long)
    else:
        assert result.logits is None


# ---------------------------------------------------------------------- deterministic cases
# Regression test (bug found by this suite's fuzzing): single-token sequences made by transposing
# a row ([1, B] -> [B, 1], strides (1, B)) count as contiguous for torch, but the inputs digest
# of the activation manifest viewed them as bytes and raised RuntimeError ("self.stride(-1) must
# be 1 to view Long as Byte").
@pytest.mark.parametrize("kind", ["transposed-row", "strided-column"])
def test_single_token_columns_equal_transformers(
    kind: str, llama_pair: tuple[UniversalSLIProcessor, Any]
) -> None:
    proc, model = llama_pair
    row = torch.tensor([[5, 6, 7]])
    ids = row.t() if kind == "transposed-row" else torch.tensor([[5, 9], [6, 9], [7, 9]])[:, ::2]
    mask = torch.ones(1, 3, dtype=torch.long).t()
    assert tuple(ids.shape) == (3, 1) and ids.stride(-1) != 1
    result = proc.run(ids, mask, output_logits=True)
    with torch.no_grad():
        want = model(input_ids=ids.contiguous(), output_hidden_states=True)
    assert result.logits is not None
    torch.testing.assert_close(result.logits, want.logits, rtol=1e-4, atol=1e-4)


def test_positions_up_to_the_limit_equal_transformers(tiny_gpt2: Path) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, VOCAB, (2, 16))
    got = UniversalSLIProcessor(tiny_gpt2, progress=False).run(ids, output_logits=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        want = model(input_ids=ids)
    assert got.logits is not None
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


# Regression test (bug found by this suite): a sequence longer than a learned position table
# (GPT-2 n_positions=16 here) escaped as IndexError from the embedding instead of InputError.
def test_sequence_past_the_position_table_refused(tiny_gpt2: Path) -> None:
    with pytest.raises(InputError, match="16"):
        UniversalSLIProcessor(tiny_gpt2, progress=False).run(torch.randint(3, VOCAB, (1, 17)))


# Regression tests (bug found by this suite): UniversalSLIProcessor._check_inputs did not check
# the tensors' device and layout; meta, sparse and nested tensors escaped as RuntimeError /
# NotImplementedError.


@pytest.mark.parametrize(
    ("make_ids", "make_mask"),
    [
        pytest.param(
            lambda: torch.ones(2, 3, dtype=torch.long, device="meta"),
            None,
            id="meta-ids",
        ),
        pytest.param(
            lambda: torch.ones(2, 3, dtype=torch.long),
            lambda: torch.ones(2, 3, dtype=torch.long, device="meta"),
            id="meta-mask",
        ),
        pytest.param(
            lambda: torch.ones(2, 3, dtype=torch.long).to_sparse(),
            None,
            id="sparse-ids",
        ),
        pytest.param(
            lambda: torch.nested.nested_tensor(
                [torch.ones(2, dtype=torch.long), torch.ones(3, dtype=torch.long)]
            ),
            None,
            id="nested-ids",
        ),
        pytest.param(lambda: [[1, 2, 3]], None, id="list-ids"),
        pytest.param(
            lambda: torch.ones(2, 3, dtype=torch.long), lambda: [[1, 1, 1]], id="list-mask"
        ),
    ],
)
def test_unusual_tensor_kinds_refused(tiny_llama: Path, make_ids: Any, make_mask: Any) -> None:
    proc = UniversalSLIProcessor(tiny_llama, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors warn that they are a prototype
        ids = make_ids()
    mask = None if make_mask is None else make_mask()
    with pytest.raises(NexusSLIError):
        proc.run(ids, mask)


# Regression tests (bug found by this suite, the first six cases): UniversalSLIProcessor accepted
# any torch.device / torch.dtype; an unavailable or malformed device, or a non-float compute
# dtype, escaped later as RuntimeError / AssertionError / NotImplementedError.


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(
            {"device": "cuda"},
            id="device-cuda-unavailable",
        ),
        pytest.param(
            {"device": "mps"},
            id="device-mps-unavailable",
        ),
        pytest.param(
            {"device": "bogus"},
            id="device-malformed",
        ),
        pytest.param(
            {"dtype": torch.int64},
            id="dtype-int64",
        ),
        pytest.param(
            {"dtype": torch.bool},
            id="dtype-bool",
        ),
        pytest.param(
            {"dtype": torch.complex64},
            id="dtype-complex64",
        ),
        pytest.param({"device": 5}, id="device-int"),
        pytest.param({"dtype": "float32"}, id="dtype-str"),
        pytest.param({"custom_layer_overrides": {"attention": 5}}, id="override-not-str"),
        pytest.param({"custom_layer_overrides": {"": "x"}}, id="override-empty-role"),
        pytest.param({"custom_layer_overrides": {"attention": "nope_nope"}}, id="override-unknown"),
        pytest.param({"activation_dir": b"/tmp/x"}, id="activation-dir-bytes"),
    ],
)
def test_bad_constructor_arguments_refused(tiny_llama: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(NexusSLIError):
        UniversalSLIProcessor(tiny_llama, progress=False, **kwargs).run(
            torch.ones(1, 3, dtype=torch.long)
        )


# Regression test (bug found by this suite): ActivationStore.__init__ caught the OSError of
# mkdir, not the ValueError of a path with a NUL byte.
def test_activation_dir_with_nul_byte_refused(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ActivationStoreError):
        UniversalSLIProcessor(tiny_llama, activation_dir=f"{tmp_path}/a\x00b", progress=False).run(
            torch.ones(1, 3, dtype=torch.long)
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_other_float_compute_dtypes(tiny_llama: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, VOCAB, (2, 5))
    got = UniversalSLIProcessor(tiny_llama, dtype=dtype, progress=False).run(ids)
    assert got.last_hidden_state.dtype == dtype
    if dtype == torch.float64:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
        with torch.no_grad():
            want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got.last_hidden_state, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("texts", "error"),
    [
        ("a single string", InputError),
        ([], InputError),
        ([1, 2], ArgumentTypeError),
        (["no tokenizer in this checkpoint"], CheckpointError),
    ],
    ids=["str", "empty", "ints", "no-tokenizer"],
)
def test_bad_run_texts_refused(tiny_llama: Path, texts: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        UniversalSLIProcessor(tiny_llama, progress=False).run_texts(texts)
