"""lorakern.quant against bitsandbytes on CPU: the same stored bytes, the same dequantised bits.

Where bitsandbytes' CPU path departs from its own flat-block format (a dequantiser that
reads blocks per row, an approximate 8-bit search, a division in the last short block),
the departure is pinned down by a test of its own and the others compare around it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default import ops as bnb_default  # noqa: E402

from lorakern.quant import (  # noqa: E402
    QuantizedWeight,
    code_book,
    dequantize_weight,
    dynamic_code_book,
    quantize_weight,
)

ROOT = Path(__file__).resolve().parent.parent
QUANT_TYPES = ("nf4", "fp4")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (shape, blocksize): blocks aligned with rows, across rows, a short last block, odd numel
# (a pad nibble), K odd, K % 16 != 0, one block larger than the weight.
CASES = [
    ((64, 128), 64),
    ((8, 96), 64),
    ((33, 96), 128),
    ((5, 33), 32),
    ((7, 250), 128),
    ((3, 100), 256),
    ((16, 1000), 4096),
]
CASE_IDS = [f"{n}x{k}-bs{bs}" for (n, k), bs in CASES]
# bitsandbytes' CPU 8-bit lookup is approximate: its pick may be this much (in units of
# the block's absmax) farther from the value than the nearest code. Observed max 3.03e-5.
BNB_8BIT_SLACK = 4e-5

# bitsandbytes' pure-torch 4-bit dequantiser, past its torch.compile wrapper.
default_dequantize_4bit = getattr(
    bnb_default._dequantize_4bit_compute, "__wrapped__", bnb_default._dequantize_4bit_compute
)


@pytest.fixture(autouse=True, scope="module")
def _eager():
    """bitsandbytes sends odd-K dequantisation through torch.compile; eager is the same
    computation, without a compile per shape."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


# ----------------------------------------------------------------------------- helpers


