// CUDA entry points (kernels.h): pick a kernel for the shape, dtype and alignment.
//
//   dequantize           the tiled unpack kernel, bit-identical to the CPU twin
//   forward/input grad   the path cuda_policy::choose names (cuda_policy.h):
//     gemv               the M = 1 forward on CUDA cores (gemv.cuh), types with codes
//     staged             the staged small-M kernels (staged_gemv.cuh), M <= 16
//     direct             the first small-M kernels (small_m.cuh)
//     cublas             W is dequantized in chunks of rows (forward) or columns (input grad) into
//                        scratch in the activation dtype, and each chunk is multiplied with cuBLAS
//                        (opened at run time). Two chunk buffers alternate: a side stream
//                        dequantizes chunk i+1 while cuBLAS multiplies chunk i, and chunks small
//                        enough to stay in L2 are read back from it.
//     reference          the reference kernels, when cuBLAS cannot be loaded (correct, slow)
// A packed weight that does not start 16-byte aligned is first copied to an aligned scratch
// buffer; activations that are not aligned skip the staged kernels.
//
// The cublas path's chunks follow cuda_policy::plan_chunks, whose knobs (LOWTUNE_CUDA_CHUNK_MB,
// _CHUNK_MIN, _SCRATCH_MB, _OVERLAP) are read on every call, so a benchmark can sweep them.
//
// Scratch memory (scratch_alloc) is the extension's own, outside PyTorch's allocator:
//   outside graph capture  stream-ordered allocations from a memory pool of our own, which keeps
//                          freed memory up to LOWTUNE_CUDA_SCRATCH_KEEP_MB (default 512, read
//                          when the pool is made) for the next call;
//   during graph capture   a stack in one arena per device of cudaMalloc'd blocks that every
//                          captured graph shares. (Stream-ordered allocations would become the
//                          graph's own allocation nodes, each graph holding its memory: memory
//                          would grow with the number of graphs.) Graphs sharing the arena must
//                          not run concurrently: lowtune's layer graphs replay one after another
//                          on the compute stream.
// memory_stats() says what each holds; lowtune.memory_budget counts it against the GPU budget.
#include <climits>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "../block_math.h"
#include "../cuda_policy.h"
#include "../glue_kernels.h"  // rms_norm_vectorized
#include "../kernels.h"
#include "common.cuh"
#include "internal.h"

namespace lowtune::cuda {

bool available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

int current_device() {
  int dev = 0;
  LT_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("device index out of range");
  return dev;
}

namespace {

using cuda_policy::ChunkPlan;
using cuda_policy::env_int;
using cuda_policy::plan_chunks;

int cuda_data_type(int dtype) {  // cudaDataType values (library_types.h)
  switch (dtype) {
    case D_F32: return 0;   // CUDA_R_32F
    case D_F16: return 2;   // CUDA_R_16F
    case D_BF16: return 14; // CUDA_R_16BF
  }
  throw std::invalid_argument("unknown activation dtype " + std::to_string(dtype));
}
int dtype_size(int dtype) { return dtype == D_F32 ? 4 : 2; }

cudaMemPool_t scratch_pool() {
  static std::mutex mu;
  static cudaMemPool_t pools[kMaxDevices] = {};
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (!pools[dev]) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    LT_CUDA_CHECK(cudaMemPoolCreate(&pools[dev], &props));
    // keep freed scratch for the next call, up to this much (released at synchronisations)
    uint64_t keep = (uint64_t)std::max<int64_t>(env_int("LOWTUNE_CUDA_SCRATCH_KEEP_MB", 512), 0) << 20;
    LT_CUDA_CHECK(cudaMemPoolSetAttribute(pools[dev], cudaMemPoolAttrReleaseThreshold, &keep));
  }
  return pools[dev];
}

// Scratch while a stream is being captured: a stack (allocations are freed in reverse order, as
// ScratchBuffers go out of scope) in blocks that are never freed, shared by every graph.
struct CaptureArena {
  struct Block { char* base; size_t size; };
  struct Live { size_t block, offset, size; char* ptr; };
  std::mutex mu;
  std::vector<Block> blocks;
  std::vector<Live> live;
  size_t reserved = 0;

