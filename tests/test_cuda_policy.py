"""The one CUDA dispatch policy (csrc/cuda_policy.h), asked through the bindings: which path the
quantized products and the adapter products take. Pure host logic: runs without a GPU."""
from __future__ import annotations

import pytest

from lowtune import _C

BF16, F32 = 2, 0


@pytest.mark.parametrize("m,forward,input_grad", [
    (1, "staged", "staged"), (16, "staged", "staged"), (17, "direct", "cublas"), (32, "direct", "cublas"),
    (33, "cublas", "cublas"), (4096, "cublas", "cublas")])
def test_default_paths_by_rows(m, forward, input_grad, monkeypatch):
    monkeypatch.delenv("LOWTUNE_CUDA_PATH", raising=False)
    monkeypatch.delenv("LOWTUNE_CUDA_SMALL_M", raising=False)
    assert _C.cuda_path("forward", m, BF16, True) == forward
    assert _C.cuda_path("input_grad", m, BF16, True) == input_grad


def test_fp32_and_misaligned_operands(monkeypatch):
    monkeypatch.delenv("LOWTUNE_CUDA_PATH", raising=False)
    assert _C.cuda_path("forward", 1, F32, True) == "cublas"
    assert _C.cuda_path("forward", 1, BF16, False) == "cublas"  # the direct forward needs an aligned x too
    assert _C.cuda_path("input_grad", 1, BF16, False) == "direct"


def test_knobs_force_a_path_where_it_applies(monkeypatch):
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "direct")
    assert _C.cuda_path("forward", 8, BF16, True) == "direct"
    assert _C.cuda_path("forward", 64, BF16, True) == "cublas"  # direct cannot take 64 rows
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "cublas")
    assert _C.cuda_path("input_grad", 1, BF16, True) == "cublas"
    monkeypatch.delenv("LOWTUNE_CUDA_PATH")
    monkeypatch.setenv("LOWTUNE_CUDA_SMALL_M", "0")
    assert _C.cuda_path("forward", 1, BF16, True) == "cublas"


def test_adapter_products_switch_to_cublas_at_64_rows():
    assert _C.cuda_path("adapter", 63, BF16, True) == "fused"
    assert _C.cuda_path("adapter", 64, BF16, True) == "cublas"


def test_unknown_product_is_an_error():
    with pytest.raises(ValueError, match="forward, input_grad or adapter"):
        _C.cuda_path("backward", 1, BF16, True)


