// CUDA error checking: every call and launch is checked; a failure becomes std::runtime_error,
// which pybind11 turns into a Python RuntimeError. And the launchers' alignment test.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#define LT_CUDA_CHECK(expr)                                                                    \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                   \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err_) + " at " + \
                               __FILE__ + ":" + std::to_string(__LINE__) + " (" #expr ")");    \
  } while (0)
#define LT_CUDA_CHECK_LAUNCH() LT_CUDA_CHECK(cudaGetLastError())

// 16-byte alignment, which the vector loads and stores of the fast kernels need (null counts).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