  void* alloc(size_t bytes) {
    bytes = (bytes + 255) / 256 * 256;
    std::lock_guard<std::mutex> lock(mu);
    size_t b = 0, off = 0;  // just above the newest live allocation
    if (!live.empty()) { b = live.back().block; off = live.back().offset + live.back().size; }
    while (b < blocks.size() && off + bytes > blocks[b].size) { ++b; off = 0; }
    if (b == blocks.size()) {
      const size_t size = std::max<size_t>(bytes, 32ull << 20);
      char* base = static_cast<char*>(device_malloc(size));
      blocks.push_back({base, size});
      reserved += size;
      off = 0;
    }
    live.push_back({b, off, bytes, blocks[b].base + off});
    return live.back().ptr;
  }
  bool free(void* p) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = live.size(); i-- > 0;) {
      if (live[i].ptr == p) { live.erase(live.begin() + (long)i); return true; }
    }
    return false;
  }
};
CaptureArena& capture_arena() {
  static CaptureArena* arenas = new CaptureArena[kMaxDevices];  // never destroyed: graphs may outlive statics
  return arenas[current_device()];
}

// The packed weight at a 16-byte aligned address: the pointer itself, or an aligned copy.
class AlignedWeight {
 public:
  AlignedWeight(const void* w, size_t bytes, cudaStream_t stream)
      : copy_(aligned16(w) ? 0 : bytes, stream), ptr_(static_cast<const uint8_t*>(w)) {
    if (copy_.as<void>()) {
      LT_CUDA_CHECK(cudaMemcpyAsync(copy_.as<void>(), w, bytes, cudaMemcpyDeviceToDevice, stream));
      ptr_ = copy_.as<uint8_t>();
    }
  }
  const uint8_t* get() const { return ptr_; }

 private:
  ScratchBuffer copy_;
  const uint8_t* ptr_;
};

// Shape and argument checks shared by the entry points; returns the block geometry.
BlockInfo check_args(int qtype, int dtype, int64_t m, int64_t n, int64_t k) {
  const BlockInfo bi = block_info(qtype);  // throws for an unknown type
  if (k % bi.elems)
    throw std::invalid_argument("K = " + std::to_string(k) + " is not a multiple of the block size " +
                                std::to_string(bi.elems));
  if (m < 0 || n < 0 || k < 0) throw std::invalid_argument("negative size");
  if (m >= INT_MAX || n >= INT_MAX || k >= INT_MAX)
    throw std::invalid_argument("each of M, N, K must be below 2^31 for the CUDA kernels");
  cuda_data_type(dtype);  // validates
  return bi;
}

// A side stream (per device) and the events that order it against the caller's stream.
struct SideStream {
  std::mutex mu;  // one chunked product at a time uses a device's side stream
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, ready[2] = {}, free[2] = {};
};
SideStream* side_stream(cudaStream_t caller) {
  static SideStream sides[kMaxDevices];
  SideStream& s = sides[current_device()];
  if (!s.stream) {
    // Creating a stream or an event is not allowed while the caller's stream is being captured
    // into a graph: such a first call runs without overlap.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    LT_CUDA_CHECK(cudaStreamIsCapturing(caller, &capture));
    if (capture != cudaStreamCaptureStatusNone) return nullptr;
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.stream) {
      cudaEvent_t evs[5];
      for (auto& e : evs) LT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      s.start = evs[0]; s.ready[0] = evs[1]; s.ready[1] = evs[2]; s.free[0] = evs[3]; s.free[1] = evs[4];
      cudaStream_t st = nullptr;
      LT_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      s.stream = st;
    }
  }
  return &s;
}