def test_one_row_forwards_take_the_gemv_kernel(monkeypatch):
    """At every N and K, for every type with a gemv kernel (all but the I-quants)."""
    monkeypatch.delenv("LOWTUNE_CUDA_PATH", raising=False)
    monkeypatch.delenv("LOWTUNE_CUDA_SMALL_M", raising=False)
    q4k, n, k = 12, 14336, 4096
    for t in (q4k, 2, 3, 8, 1040, 1041, 1042, 1082):  # Q4_K, Q4_0, Q4_1, Q8_0, INT4-g32/64/128, INT8-g128
        for shape in ((n, k), (4096, k), (4096, 11008), (4096, 14336), (6144, 14336)):
            assert _C.cuda_path("forward", 1, BF16, True, *shape, t) == "gemv"
    assert _C.cuda_path("forward", 2, BF16, True, n, k, q4k) == "staged"
    # its transpose (gemv_grad.cuh) by default for the table types and Q2_K-Q5_K only (the staged kernel
    # was timed faster for the other types with codes)
    assert _C.cuda_path("input_grad", 1, BF16, True, n, k, 2) == "staged"
    assert [t for t in (2, 3, 6, 8, 10, 11, 12, 13, 14, 20, 21, 23, 39, 1020, 1021, 1041, 1080, 1081)
            if _C.cuda_path("input_grad", 1, BF16, True, n, k, t) == "gemv"] == [10, 11, 12, 13, 20, 21, 23, 39]
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "gemv")
    assert _C.cuda_path("input_grad", 1, BF16, True, n, k, 2) == "gemv"  # any type with codes when forced
    monkeypatch.delenv("LOWTUNE_CUDA_PATH")
    assert _C.cuda_path("input_grad", 2, BF16, True, n, k, q4k) == "staged"
    # the M <= 16 forward with W in registers (small_m_regs.cuh): by default for Q6_K from M = 8, any type
    # with codes when forced, forward only
    assert [_C.cuda_path("forward", m, BF16, True, 4096, 14336, 14) for m in (1, 4, 7, 8, 16, 17)] == \
        ["gemv", "staged", "staged", "regs", "regs", "direct"]
    assert _C.cuda_path("forward", 8, BF16, True, n, k, q4k) == "staged"
    assert _C.cuda_path("input_grad", 8, BF16, True, n, k, 14) == "staged"
    assert _C.cuda_path("forward", 8, F32, True, n, k, 14) == "cublas"  # fp32 activations: no small-M kernel
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "regs")
    assert [_C.cuda_path("forward", m, BF16, True, n, k, q4k) for m in (1, 5, 16, 17)] == ["regs"] * 3 + ["direct"]
    assert _C.cuda_path("input_grad", 5, BF16, True, n, k, q4k) == "staged"
    assert _C.cuda_path("forward", 5, BF16, True, n, k, 21) == "regs"  # IQ3_S: its grid's codes
    assert _C.cuda_path("forward", 5, BF16, True, n, k, 23) == "regs"  # IQ4_XS: its table's codes
    monkeypatch.delenv("LOWTUNE_CUDA_PATH")
    assert _C.cuda_path("forward", 5, BF16, True, n, k, q4k) == "staged"
    assert [_C.cuda_path("forward", 1, BF16, True, n, k, t) for t in (20, 21, 23, 39)] == ["gemv"] * 4  # codes
    assert _C.cuda_path("forward", 1, BF16, True, 4096, 14336, 14) == "gemv"  # Q6_K
    assert all(_C.cuda_has_gemv(t)
               for t in (2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 20, 23, 29, 39, 40, 1020, 1041, 1082))
    assert not _C.cuda_has_gemv(0) and not _C.cuda_has_gemv(1)  # F32, F16: no quantized type
    assert _C.cuda_path("forward", 1, F32, True, n, k, q4k) == "cublas"
    assert _C.cuda_path("forward", 1, BF16, False, n, k, q4k) == "cublas"
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "staged")
    assert _C.cuda_path("forward", 1, BF16, True, n, k, q4k) == "staged"
    monkeypatch.setenv("LOWTUNE_CUDA_PATH", "gemv")
    assert _C.cuda_path("forward", 1, BF16, True, 4096, 14336, 2) == "gemv"  # forced: any N and K
    assert _C.cuda_path("forward", 4, BF16, True, n, k, q4k) == "staged"  # forced where it cannot apply


def test_one_row_products_of_the_types_whose_codes_came_last(monkeypatch):
    """The grid I-quants, NVFP4 and the ternary/binary types: the forward at M = 1 takes gemv at every shape;
    the input gradient takes gemv_grad where it was timed faster than the staged kernel, staged elsewhere."""
    monkeypatch.delenv("LOWTUNE_CUDA_PATH", raising=False)
    monkeypatch.delenv("LOWTUNE_CUDA_SMALL_M", raising=False)
    grad_gemv = {16: "IQ2_XXS", 17: "IQ2_XS", 22: "IQ2_S", 18: "IQ3_XXS", 21: "IQ3_S", 29: "IQ1_M", 41: "Q1_0",
                 40: "NVFP4"}
    grad_staged = {19: "IQ1_S", 34: "TQ1_0", 35: "TQ2_0", 42: "Q2_0"}
    for t in (*grad_gemv, *grad_staged):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
            assert _C.cuda_path("forward", 1, BF16, True, n, k, t) == "gemv", (t, n, k)
            assert _C.cuda_path("input_grad", 1, BF16, True, n, k, t) == ("gemv" if t in grad_gemv else "staged")
        assert _C.cuda_path("forward", 2, BF16, True, 4096, 4096, t) == "staged"
        assert _C.cuda_path("forward", 1, BF16, False, 4096, 4096, t) == "cublas"  # x not 16-byte aligned


