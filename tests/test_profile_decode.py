"""perf/profile_decode.py's kernel groups: the project's Triton kernels by their function names,
cuBLAS's split-K GEMV templates as cuBLAS, and the peers' kernels by theirs."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))

from profile_decode import group_of  # noqa: E402


@pytest.mark.parametrize("name, group", [
    ("_w4a4_splitk_kernel", "zq w4a4 gemm"),
    ("_w4a4_gemm_kernel", "zq w4a4 gemm"),
    ("_mosaic_splitk_kernel", "zq mosaic"),
    ("_high_ell_kernel", "zq zipper high"),
    ("_quantize_activations_kernel", "zq act quant"),
    ("_w4a16_splitk_kernel", "zq w4a16"),
    ("_fp8_rowwise_cast_kernel", "fp8 cast"),
    ("nvjet_sm90_hsh_128x8_64x12_2x1_v_bz_splitK_TNT", "cublas gemm / gemv"),
    ("nvjet_sm90_qqtst_128x128_128x6_4x1_v_bz_ovscale_TNT", "cublas gemm / gemv"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __half>", "cublas gemm / gemv"),
    ("void at::native::tinygemm_m16n8k16_chunk_kernel<at::native::ALayout_RM>", "int4 tinygemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "attention"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::Half>>", "norm / rotary / elementwise"),
    ("some_unknown_kernel", "other"),
])
def test_group_of(name, group):
    assert group_of(name) == group