// for i < chunks: produce(i, buffer) then consume(i, buffer), buffer = i % 2. With overlap the
// producer runs on the side stream one chunk ahead of the consumer on the caller's stream;
// without, both run in turn on the caller's stream with one buffer.
template <class Produce, class Consume>
void pipeline_chunks(int64_t chunks, bool overlap, cudaStream_t stream, Produce produce, Consume consume) {
  SideStream* side = overlap && chunks > 1 ? side_stream(stream) : nullptr;
  if (!side) {
    for (int64_t i = 0; i < chunks; ++i) {
      produce(i, 0, stream);
      consume(i, 0, stream);
    }
    return;
  }
  std::lock_guard<std::mutex> lock(side->mu);
  LT_CUDA_CHECK(cudaEventRecord(side->start, stream));  // the scratch (allocated on stream) exists
  LT_CUDA_CHECK(cudaStreamWaitEvent(side->stream, side->start, 0));
  for (int64_t i = 0; i < chunks; ++i) {
    const int b = (int)(i % 2);
    if (i >= 2) LT_CUDA_CHECK(cudaStreamWaitEvent(side->stream, side->free[b], 0));
    produce(i, b, side->stream);
    LT_CUDA_CHECK(cudaEventRecord(side->ready[b], side->stream));
    LT_CUDA_CHECK(cudaStreamWaitEvent(stream, side->ready[b], 0));
    consume(i, b, stream);
    if (i + 2 < chunks) LT_CUDA_CHECK(cudaEventRecord(side->free[b], stream));
  }
  // The caller's stream has waited for the side stream's last work (the last chunk's ready).
}

// Rows r0 .. r0 + nr and columns c0 .. c0 + nc of deq(W) (with lr: of W' = deq(W) + ΔW, kernels.h) into
// out (row length nc), the scratch chunk a product hands to cuBLAS. k: W's columns; the low-rank factors'
// row and column tiles start at r0 and c0 (lr->rank values a row, in fragment order).
template <int T>
void produce_chunk(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                   void* out, int dtype, const LowRankUpdate* lr, cudaStream_t s) {
  const uint8_t* rows = w + r0 * row_bytes;
  if (!lr || lr->left) {  // (an update by a GEMM of its own leaves the chunk plain)
    launch_dequant_tile<T>(rows, row_bytes, nr, c0, nc, out, dtype, nc, s);
  } else if (lr->a) {
    launch_dequant_expand_tile<T>(rows, row_bytes, nr, c0, nc, out, dtype, nc, lr->a, k / lr->pool, lr->pool,
                                  lr->repeat, r0, lr->scale / lr->pool, s);
  } else {
    const int64_t es = dtype_size(dtype);
    launch_dequant_lowrank_tile<T>(rows, row_bytes, nr, c0, nc, out, dtype, nc,
                                   static_cast<const char*>(lr->bx) + r0 * lr->rank * es,
                                   static_cast<const char*>(lr->at) + c0 * lr->rank * es, lr->rank, lr->scale, s);
  }
}

// The update of a chunk's output (lr->left given): out[:, c0:c0+nc] (row length ld) = scale · left · right[c0:c0+nc]ᵀ
// + beta · out[:, c0:c0+nc], one GEMM with K = rank on the caller's stream next to the chunk's (before it, or
// after it while the chunk's output is still in L2: cuda_policy::chunk_update_first).
void chunk_update(const LowRankUpdate* lr, int64_t m, int64_t c0, int64_t nc, void* out, int64_t ld, int dtype,
                  float beta, cudaStream_t s) {
  const int64_t es = dtype_size(dtype);
  // column-major: outᵀ[c0:c0+nc, :] (nc x m, ld) += right[c0:c0+nc] (stored rank x nc)ᵀ · leftᵀ (rank x m)
  cublas_gemm(true, false, (int)nc, (int)m, lr->rank, static_cast<const char*>(lr->right) + c0 * lr->rank * es,
              lr->rank, lr->left, lr->rank, static_cast<char*>(out) + c0 * es, (int)ld, cuda_data_type(dtype), s,
              lr->scale, beta);
}

