// The narrow line between kernels and Python: raw pointers, explicit sizes, a stream.
// No torch or pybind11 types here. Every CPU entry point has a CUDA twin with the same
// arguments plus a stream; errors are thrown as std::invalid_argument / std::runtime_error.
//
// Shapes (row-major, contiguous):
//   w      [N, K] logical weight; blocks run along K, N rows of K/elems_per_block blocks
//   x      [M, K] activations, dy [M, N] output gradient
//   y      [M, N] = x · deq(w)ᵀ           (same dtype as x, fp32 accumulation)
//   dx     [M, K] = dy · deq(w)           (same dtype as dy, fp32 accumulation)
#pragma once
#include <cstdint>
#include <vector>

namespace lowtune {

struct BlockInfo { int elems; int bytes; };
// Block geometry of a type id; throws std::invalid_argument for an unknown id.
BlockInfo block_info(int qtype);
// Every type id the kernels take (the type list of blocks.h), in list order.
std::vector<int> type_ids();

namespace cpu {
// Number of threads the CPU kernels use (0 = the default: torch's count where built with
// OpenMP, else the hardware's), and how they run: "openmp" (one team with torch) or "threads".
void set_num_threads(int n);
int num_threads();
const char* threading_backend();
// The vector instruction set the CPU kernels were compiled for: "avx512", "avx2" or "generic".
const char* simd_isa();

void quantize(int qtype, const float* w, void* blocks, int64_t n, int64_t k);
void dequantize(int qtype, const void* blocks, void* out, int out_dtype, int64_t n, int64_t k);
void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y,
                     int64_t m, int64_t n, int64_t k);
void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx,
                        int64_t m, int64_t n, int64_t k);
// The simple loops the fast kernels above are tested against (same arguments, same results up
// to float32 summation order).
void qmatmul_forward_reference(int qtype, const void* x, int dtype, const void* w, void* y,
                               int64_t m, int64_t n, int64_t k);
void qmatmul_input_grad_reference(int qtype, const void* dy, int dtype, const void* w, void* dx,
                                  int64_t m, int64_t n, int64_t k);
}  // namespace cpu

namespace cuda {
bool available();  // compiled in and a device is visible
// GPU memory the extension holds outside PyTorch's allocator, on the current device (bytes).
struct MemoryStats {
  int64_t scratch_pool_reserved = 0;       // the scratch pool (products outside graph capture)
  int64_t scratch_pool_reserved_high = 0;  // its high-water mark
  int64_t capture_arena_reserved = 0;      // scratch shared by captured graphs
  int64_t cublas_workspace_bytes = 0;      // cuBLAS workspaces, one per stream used
  int64_t cublas_workspaces = 0;
};
MemoryStats memory_stats();
// Make the scratch pool hold one reservation of `bytes` (kept while LOWTUNE_CUDA_SCRATCH_KEEP_MB
// allows; what it held before is released), so that the products reuse it instead of growing the
// pool piece by piece. Synchronises `stream`.
void scratch_reserve(int64_t bytes, void* stream);
void dequantize(int qtype, const void* blocks, void* out, int out_dtype, int64_t n, int64_t k,
                void* stream);
void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y,
                     int64_t m, int64_t n, int64_t k, void* stream);
void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx,
                        int64_t m, int64_t n, int64_t k, void* stream);
// An update of W inside the large-M products, W' = deq(W) + ΔW, either of rank r: ΔW = scale · Bx · Atᵀ
// with Bx [n][rank] and At [k][rank] in the activation dtype (bf16 or fp16), in the order the kernel reads
// its MMA fragments (lowtune.ops.lowrank_ready: rank zero-padded to a multiple of 16, n to 16 rows, k to 64
// columns), 16-byte aligned; or (bx null) one matrix expanded: ΔW[i][j] = scale / pool ·
// a[i / repeat][j / pool], a fp32 [n / repeat][k / pool]. y = x·W'ᵀ or dx = dy·W' through the chunked
// cuBLAS path, whatever M: each chunk of W' is formed by the dequantization kernel, so the update costs
// no pass over y or dx of its own.
// Or (left given) the update's product added to each chunk's output by a GEMM of its own: y += scale · left ·
// rightᵀ (forward, right [n][rank]) or dx += scale · left · rightᵀ (input gradient, right [k][rank]), left
// [m][rank], both plain row-major in the activation dtype. It runs right after the chunk's GEMM, while that
// slice of y or dx is still in L2, or right before it (cuda_policy::chunk_update_first). A separate pass
// would read and write all of y or dx from memory.
struct LowRankUpdate {
  const void* bx = nullptr;
  const void* at = nullptr;
  int rank = 0;
  float scale = 0.0f;
  const float* a = nullptr;
  int pool = 1, repeat = 1;
  const void* left = nullptr;
  const void* right = nullptr;
};
void qmatmul_forward_lowrank(int qtype, const void* x, int dtype, const void* w, const LowRankUpdate& u, void* y,
                             int64_t m, int64_t n, int64_t k, void* stream);
void qmatmul_input_grad_lowrank(int qtype, const void* dy, int dtype, const void* w, const LowRankUpdate& u,
                                void* dx, int64_t m, int64_t n, int64_t k, void* stream);
// What the one-row product makes its x from while preparing it (glue_kernels.h's formulas, the
// separate kernels' values bit for bit), so that a decode step runs no glue kernel before it:
//   None        x itself
//   AddRmsNorm  rms_norm(x + b) * w, eps, with x + b (rounded to the dtype) written to s; b null:
//               rms_norm(x) * w, s unused (16-byte aligned, K at most 4 * 256 16-byte pieces)
//   SiluMul     silu(x) * b (b: SwiGLU's up product; x its gate product)
struct GemvPrologue {
  enum Kind : int { None, AddRmsNorm, SiluMul };
  Kind kind = None;
  const void* b = nullptr;
  const float* w = nullptr;
  void* s = nullptr;
  float eps = 0.0f;
};
// y = x'·deq(W)ᵀ for one row, x' made by the prologue p inside the M = 1 CUDA-core kernel's
// preparation. Returns false, with nothing launched, where that kernel does not take the call
// (cuda_policy, K, dtype, alignment): the caller then runs the glue kernel and qmatmul_forward.
bool qmatmul_forward_one_row(int qtype, const GemvPrologue& p, const void* x, int dtype, const void* w, void* y,
                             int64_t n, int64_t k, void* stream);
// The slow, obvious CUDA kernels the fast ones are tested against (same signatures).
namespace reference {
void dequantize(int qtype, const void* blocks, void* out, int out_dtype, int64_t n, int64_t k,
                void* stream);
void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y,
                     int64_t m, int64_t n, int64_t k, void* stream);
void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx,
                        int64_t m, int64_t n, int64_t k, void* stream);
}  // namespace reference
}  // namespace cuda

}  // namespace lowtune