def unpack(data: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit indices of packed data (element 2i in the high nibble)."""
    d = data.reshape(-1)
    return torch.stack((d >> 4, d & 0xF), dim=1).reshape(-1)[:n]


def bnb_quantize(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool = False):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)


def from_bnb(data: torch.Tensor, st) -> QuantizedWeight:
    """A QuantizedWeight over bitsandbytes' packed data and QuantState."""
    nested = {}
    if st.nested:
        nested = dict(
            offset=st.offset, nested_absmax=st.state2.absmax, nested_code=st.state2.code,
            nested_blocksize=st.state2.blocksize,
        )
    return QuantizedWeight(data, st.quant_type, tuple(st.shape), st.dtype, st.absmax, st.blocksize, st.code, **nested)


def to_bnb(qw: QuantizedWeight, dtype: torch.dtype | None = None):
    """A bitsandbytes QuantState over lorakern's tensors."""
    state2 = None
    if qw.double_quant:
        state2 = F.QuantState(
            absmax=qw.nested_absmax, code=qw.nested_code, blocksize=qw.nested_blocksize, dtype=torch.float32
        )
    return F.QuantState(
        absmax=qw.absmax, shape=torch.Size(qw.shape), code=qw.code, blocksize=qw.blocksize,
        quant_type=qw.quant_type, dtype=dtype or qw.dtype, offset=qw.offset, state2=state2,
    )


def bnb_cpu_reads_flat_blocks(shape, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU dequantize_4bit is right for this shape: its AVX-512 path
    (taken when K % 16 == 0) reads blocks per row (test_bnb_cpu_dequantize_reads_blocks_per_row)."""
    k = shape[-1]
    return k % blocksize == 0 or k % 16 != 0


def bnb_dequantize(data: torch.Tensor, st) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit; its default implementation where the CPU one misreads."""
    if bnb_cpu_reads_flat_blocks(st.shape, st.blocksize):
        return F.dequantize_4bit(data, st)
    absmax = st.absmax
    if st.nested:
        absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    return default_dequantize_4bit(data.reshape(-1), absmax, st.code, st.blocksize, st.shape, st.dtype)


def short_block_ties(w: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """bool [numel]: elements of the last, short block that bitsandbytes (x / absmax there)
    and lorakern (x · (1/absmax)) round to different codes: exact ties, bf16/fp16 inputs."""
    x = w.reshape(-1).float()
    full = x.numel() - x.numel() % blocksize
    ties = torch.zeros(x.numel(), dtype=torch.bool)
    if full < x.numel():
        tail = x[full:]
        am = tail.abs().max().clamp(min=1e-38)
        code = code_book(quant_type).sort().values
        mids = (code[:-1] + code[1:]) / 2
        ties[full:] = torch.bucketize((tail / am).clamp(-1, 1), mids) != torch.bucketize(
            (tail * (1.0 / am)).clamp(-1, 1), mids
        )
    return ties


def assert_double_quant_matches(st, qw: QuantizedWeight, absmax: torch.Tensor) -> None:
    """qw's double quantisation of the fp32 `absmax` against bitsandbytes' state `st`.

    offset and nested absmax: equal. 8-bit indices: lorakern's is the nearest code;
    bitsandbytes' CPU search may pick a farther one (rarely: ~0.1-1.5% of the entries,
    sometimes 2 indices off), at most BNB_8BIT_SLACK farther (1e-7: fp32 rounding).
    """
    assert torch.equal(qw.offset, st.offset)
    assert torch.equal(qw.nested_absmax, st.state2.absmax)
    assert torch.equal(qw.nested_code, st.state2.code)
    assert qw.nested_blocksize == st.state2.blocksize == 256
    scale = qw.nested_absmax.repeat_interleave(256)[: absmax.numel()]
    v = ((absmax - qw.offset) * (1.0 / scale)).double()
    code = qw.nested_code.double()
    ours, theirs = qw.absmax.long(), st.absmax.long()
    d_ours, d_theirs = (v - code[ours]).abs(), (v - code[theirs]).abs()
    nearest = (v[:, None] - code[None, :]).abs().min(dim=1).values
    assert (d_ours <= nearest + 1e-7).all(), "lorakern's 8-bit index is not the nearest code"
    differ = ours != theirs
    count = int(differ.sum())
    assert count <= max(4, 0.02 * differ.numel()), f"{count} of {differ.numel()} 8-bit indices differ"
    gap = d_theirs[differ] - d_ours[differ]
    assert (gap >= -1e-7).all() and (gap <= BNB_8BIT_SLACK).all(), gap


# ----------------------------------------------------------------------------- code books


def test_dynamic_code_book_matches_bnb():
    assert torch.equal(dynamic_code_book(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_code_book_matches_bnb(quant_type):
    assert torch.equal(code_book(quant_type), F.get_4bit_type(quant_type, device="cpu"))


# ----------------------------------------------------------------------------- 4-bit quantize


@pytest.mark.parametrize(("shape", "blocksize"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_matches_bnb(quant_type, dtype, shape, blocksize):
    w = torch.randn(shape).to(dtype)
    qw = quantize_weight(w, quant_type, blocksize)
    data, st = bnb_quantize(w, quant_type, blocksize)
    assert qw.data.shape == data.shape and qw.data.dtype == data.dtype == torch.uint8
    assert torch.equal(qw.absmax, st.absmax)
    assert torch.equal(qw.code, st.code)
    n = w.numel()
    ours, theirs = unpack(qw.data, n + 1), unpack(data, n + 1)
    ties = short_block_ties(w, quant_type, blocksize)
    assert torch.equal(ours[:n][~ties], theirs[:n][~ties])
    if n % 2:  # the pad nibble: the index of 0.0
        zero = int((code_book(quant_type) == 0).nonzero()[0])
        assert ours[n] == theirs[n] == zero


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_zero_block_matches_bnb(quant_type):
    w = torch.randn(6, 64)
    w[2] = 0.0
    qw = quantize_weight(w, quant_type, 64)
    data, st = bnb_quantize(w, quant_type, 64)
    assert torch.equal(qw.data, data) and torch.equal(qw.absmax, st.absmax)
    assert (dequantize_weight(qw)[2] == 0).all()


# Two bf16 values whose ratio, -5/24, is the midpoint of FP4's -1/4 and -1/6: 2.8125 then
# -0.5859375, 32 times (one full block of 64) and once more (a short block of 2).
TIE = torch.tensor([[2.8125, -0.5859375] * 33], dtype=torch.bfloat16)


def test_bnb_short_block_divides():
    """bitsandbytes' CPU quantize_4bit scales a full block by x · (1/absmax) but the last,
    short one by x / absmax (its CUDA kernel: x · (1/absmax) everywhere), so the same tie
    rounds one way in a full block and the other way in the short block."""
    data, _ = bnb_quantize(TIE, "fp4", 64)
    q = unpack(data, TIE.numel())
    assert q[1] == 15 and q[65] == 14  # FP4 indices of -1/4 and -1/6
    assert short_block_ties(TIE, "fp4", 64).nonzero().view(-1).tolist() == [65]
    assert (TIE[0, 1].float() / 2.8125) != (TIE[0, 1].float() * (1.0 / torch.tensor(2.8125)))


def test_short_block_follows_the_full_block_rule():
    """lorakern scales every block by x · (1/absmax), as bitsandbytes' CUDA kernel does: the
    tie rounds the same way in the short block as in the full one (bnb's CPU path differs
    only there, see above)."""
    q = unpack(quantize_weight(TIE, "fp4", 64).data, TIE.numel())
    assert q[1] == q[65] == 15


# ----------------------------------------------------------------------------- 4-bit dequantize


@pytest.mark.parametrize(("shape", "blocksize"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bnb_quantize_our_dequantize(quant_type, dtype, double_quant, shape, blocksize):
    w = torch.randn(shape).to(dtype)
    data, st = bnb_quantize(w, quant_type, blocksize, double_quant)
    out = dequantize_weight(from_bnb(data, st))
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, bnb_dequantize(data, st))


@pytest.mark.parametrize(("shape", "blocksize"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_our_quantize_bnb_dequantize(quant_type, dtype, double_quant, shape, blocksize):
    w = torch.randn(shape).to(dtype)
    qw = quantize_weight(w, quant_type, blocksize, double_quant)
    assert torch.equal(dequantize_weight(qw), bnb_dequantize(qw.data, to_bnb(qw)))
    # another compute dtype: fp32 math, one cast, as bitsandbytes
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    assert torch.equal(dequantize_weight(qw, other), bnb_dequantize(qw.data, to_bnb(qw, other)))


@pytest.mark.parametrize(
    ("shape", "blocksize"), [((8, 96), 64), ((6, 64), 128), ((4, 128), 256)],
    ids=["8x96-bs64", "6x64-bs128", "4x128-bs256"],
)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bnb_cpu_dequantize_reads_blocks_per_row(quant_type, shape, blocksize):
    """bitsandbytes' CPU dequantize_4bit, on its AVX-512 path (K % 16 == 0), takes element
    (r, c)'s absmax as absmax[r · (K // blocksize) + c // blocksize]: right only when
    blocksize divides K. Its quantizer (and CUDA) use flat blocks, as lorakern does;
    lorakern equals bitsandbytes' default (pure torch) dequantiser."""
    n, k = shape
    w = torch.randn(shape)
    qw = quantize_weight(w, quant_type, blocksize)
    data, st = bnb_quantize(w, quant_type, blocksize)
    ours = dequantize_weight(qw)
    default = default_dequantize_4bit(data.reshape(-1), st.absmax, st.code, blocksize, st.shape, st.dtype)
    assert torch.equal(ours, default)
    q = unpack(data, w.numel()).view(n, k).long()
    per_row = torch.arange(n)[:, None] * (k // blocksize) + torch.arange(k)[None, :] // blocksize
    misread = st.code[q] * st.absmax[per_row]
    assert not torch.equal(misread, ours)
    theirs = F.dequantize_4bit(data, st)
    if not torch.equal(theirs, ours):  # the AVX-512 path (its scalar path reads flat blocks)
        assert torch.equal(theirs, misread)


# ----------------------------------------------------------------------------- double quantisation


@pytest.mark.parametrize(("shape", "blocksize"), [((256, 1024), 64), ((100, 1000), 64), ((96, 2048), 128)],
                         ids=["256x1024-bs64", "100x1000-bs64", "96x2048-bs128"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_double_quant_matches_bnb(quant_type, shape, blocksize):
    w = torch.randn(shape)
    qw = quantize_weight(w, quant_type, blocksize, double_quant=True)
    data, st = bnb_quantize(w, quant_type, blocksize, double_quant=True)
    assert torch.equal(qw.data, data)
    absmax = quantize_weight(w, quant_type, blocksize).absmax
    assert_double_quant_matches(st, qw, absmax)
    assert torch.equal(dequantize_weight(qw), bnb_dequantize(qw.data, to_bnb(qw)))


def test_bits_per_parameter():
    w = torch.randn(4096, 4096)
    assert quantize_weight(w, "nf4", 64, double_quant=True).bits_per_parameter() <= 4.13  # QLoRA: 4.127
    assert quantize_weight(torch.randn(256, 512), "nf4", 64).bits_per_parameter() == 4.5


# ----------------------------------------------------------------------------- int8


@pytest.mark.parametrize("shape", [(64, 128), (7, 33)], ids=["64x128", "7x33"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_int8_matches_bnb(dtype, shape):
    w = torch.randn(shape).to(dtype)
    w[3] = 0.0  # a zero row
    qw = quantize_weight(w, "int8")
    cb, scb = F.int8_vectorwise_quant(w.clone())[:2]
    assert torch.equal(qw.data, cb) and torch.equal(qw.absmax, scb)
    assert torch.equal(dequantize_weight(qw), F.int8_vectorwise_dequant(cb, scb).to(dtype))
    assert torch.equal(dequantize_weight(qw, torch.float32), F.int8_vectorwise_dequant(cb, scb))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("weight", "kwargs", "error", "match"),
    [
        (torch.randn(4, 64), dict(quant_type="int4"), ValueError, "quant_type must be one of"),
        (torch.randn(4, 64), dict(blocksize=48), ValueError, "blocksize must be one of"),
        (torch.randn(4, 64), dict(quant_type="int8", double_quant=True), ValueError, "4-bit formats only"),
        (torch.randn(64), {}, ValueError, r"2-D weight \[N, K\], got shape \(64,\)"),
        (torch.randn(2, 4, 64), {}, ValueError, r"2-D weight \[N, K\], got shape \(2, 4, 64\)"),
        (torch.ones(4, 64, dtype=torch.int32), {}, TypeError, "float32, float16 and bfloat16.*torch.int32"),
        (torch.ones(4, 64, dtype=torch.float64), {}, TypeError, "got torch.float64"),
        (torch.full((4, 64), float("inf")), {}, ValueError, "inf or NaN"),
        (torch.full((4, 64), float("nan")), dict(quant_type="int8"), ValueError, "inf or NaN"),
    ],
    ids=["quant-type", "blocksize", "int8-double-quant", "1-d", "3-d", "int-dtype", "float64", "inf", "nan"],
)
def test_quantize_errors(weight, kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_weight(weight, **kwargs)


def test_code_book_error():
    with pytest.raises(ValueError, match="'nf4' or 'fp4', got 'int8'"):
        code_book("int8")


# ----------------------------------------------------------------------------- bnb Linear4bit


def linear4bit(lin: torch.nn.Linear, quant_type: str, double_quant: bool, compute_dtype=torch.float32):
    """A bitsandbytes Linear4bit holding lin's weights, quantised on CPU (Params4bit
    quantises on its first move to a device)."""
    layer = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=True, compute_dtype=compute_dtype,
        quant_type=quant_type, compress_statistics=double_quant,
    )
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")
    assert layer.weight.bnb_quantized
    return layer


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["compute-fp32", "compute-bf16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_linear4bit_matches(quant_type, double_quant, compute_dtype):
    lin = torch.nn.Linear(192, 64)
    layer = linear4bit(lin, quant_type, double_quant, compute_dtype)
    st = layer.weight.quant_state
    assert not getattr(st, "packing_format_for_cpu", False)
    assert st.blocksize == 64 and tuple(st.shape) == (64, 192) and st.dtype == torch.float32
    w = lin.weight.detach()
    qw = quantize_weight(w, quant_type, 64, double_quant)
    assert torch.equal(layer.weight.data, qw.data)
    if double_quant:
        assert_double_quant_matches(st, qw, quantize_weight(w, quant_type, 64).absmax)
    else:
        assert torch.equal(st.absmax, qw.absmax)
    assert torch.equal(dequantize_weight(from_bnb(layer.weight.data, st)), bnb_dequantize(layer.weight.data, st))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_params4bit_bf16_matches(quant_type):
    w = torch.randn(32, 256, dtype=torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, blocksize=128, compress_statistics=False)
    p = p.to("cpu")
    qw = quantize_weight(w, quant_type, 128)
    assert torch.equal(p.data, qw.data) and torch.equal(p.quant_state.absmax, qw.absmax)
    assert p.quant_state.dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_linear4bit_cpu_forward_repacks(quant_type):
    """bitsandbytes repacks a Linear4bit's weight into a private CPU layout the first time
    it runs in eval mode without grad (packing_format_for_cpu): data [N, K/2] in another
    order, absmax bf16 [K/blocksize, N]. lorakern must read the state from before, or undo
    it (_convert_weight_packed_for_cpu_inverse): the data comes back exactly, the absmax
    only to bf16 precision."""
    if not F.has_avx512bf16():
        pytest.skip("bitsandbytes repacks only where the CPU has AVX512-BF16")
    lin = torch.nn.Linear(128, 64)
    layer = linear4bit(lin, quant_type, double_quant=False).eval()
    qw = quantize_weight(lin.weight.detach(), quant_type, 64)
    with torch.no_grad():
        layer(torch.randn(2, 128))
    st = layer.weight.quant_state
    assert st.packing_format_for_cpu
    assert layer.weight.data.shape == (64, 64) and not torch.equal(layer.weight.data.reshape(-1), qw.data.reshape(-1))
    assert st.absmax.dtype == torch.bfloat16 and st.absmax.shape == (2, 64)
    data, st = F._convert_weight_packed_for_cpu_inverse(layer.weight.data, st)
    assert torch.equal(data, qw.data)
    assert torch.equal(st.absmax.T.reshape(-1), qw.absmax.to(torch.bfloat16))


# ----------------------------------------------------------------------------- import pitfall


def test_repo_kernels_folder_is_not_the_kernels_package():
    """The kernels live in lorakern/kernels/, importable only as lorakern.kernels: a
    top-level kernels/ folder in the repo would answer a bare `import kernels` whenever the
    repo root is on sys.path (`python -m ...` from a checkout), shadowing the Hugging Face
    kernels package that bitsandbytes and transformers probe for."""
    assert not (ROOT / "kernels").exists()
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        places = [spec.origin, *(spec.submodule_search_locations or [])]
        assert not any(p and Path(p).resolve().is_relative_to(ROOT) for p in places), places
    ours = importlib.util.find_spec("lorakern.kernels")
    assert Path(ours.origin).resolve().is_relative_to(ROOT / "lorakern" / "kernels")