// The chunk's GEMM, `gemm(beta)`, with the update of its output (if any) before or after it.
template <class Gemm>
void gemm_with_update(const LowRankUpdate* lr, int64_t m, int64_t c0, int64_t nc, void* out, int64_t ld, int dtype,
                      cudaStream_t s, Gemm gemm) {
  if (!lr || !lr->left) return gemm(0.0f);
  if (cuda_policy::chunk_update_first()) {
    chunk_update(lr, m, c0, nc, out, ld, dtype, 0.0f, s);
    return gemm(1.0f);
  }
  gemm(0.0f);
  chunk_update(lr, m, c0, nc, out, ld, dtype, 1.0f, s);
}

// Y[:, r0:r0+rows] = X · deq(W[r0:r0+rows])ᵀ for chunks of rows (with lr: W' = deq(W) + s·Bx·Atᵀ, or
// the update added by a GEMM beside each chunk's).
template <int T>
void chunked_forward(const void* x, int dtype, const uint8_t* w, void* y, int64_t m, int64_t n, int64_t k,
                     int64_t row_bytes, cudaStream_t stream, const LowRankUpdate* lr = nullptr) {
  const int es = dtype_size(dtype);
  const ChunkPlan p = plan_chunks(n, k, es);
  const size_t buf = (size_t)(p.size * k * es);
  ScratchBuffer scratch(buf * (p.overlap ? 2 : 1), stream);
  auto at = [&](int b) { return scratch.as<char>() + b * buf; };
  pipeline_chunks(
      p.chunks, p.overlap, stream,
      [&](int64_t i, int b, cudaStream_t s) {
        const int64_t r0 = i * p.size, nr = std::min(p.size, n - r0);
        produce_chunk<T>(w, row_bytes, k, r0, nr, 0, k, at(b), dtype, lr, s);
      },
      [&](int64_t i, int b, cudaStream_t s) {
        const int64_t r0 = i * p.size, nr = std::min(p.size, n - r0);
        // column-major view: Yᵀ[r0:r0+nr, :] (nr x m, ld n) = S (nr x k, stored as k x nr, ld k)ᵀ · Xᵀ (k x m, ld k)
        gemm_with_update(lr, m, r0, nr, y, n, dtype, s, [&](float beta) {
          cublas_gemm(true, false, (int)nr, (int)m, (int)k, at(b), (int)k, x, (int)k,
                      static_cast<char*>(y) + r0 * es, (int)n, cuda_data_type(dtype), s, 1.0f, beta);
        });
      });
}

// dX[:, c0:c0+cols] = dY · deq(W[:, c0:c0+cols]) for chunks of columns (with lr: as above).
template <int T>
void chunked_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int64_t m, int64_t n, int64_t k,
                        int64_t row_bytes, cudaStream_t stream, const LowRankUpdate* lr = nullptr) {
  const int es = dtype_size(dtype);
  const ChunkPlan p = plan_chunks(k, n, es);  // p.size: a multiple of 128 or all of K (a multiple of 32)
  const size_t buf = (size_t)(p.size * n * es);
  ScratchBuffer scratch(buf * (p.overlap ? 2 : 1), stream);
  auto at = [&](int b) { return scratch.as<char>() + b * buf; };
  pipeline_chunks(
      p.chunks, p.overlap, stream,
      [&](int64_t i, int b, cudaStream_t s) {
        const int64_t c0 = i * p.size, nc = std::min(p.size, k - c0);
        produce_chunk<T>(w, row_bytes, k, 0, n, c0, nc, at(b), dtype, lr, s);
      },
      [&](int64_t i, int b, cudaStream_t s) {
        const int64_t c0 = i * p.size, nc = std::min(p.size, k - c0);
        // column-major: dXᵀ[c0:c0+nc, :] (ld k) = S (nc x n, ld nc) · dYᵀ (n x m, ld n)
        gemm_with_update(lr, m, c0, nc, dx, k, dtype, s, [&](float beta) {
          cublas_gemm(false, false, (int)nc, (int)m, (int)n, at(b), (int)nc, dy, (int)n,
                      static_cast<char*>(dx) + c0 * es, (int)k, cuda_data_type(dtype), s, 1.0f, beta);
        });
      });
}

