"""The one-launch RMSNorm (`zqkernels.gpu.rmsnorm.rms_norm`) against transformers' own module and a
float64 oracle, and `pipeline.norms.fuse_norms` on LLaMA / Qwen3 models.

The kernel's arithmetic is transformers' (float32 sum of squares, the normalized row rounded to
x's dtype, the weight's product rounded once), in another summation order and with another
reciprocal square root. The bound (`rounding_bound`): the normalized row within two ulps of x's dtype (one
from the float32 reciprocal square root, one from the rounding to x's dtype) plus the float32
sum's own error (a relative (log2 N + 1) 2^-23 for a tree or blocked sum of N squares), scaled by
|weight|, plus one ulp of the output's dtype from the product. Against the float64 oracle of the same
roundings the same bound holds. Hypothesis draws the rows: ties are irrelevant here, the
adversarial cases are all-zero rows (the result is 0: rsqrt(eps) times 0), one huge outlier, tiny
values near the dtype's smallest normal, M = 1 and M = 0, widths that are not powers of two
(subnormal inputs are not drawn). Without a GPU the kernel runs under TRITON_INTERPRET=1.
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from strategies import examples
from zqkernels.gpu.rmsnorm import MAX_HIDDEN, rms_norm, rounding_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def assert_mostly_equal(got, want, x):
    """For fp16 / bf16 rows the bound's slack is rarely used: the float32 differences flip a rounding
    to x's dtype about once in 2^13 elements, so at least 90 % of the outputs whose normalized value
    is a normal number of x's dtype equal transformers' bit for bit (skipping the rounding of the
    normalized row, say, breaks this but not the bound). Subnormal normalized values (a row with one
    huge outlier) are rounded differently by the interpreter's casts and are left to the bound."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return
    x64 = x.double().cpu()
    normed = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-30)
    normal = normed.abs() >= torch.finfo(x.dtype).tiny
    if int(normal.sum()) >= 64:
        frac = float((got.cpu() == want.cpu())[normal].double().mean())
        assert frac >= 0.9, f"only {frac:.3f} of the outputs equal transformers' bit for bit"


def transformers_rmsnorm(x, w, eps):
    """LlamaRMSNorm.forward, written out (transformers 5)."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    return w * (h * torch.rsqrt(var + eps)).to(x.dtype)


def oracle(x, w, eps):
    """float64 math with transformers' two roundings: the normalized row to x's dtype, the product
    to the output's."""
    x64 = x.double()
    normed = (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (w.double() * normed.double()).to(torch.promote_types(w.dtype, x.dtype))


def assert_within_bound(got, want, x, w, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    err = (got.double().cpu() - want.double().cpu()).abs()
    bad = err > rounding_bound(x.cpu(), w.cpu(), want.cpu())
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} outputs beyond the bound, worst error {float(err.max())}"


@st.composite
def rows(draw):
    m = draw(st.sampled_from([0, 1, 2, 3, 7]))
    n = draw(st.sampled_from([1, 3, 16, 100, 128, 257, 1000]))
    dtype = draw(st.sampled_from(DTYPES))
    wdtype = draw(st.sampled_from([dtype, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "zero_row", "outlier", "tiny"]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if m and kind == "zero_row":
        x[0] = 0
    elif m and kind == "outlier":
        x[0, draw(st.integers(0, n - 1))] = 6e4 if dtype == torch.float16 else 1e6
    elif kind == "tiny":  # normal numbers a few times the smallest normal (subnormal inputs are not drawn)
        x = torch.sign(x) * torch.finfo(dtype).tiny * (4 + x.abs())
        x[x == 0] = torch.finfo(dtype).tiny
    w = torch.randn(n, generator=gen) * 2
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.0]))
    return x.to(dtype), w.to(wdtype), eps


