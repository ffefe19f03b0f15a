// cuBLAS, opened at run time with dlopen: the extension never links it, so it builds and imports
// where no cuBLAS is installed. Where PyTorch is loaded, its libcublas is already in the process
// and dlopen finds it by name. Only four functions are used; their C ABI has been stable since
// CUDA 11 (enums are plain ints, values from cublas_api.h / library_types.h).
//
// Workspace: each stream gets one of LOWTUNE_CUBLAS_WORKSPACE_MB (default 8, 0 = none), set on the
// handle before every call (cublasSetStream resets it). Without it cuBLAS allocates its own, from
// the stream (cudaMallocAsync since CUDA 12.2): inside a captured graph that becomes the graph's own
// memory, so memory would grow with every graph captured, outside any budget's accounting.
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.cuh"
#include "internal.h"

#if defined(_WIN32)
namespace lowtune::cuda {
bool cublas_available() { return false; }
void cublas_workspace_stats(int64_t* bytes, int64_t* count) { *bytes = 0; *count = 0; }
void cublas_gemm(bool, bool, int, int, int, const void*, int, const void*, int, void*, int, int, cudaStream_t, float,
                 float) {
  throw std::runtime_error("cuBLAS loading is not implemented on Windows");
}
}  // namespace lowtune::cuda
#else
#include <dlfcn.h>

namespace lowtune::cuda {
namespace {

constexpr int kOpN = 0, kOpT = 1;          // cublasOperation_t
constexpr int kCompute32F = 68;            // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;           // CUBLAS_GEMM_DEFAULT

using Handle = void*;
using CreateFn = int (*)(Handle*);
using SetStreamFn = int (*)(Handle, cudaStream_t);
using SetWorkspaceFn = int (*)(Handle, void*, size_t);
using GemmExFn = int (*)(Handle, int, int, int, int, int, const void*, const void*, int, int, const void*, int,
                         int, const void*, void*, int, int, int, int);

struct Cublas {
  std::mutex mu;  // a cuBLAS handle is not safe for concurrent use
  bool tried = false;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  SetWorkspaceFn set_workspace = nullptr;  // absent from very old cuBLAS: then its own workspace
  GemmExFn gemm = nullptr;
  Handle handles[kMaxDevices] = {};
  std::map<std::pair<int, cudaStream_t>, std::pair<void*, size_t>> workspaces;  // never freed
  int64_t workspace_bytes = 0;

  bool load() {  // with mu held
    if (tried) return gemm != nullptr;
    tried = true;
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"}) {
      void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (!lib) continue;
      auto sym = [&](const char* a, const char* b) {
        void* f = dlsym(lib, a);
        return f ? f : dlsym(lib, b);
      };
      create = reinterpret_cast<CreateFn>(sym("cublasCreate_v2", "cublasCreate"));
      set_stream = reinterpret_cast<SetStreamFn>(sym("cublasSetStream_v2", "cublasSetStream"));
      gemm = reinterpret_cast<GemmExFn>(dlsym(lib, "cublasGemmEx"));
      set_workspace = reinterpret_cast<SetWorkspaceFn>(sym("cublasSetWorkspace_v2", "cublasSetWorkspace"));
      if (create && set_stream && gemm) return true;
      create = nullptr; set_stream = nullptr; gemm = nullptr; set_workspace = nullptr;
    }
    return false;
  }
};

Cublas& cublas() {
  static Cublas* c = new Cublas;  // never destroyed: handles may outlive static destruction order
  return *c;
}

void check(int status, const char* what) {
  if (status != 0) throw std::runtime_error(std::string("cuBLAS ") + what + " failed with status " + std::to_string(status));
}

size_t workspace_size() {
  const char* s = std::getenv("LOWTUNE_CUBLAS_WORKSPACE_MB");
  const long long mb = (s && *s) ? std::atoll(s) : 8;
  return mb > 0 ? (size_t)mb << 20 : 0;
}

// The workspace of (device, stream), made on first use (with mu held), also while the stream is
// being captured; the memory stays for the life of the process.
std::pair<void*, size_t> workspace(Cublas& c, int dev, cudaStream_t stream) {
  auto it = c.workspaces.find({dev, stream});
  if (it != c.workspaces.end()) return it->second;
  const size_t size = workspace_size();
  void* p = size ? device_malloc(size) : nullptr;
  c.workspace_bytes += (int64_t)size;
  return c.workspaces[{dev, stream}] = {p, size};
}

}  // namespace

void cublas_workspace_stats(int64_t* bytes, int64_t* count) {
  Cublas& c = cublas();
  std::lock_guard<std::mutex> lock(c.mu);
  *bytes = c.workspace_bytes;
  *count = (int64_t)c.workspaces.size();
}

bool cublas_available() {
  Cublas& c = cublas();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.load();
}

void cublas_gemm(bool trans_a, bool trans_b, int m, int n, int k, const void* a, int lda, const void* b, int ldb,
                 void* c_out, int ldc, int data_type, cudaStream_t stream, float alpha, float beta) {
  Cublas& c = cublas();
  std::lock_guard<std::mutex> lock(c.mu);
  if (!c.load()) throw std::runtime_error("cuBLAS could not be loaded");
  const int dev = current_device();
  if (!c.handles[dev]) check(c.create(&c.handles[dev]), "cublasCreate");
  check(c.set_stream(c.handles[dev], stream), "cublasSetStream");
  if (c.set_workspace) {
    const auto ws = workspace(c, dev, stream);
    check(c.set_workspace(c.handles[dev], ws.first, ws.second), "cublasSetWorkspace");
  }
  check(c.gemm(c.handles[dev], trans_a ? kOpT : kOpN, trans_b ? kOpT : kOpN, m, n, k, &alpha, a, data_type, lda, b,
               data_type, ldb, &beta, c_out, data_type, ldc, kCompute32F, kGemmDefault),
        "cublasGemmEx");
}

}  // namespace lowtune::cuda
#endif