cuda_policy::Path choose_path(cuda_policy::Product product, int qtype, int dtype, int64_t m, int64_t n, int64_t k,
                              const void* act, const void* out) {
  const bool gemv = cuda_policy::has_gemv(qtype) && gemv_fits(k);
  return cuda_policy::choose({product, m, n, k, dtype != D_F32, aligned16(act), aligned16(out), cublas_available(),
                              gemv, cuda_policy::gemv_grad_default(qtype),
                              cuda_policy::regs_default(qtype, m)});
}

// Attribute A of the current device, read once per device (none of those asked is ever 0).
template <cudaDeviceAttr A>
int device_attribute() {
  static int values[kMaxDevices] = {};
  const int dev = current_device();
  if (!values[dev]) LT_CUDA_CHECK(cudaDeviceGetAttribute(&values[dev], A, dev));
  return values[dev];
}

}  // namespace

int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

int smem_optin_limit() { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

bool pdl_supported() {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9 &&
         env_int("LOWTUNE_CUDA_PDL", 1) != 0;  // the knob: cuda_policy.h
}

void* device_malloc(size_t bytes) {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  LT_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  LT_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));  // back to what it was
  LT_CUDA_CHECK(err);
  return p;
}

void* scratch_alloc(size_t bytes, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  LT_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture == cudaStreamCaptureStatusActive) return capture_arena().alloc(bytes);
  void* p = nullptr;
  LT_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes, scratch_pool(), stream));
  return p;
}

void scratch_free(void* p, cudaStream_t stream) {
  if (p && !capture_arena().free(p)) LT_CUDA_CHECK(cudaFreeAsync(p, stream));
}

void scratch_reserve(int64_t bytes, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  cudaMemPool_t pool = scratch_pool();
  LT_CUDA_CHECK(cudaStreamSynchronize(s));
  LT_CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));  // what earlier products left, in pieces
  if (bytes <= 0) return;
  void* p = nullptr;
  LT_CUDA_CHECK(cudaMallocFromPoolAsync(&p, (size_t)bytes, pool, s));
  LT_CUDA_CHECK(cudaFreeAsync(p, s));
  LT_CUDA_CHECK(cudaStreamSynchronize(s));
}

MemoryStats memory_stats() {
  MemoryStats s;
  uint64_t v = 0;
  cudaMemPool_t pool = scratch_pool();
  LT_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &v));
  s.scratch_pool_reserved = (int64_t)v;
  LT_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &v));
  s.scratch_pool_reserved_high = (int64_t)v;
  {
    CaptureArena& a = capture_arena();
    std::lock_guard<std::mutex> lock(a.mu);
    s.capture_arena_reserved = (int64_t)a.reserved;
  }
  cublas_workspace_stats(&s.cublas_workspace_bytes, &s.cublas_workspaces);
  return s;
}

void dequantize(int qtype, const void* blocks, void* out, int out_dtype, int64_t n, int64_t k, void* stream) {
  const BlockInfo bi = check_args(qtype, out_dtype, 0, n, k);
  if (n == 0 || k == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t row_bytes = k / bi.elems * bi.bytes;
  const AlignedWeight w(blocks, (size_t)(n * row_bytes), s);
  if (!aligned16(out)) {  // the fast kernel stores 16 bytes at a time
    reference::dequantize(qtype, w.get(), out, out_dtype, n, k, stream);
    return;
  }
  dispatch_qtype(qtype, [&]<int T>() { launch_dequant_tile<T>(w.get(), row_bytes, n, 0, k, out, out_dtype, k, s); });
}

// The products' shared preamble: the arguments checked, nothing done where the output is empty, zeros
// where the reduction is (K for the forward, N for the input gradient), else run(stream, the weight
// 16-byte aligned, its row bytes).
template <class F>
void product(cuda_policy::Product which, int qtype, int dtype, const void* w, void* out, int64_t m, int64_t n,
             int64_t k, void* stream, F run) {
  const BlockInfo bi = check_args(qtype, dtype, m, n, k);
  const bool forward = which == cuda_policy::Product::Forward;
  const int64_t cols = forward ? n : k, reduced = forward ? k : n;
  if (m == 0 || cols == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (reduced == 0) {
    LT_CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)(m * cols * dtype_size(dtype)), s));
    return;
  }
  const int64_t row_bytes = k / bi.elems * bi.bytes;
  const AlignedWeight wa(w, (size_t)(n * row_bytes), s);
  run(s, wa.get(), row_bytes);
}