def test_one_row_gemv_takes_two_rows_a_warp_but_at_long_rows_of_some_types(monkeypatch):
    """cuda_policy::gemv_rows_per_warp: two rows a warp, except where every warp would own a row
    (one_row) of more than 4096 columns and the type's two-row kernel was timed slower there."""
    monkeypatch.delenv("LOWTUNE_CUDA_GEMV_ROWS", raising=False)
    q4_0, q4_k, q5_0, q8_0, int2_g64, int4_g32, int4_g128 = 2, 12, 6, 8, 1021, 1040, 1042
    for t in (q4_0, q5_0, int4_g32, int4_g128):
        assert [_C.cuda_gemv_rows(t, one, k) for one, k in ((True, 14336), (True, 4096), (False, 14336))] == [1, 2, 2]
    for t in (q4_k, q8_0, int2_g64):
        assert _C.cuda_gemv_rows(t, True, 14336) == 2
    monkeypatch.setenv("LOWTUNE_CUDA_GEMV_ROWS", "1")
    assert _C.cuda_gemv_rows(q4_k, False, 4096) == 1
    monkeypatch.setenv("LOWTUNE_CUDA_GEMV_ROWS", "2")
    assert _C.cuda_gemv_rows(q4_0, True, 14336) == 2


def test_one_row_gemv_splits_long_rows_over_a_cluster_where_every_warp_takes_one_task(monkeypatch):
    """cuda_policy::gemv_split_k: two CTAs a cluster split K where the split fits in one pass of the
    resident warps and rows are longer than 4096; the knob forces it where it fits; one row a warp
    forced turns it off (the split runs the two-row kernel)."""
    for var in ("LOWTUNE_CUDA_GEMV_SPLIT", "LOWTUNE_CUDA_GEMV_ROWS"):
        monkeypatch.delenv(var, raising=False)
    assert [_C.cuda_gemv_split(k, fits) for k, fits in ((14336, True), (4096, True), (14336, False))] == [2, 1, 1]
    monkeypatch.setenv("LOWTUNE_CUDA_GEMV_SPLIT", "2")
    assert [_C.cuda_gemv_split(4096, True), _C.cuda_gemv_split(4096, False)] == [2, 1]
    monkeypatch.setenv("LOWTUNE_CUDA_GEMV_SPLIT", "1")
    assert _C.cuda_gemv_split(14336, True) == 1
    monkeypatch.setenv("LOWTUNE_CUDA_GEMV_SPLIT", "2")
    monkeypatch.setenv("LOWTUNE_CUDA_GEMV_ROWS", "1")
    assert _C.cuda_gemv_split(14336, True) == 1


def test_the_streamed_gemv_takes_long_rows_of_4096_row_products_and_wide_5_and_6_bit_ones(monkeypatch):
    """cuda_policy::gemv_stream_ctas: two CTAs an SM for N <= 4096, K >= 14336 of the types timed faster
    so, three for Q5_K, Q6_K and Q5_0 with N > 4096, K <= 4096, the register kernels elsewhere and
    where their rows or split are forced; the knob forces a count (0..3, clamped) for every type and
    shape."""
    monkeypatch.delenv("LOWTUNE_CUDA_GEMV_STREAM", raising=False)
    q4_0, q4_k, q5_0, q6_k, q8_0, int4_g64, int8_g32 = 2, 12, 6, 14, 8, 1041, 1080
    for t in (q4_0, q6_k, q8_0, int4_g64, int8_g32):
        assert [_C.cuda_gemv_stream(t, n, k) for n, k in ((4096, 14336), (4096, 11008), (14336, 14336))] == [2, 0, 0]
    assert _C.cuda_gemv_stream(q4_k, 4096, 14336) == 0
    for t in (q6_k, q5_0):
        assert [_C.cuda_gemv_stream(t, n, k) for n, k in ((14336, 4096), (4096, 4096), (14336, 8192))] == [3, 0, 0]
    assert _C.cuda_gemv_stream(q4_0, 14336, 4096) == 0
    for value, want in (("1", 1), ("3", 3), ("7", 3), ("0", 0), ("-3", 0)):
        monkeypatch.setenv("LOWTUNE_CUDA_GEMV_STREAM", value)
        assert _C.cuda_gemv_stream(q4_k, 4096, 4096) == want
    monkeypatch.setenv("LOWTUNE_CUDA_GEMV_STREAM", "0")
    assert _C.cuda_gemv_stream(q6_k, 14336, 4096) == 0
    monkeypatch.delenv("LOWTUNE_CUDA_GEMV_STREAM")
    for knob in ("LOWTUNE_CUDA_GEMV_ROWS", "LOWTUNE_CUDA_GEMV_SPLIT"):  # a register kernel forced
        monkeypatch.setenv(knob, "2")
        assert _C.cuda_gemv_stream(q6_k, 14336, 4096) == 0
        monkeypatch.delenv(knob)


