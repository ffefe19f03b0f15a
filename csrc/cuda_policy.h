// Which implementation computes a product on CUDA: the one place that chooses, for lowtune's
// quantized products (forward Y = X·deq(W)ᵀ, input gradient dX = dY·deq(W)) and for the
// adapter products (adapter_kernels.h). Plain C++ (no CUDA headers): the CUDA dispatch
// (cuda/qmatmul_cuda.cu) and the Python layer (through the bindings, lowtune.adapter_ops) ask it.
//
//   staged     the staged small-M kernels (cuda/staged_gemv.cuh): M <= 16, bf16/fp16, operands
//              16-byte aligned
//   direct     the first small-M kernels (cuda/small_m.cuh): forward M <= 32 (X aligned), input
//              gradient M <= 16
//   cublas     quantized products: W dequantized chunk by chunk into scratch, each chunk
//              multiplied by cuBLAS; adapter products: torch's matmul (cuBLAS)
//   fused      the adapter kernels (cuda/adapter_cuda.cu)
//   reference  the slow reference kernels, when no cuBLAS can be loaded
//
// Defaults: quantized products take staged for M <= 16, direct for a forward of 17..32 rows and
// cublas above (a benchmark run, tools/gpu/kernels.sh, times every path per shape; a rule that
// depends on the shape goes into choose() below); adapter products take cublas from kAdapterCublasMinRows rows on (there the rank-r
// products are skinny GEMMs that cuBLAS streams at memory speed) and fused below.
// Knobs, read on every call so that a benchmark or test can compare paths in one process:
//   LOWTUNE_CUDA_PATH      staged | direct | cublas: force that path for the quantized products
//                          wherever its conditions hold (otherwise the default applies)
//   LOWTUNE_CUDA_SMALL_M   largest M for the small-M kernels (default 32, at most 32; 0 = never)
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace lowtune::cuda_policy {

enum class Product : int { Forward, InputGrad, Adapter };
enum class Path : int { Staged, Direct, Cublas, Fused, Reference };

constexpr int64_t kStagedMaxM = 16;
constexpr int64_t kDirectMaxM = 32, kDirectMaxGradM = 16;
constexpr int64_t kAdapterCublasMinRows = 64;

inline const char* path_name(Path p) {
  switch (p) {
    case Path::Staged: return "staged";
    case Path::Direct: return "direct";
    case Path::Cublas: return "cublas";
    case Path::Fused: return "fused";
    case Path::Reference: return "reference";
  }
  return "?";
}

inline Product product_from_name(const std::string& s) {
  if (s == "forward") return Product::Forward;
  if (s == "input_grad") return Product::InputGrad;
  if (s == "adapter") return Product::Adapter;
  throw std::invalid_argument("unknown product '" + s + "' (forward, input_grad or adapter)");
}

struct Call {
  Product product;
  int64_t m;         // activation rows
  int64_t n, k;      // the weight's shape (a rule may depend on it; 0 where unknown)
  bool half;         // bf16/fp16 activations (the small-M kernels take no fp32)
  bool act_aligned;  // activation (x or dy) 16-byte aligned
  bool out_aligned;  // output (y or dx) 16-byte aligned (the packed weight always is: AlignedWeight)
  bool cublas;       // a cuBLAS could be loaded
};

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return (s && *s) ? std::atoll(s) : fallback;
}
inline int64_t small_m_max() { return std::min<int64_t>(env_int("LOWTUNE_CUDA_SMALL_M", kDirectMaxM), kDirectMaxM); }

inline Path choose(const Call& c) {
  if (c.product == Product::Adapter) return c.m >= kAdapterCublasMinRows ? Path::Cublas : Path::Fused;
  const int64_t small = small_m_max();
  const bool grad = c.product == Product::InputGrad;
  const bool staged_ok = c.half && c.act_aligned && c.out_aligned && c.m >= 1 && c.m <= std::min(small, kStagedMaxM);
  const bool direct_ok = c.half && c.m <= std::min(small, grad ? kDirectMaxGradM : kDirectMaxM) && (grad || c.act_aligned);
  const Path big = c.cublas ? Path::Cublas : Path::Reference;
  const char* forced = std::getenv("LOWTUNE_CUDA_PATH");
  if (forced && *forced) {
    if (!std::strcmp(forced, "staged") && staged_ok) return Path::Staged;
    if (!std::strcmp(forced, "direct") && direct_ok) return Path::Direct;
    if (!std::strcmp(forced, "cublas")) return big;
  }
  if (staged_ok) return Path::Staged;
  if (direct_ok) return Path::Direct;
  return big;
}

}  // namespace lowtune::cuda_policy