void qmatmul_forward(int qtype, const void* x, int dtype, const void* w, void* y, int64_t m, int64_t n, int64_t k,
                     void* stream) {
  auto run = [&](cudaStream_t s, const uint8_t* wb, int64_t row_bytes) {
    switch (choose_path(cuda_policy::Product::Forward, qtype, dtype, m, n, k, x, y)) {
      case cuda_policy::Path::Gemv:
        dispatch_qtype(qtype, [&]<int T>() { launch_gemv<T>(x, dtype, wb, y, n, k, row_bytes, s); });
        break;
      case cuda_policy::Path::Staged:
        dispatch_qtype(qtype, [&]<int T>() {
          launch_staged_forward<T>(x, dtype, wb, y, (int)m, (int)n, (int)k, row_bytes, s);
        });
        break;
      case cuda_policy::Path::Regs:
        dispatch_qtype(qtype, [&]<int T>() {
          launch_regs_forward<T>(x, dtype, wb, y, (int)m, (int)n, (int)k, row_bytes, s);
        });
        break;
      case cuda_policy::Path::Direct:
        dispatch_qtype(qtype, [&]<int T>() {
          launch_small_forward<T>(x, dtype, wb, y, (int)m, (int)n, (int)k, row_bytes, s);
        });
        break;
      case cuda_policy::Path::Cublas:
        dispatch_qtype(qtype, [&]<int T>() { chunked_forward<T>(x, dtype, wb, y, m, n, k, row_bytes, s); });
        break;
      default:
        reference::qmatmul_forward(qtype, x, dtype, wb, y, m, n, k, s);
    }
  };
  product(cuda_policy::Product::Forward, qtype, dtype, w, y, m, n, k, stream, run);
}

bool qmatmul_forward_one_row(int qtype, const GemvPrologue& p, const void* x, int dtype, const void* w, void* y,
                             int64_t n, int64_t k, void* stream) {
  const BlockInfo bi = check_args(qtype, dtype, 1, n, k);
  if (n == 0 || k == 0) return false;
  if (choose_path(cuda_policy::Product::Forward, qtype, dtype, 1, n, k, x, y) != cuda_policy::Path::Gemv) return false;
  if (p.kind == GemvPrologue::SiluMul && !(p.b != nullptr && aligned16(p.b))) return false;
  // the norm as the vector RMSNorm kernel computes it (its sum's order), or not here
  if (p.kind == GemvPrologue::AddRmsNorm && (p.w == nullptr || !rms_norm_vectorized(dtype, k, x, p.b, x, p.s)))
    return false;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t row_bytes = k / bi.elems * bi.bytes;
  const AlignedWeight wa(w, (size_t)(n * row_bytes), s);
  dispatch_qtype(qtype, [&]<int T>() { launch_gemv<T>(x, dtype, wa.get(), y, n, k, row_bytes, s, p); });
  return true;
}