def test_the_staged_kernels_split_into_whole_waves_and_decode_bound_types_into_four(monkeypatch):
    """cuda_policy::staged_stages_per_split: as many splits as one wave of resident CTAs holds (never a
    partial second wave), the forward of Q2_K, Q3_K and Q6_K into four waves, the input gradient at least
    its ring's depth a split; LOWTUNE_CUDA_STAGED_WAVES=0 rounds the splits up as before, and
    LOWTUNE_CUDA_STAGED_SPLITS forces a count."""
    for var in ("LOWTUNE_CUDA_STAGED_WAVES", "LOWTUNE_CUDA_STAGED_SPLITS"):
        monkeypatch.delenv(var, raising=False)
    q2_k, q4_k, q6_k, q8_0 = 10, 12, 14, 8
    split = _C.cuda_staged_split
    # 112 tiles of a 14336-row weight, 16 stages, 2 x 132 slots: 2 splits of 8 (3 of 6 would need 336 slots)
    assert split(q4_k, "forward", 112, 16, 264, 1) == 8
    assert split(q8_0, "forward", 32, 56, 132, 1) == 14  # 4 splits, 128 CTAs (5 would be 160)
    assert split(q2_k, "forward", 112, 16, 264, 1) == 2  # four waves: 9 splits asked, 8 of 2
    assert split(11, "forward", 112, 16, 264, 1) == 2  # Q3_K too
    assert split(q2_k, "input_grad", 112, 16, 264, 1) == 8  # but one wave for its input gradient
    assert split(q6_k, "forward", 32, 16, 264, 1) == 1
    assert split(q6_k, "input_grad", 16, 64, 528, 4) == 4  # 33 splits of 2 asked, a ring's depth kept
    assert split(q4_k, "input_grad", 56, 64, 528, 4) == 8
    assert split(q4_k, "forward", 300, 16, 264, 1) == 16  # the tiles alone fill the slots: no split
    assert split(q4_k, "input_grad", 16, 3, 528, 4) == 3  # never more than the stages
    monkeypatch.setenv("LOWTUNE_CUDA_STAGED_WAVES", "0")
    assert split(q4_k, "forward", 112, 16, 264, 1) == 6
    assert split(q8_0, "forward", 32, 56, 132, 1) == 12
    assert split(q4_k, "input_grad", 16, 64, 528, 4) == 2
    monkeypatch.setenv("LOWTUNE_CUDA_STAGED_WAVES", "2")
    assert split(q4_k, "forward", 112, 16, 264, 1) == 4
    monkeypatch.setenv("LOWTUNE_CUDA_STAGED_SPLITS", "3")
    assert split(q4_k, "forward", 112, 16, 264, 1) == 6
    assert split(q4_k, "input_grad", 16, 2, 528, 4) == 1  # three splits of two stages: two of one
    assert split(q4_k, "forward", 1, 200000, 1, 1) == 66667
    monkeypatch.setenv("LOWTUNE_CUDA_STAGED_SPLITS", "100000")
    assert split(q4_k, "forward", 1, 200000, 1, 1) == 4  # gridDim.y's limit: at most 65535 splits