@given(rows())
@settings(max_examples=examples(60))
@example((torch.zeros(1, 64, dtype=torch.float16), torch.ones(64, dtype=torch.float16), 1e-6))
@example((torch.full((2, 5), 3.0, dtype=torch.bfloat16), torch.ones(5, dtype=torch.bfloat16), 1e-5))
@example((torch.linspace(-3, 3, 3 * 257).reshape(3, 257).half(), torch.linspace(0.5, 1.5, 257).half(), 1e-6))
def test_rms_norm_is_transformers_within_the_bound(case):
    x, w, eps = case
    if eps == 0.0 and x.numel() and bool((x.float().pow(2).sum(-1) == 0).any()):
        eps = 1e-6  # 0 * rsqrt(0) is NaN on both sides; a law about numbers, not about NaN
    xd, wd = x.to(DEVICE), w.to(DEVICE)
    got = rms_norm(xd, wd, eps).cpu()
    assert_within_bound(got, transformers_rmsnorm(x, w, eps), x, w, "against transformers")
    assert_within_bound(got, oracle(x, w, eps), x, w, "against the float64 oracle")
    assert_mostly_equal(got, transformers_rmsnorm(x, w, eps), x)
    if x.shape[0]:
        zero = (x == 0).all(-1)
        assert bool((got[zero] == 0).all())


def test_rms_norm_keeps_leading_dimensions_and_the_promoted_dtype():
    x = torch.randn(2, 3, 4, 16).half().to(DEVICE)
    w = torch.rand(16).to(DEVICE)
    y = rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert_within_bound(y.cpu(), transformers_rmsnorm(x.cpu(), w.cpu(), 1e-6), x, w, "4-D")


def test_rms_norm_refuses_bad_input():
    x = torch.randn(4, 8).to(DEVICE)
    w = torch.ones(8).to(DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(x, torch.ones(7).to(DEVICE), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="one of"):
        rms_norm(x.to(torch.int32), w, 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(8, 8).to(DEVICE).t(), w, 1e-6)
    with pytest.raises(ValueError, match="exceed"):
        rms_norm(torch.zeros(1, MAX_HIDDEN + 1).to(DEVICE), torch.ones(MAX_HIDDEN + 1).to(DEVICE), 1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        rms_norm(torch.zeros(3, 0).to(DEVICE), torch.ones(0).to(DEVICE), 1e-6)


def _tiny(kind):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    cfg = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen3Config)(**common)
    torch.manual_seed(1)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen3ForCausalLM
    lm = cls(cfg).eval().to(DEVICE)
    for name, p in lm.named_parameters():  # norms' weights away from 1, so a dropped weight shows
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    return lm


@pytest.mark.parametrize("kind, count", [("llama", 5), ("qwen3", 9)])
def test_fuse_norms_replaces_every_norm_and_keeps_the_logits(kind, count):
    from zqkernels.pipeline.norms import FusedRMSNorm, fuse_norms

    lm = _tiny(kind)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        assert fuse_norms(lm) == count  # 2 per layer + the final one; Qwen3 adds q / k norms per layer
        got = lm(input_ids=ids).logits
    assert not [m for m in lm.modules() if type(m).__name__.endswith("RMSNorm") and not isinstance(m, FusedRMSNorm)]
    # float32 model: each norm within the bound of float32, through two layers
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    assert fuse_norms(lm) == count  # a second call finds them fused and replaces nothing


def test_fuse_norms_refuses_a_module_whose_forward_differs(monkeypatch):
    from zqkernels.pipeline import norms

    lm = _tiny("llama")
    norm_cls = type(lm.model.norm)
    monkeypatch.setattr(norm_cls, "forward", lambda self, x: self.weight * x)  # not an RMSNorm any more
    with pytest.raises(ValueError, match="does not reproduce"):
        norms.fuse_norms(lm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(1, 4096), (2048, 4096), (3, 5120), (64, 128)])
def test_llama_rows_compiled(m, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    x = (torch.randn(m, n, generator=gen, device="cuda") * 4).to(dtype)
    x[0, 7] = 900.0
    w = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(dtype)
    got = rms_norm(x, w, 1e-5)
    assert_within_bound(got, transformers_rmsnorm(x, w, 1e-5), x, w, "against transformers on the GPU")
    assert_within_bound(got, oracle(x, w, 1e-5), x, w, "against the float64 oracle")
    assert_mostly_equal(got, transformers_rmsnorm(x, w, 1e-5), x)