void qmatmul_input_grad(int qtype, const void* dy, int dtype, const void* w, void* dx, int64_t m, int64_t n,
                        int64_t k, void* stream) {
  auto run = [&](cudaStream_t s, const uint8_t* wb, int64_t row_bytes) {
    switch (choose_path(cuda_policy::Product::InputGrad, qtype, dtype, m, n, k, dy, dx)) {
      case cuda_policy::Path::Gemv:
        dispatch_qtype(qtype, [&]<int T>() { launch_gemv_input_grad<T>(dy, dtype, wb, dx, n, k, row_bytes, s); });
        break;
      case cuda_policy::Path::Staged:
        dispatch_qtype(qtype, [&]<int T>() {
          launch_staged_input_grad<T>(dy, dtype, wb, dx, (int)m, (int)n, (int)k, row_bytes, s);
        });
        break;
      case cuda_policy::Path::Direct:
        dispatch_qtype(qtype, [&]<int T>() {
          launch_small_input_grad<T>(dy, dtype, wb, dx, (int)m, (int)n, (int)k, row_bytes, s);
        });
        break;
      case cuda_policy::Path::Cublas:
        dispatch_qtype(qtype, [&]<int T>() { chunked_input_grad<T>(dy, dtype, wb, dx, m, n, k, row_bytes, s); });
        break;
      default:
        reference::qmatmul_input_grad(qtype, dy, dtype, wb, dx, m, n, k, s);
    }
  };
  product(cuda_policy::Product::InputGrad, qtype, dtype, w, dx, m, n, k, stream, run);
}

namespace {
// The low-rank products' arguments (kernels.h); they need cuBLAS (no reference path takes them).
void check_lowrank(const LowRankUpdate& u, int dtype, int64_t n, int64_t k) {
  if (dtype == D_F32) throw std::invalid_argument("the low-rank update takes bfloat16 or float16 activations");
  if (!cublas_available()) throw std::runtime_error("the low-rank update needs cuBLAS, which could not be loaded");
  if (u.left) {  // added after each chunk's GEMM
    if (!u.right || u.rank <= 0) throw std::invalid_argument("the update after the GEMM needs right and a rank > 0");
    return;
  }
  if (u.a) {  // one matrix expanded
    if (u.pool < 1 || u.repeat < 1 || k % u.pool || n % u.repeat)
      throw std::invalid_argument("the expanded update's pool and repeat must divide K and N");
    return;
  }
  if (!u.bx || !u.at) throw std::invalid_argument("the low-rank update's Bx and At must be given");
  if (u.rank <= 0 || u.rank % 16)
    throw std::invalid_argument("the low-rank update's rank must be a positive multiple of 16 (zero-padded), got " +
                                std::to_string(u.rank));
  if ((reinterpret_cast<uintptr_t>(u.bx) | reinterpret_cast<uintptr_t>(u.at)) & 15)
    throw std::invalid_argument("the low-rank update's Bx and At must be 16-byte aligned");
}
}  // namespace

void qmatmul_forward_lowrank(int qtype, const void* x, int dtype, const void* w, const LowRankUpdate& u, void* y,
                             int64_t m, int64_t n, int64_t k, void* stream) {
  check_lowrank(u, dtype, n, k);
  product(cuda_policy::Product::Forward, qtype, dtype, w, y, m, n, k, stream,
          [&](cudaStream_t s, const uint8_t* wb, int64_t row_bytes) {
            dispatch_qtype(qtype, [&]<int T>() { chunked_forward<T>(x, dtype, wb, y, m, n, k, row_bytes, s, &u); });
          });
}

void qmatmul_input_grad_lowrank(int qtype, const void* dy, int dtype, const void* w, const LowRankUpdate& u,
                                void* dx, int64_t m, int64_t n, int64_t k, void* stream) {
  check_lowrank(u, dtype, n, k);
  product(cuda_policy::Product::InputGrad, qtype, dtype, w, dx, m, n, k, stream,
          [&](cudaStream_t s, const uint8_t* wb, int64_t row_bytes) {
            dispatch_qtype(qtype, [&]<int T>() {
              chunked_input_grad<T>(dy, dtype, wb, dx, m, n, k, row_bytes, s, &u);
            });
          });
}

}  // namespace lowtune::cuda
