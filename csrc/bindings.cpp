// Python bindings: the only file that includes pybind11. Pointers travel as integers
// (tensor.data_ptr()); lowtune.ops validates every argument before calling in here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kernels.h"
#include "adapter_kernels.h"
#include "glue_kernels.h"
#include "cuda_policy.h"
#include "decode_kernels.h"

namespace py = pybind11;
using namespace lowtune;

#ifndef LOWTUNE_VERSION
#define LOWTUNE_VERSION "0.0.0"
#endif
#ifndef LOWTUNE_CUDA_ARCHS
#define LOWTUNE_CUDA_ARCHS ""
#endif

namespace {
template <class T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
using nogil = py::call_guard<py::gil_scoped_release>;

py::dict build_info() {
  py::dict d;
  d["version"] = LOWTUNE_VERSION;
#ifdef LOWTUNE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(LOWTUNE_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["cpu_threads"] = cpu::num_threads();
  d["cpu_isa"] = std::string(cpu::simd_isa());
  d["cpu_threading"] = std::string(cpu::threading_backend());
  return d;
}

// The adapter products' bindings, for a CPU kernel and its slow twin alike (adapter_kernels.h):
// geometry as (m, k, n, pool, repeat, rank, a_ld, b_ld, has_b, scale), then the pointers.
template <auto F>
auto adapter_forward_binding() {
  return [](int64_t M, int64_t K, int64_t N, int64_t p, int64_t q, int64_t r, int64_t a_ld, int64_t b_ld, bool has_b,
            float scale, uintptr_t x, int dt, uintptr_t A, uintptr_t B, uintptr_t y, uintptr_t u, uintptr_t xs_out) {
    F(AdapterGeom{M, K, N, p, q, r, a_ld, b_ld, has_b, scale}, ptr<const void>(x), dt, ptr<const float>(A),
      ptr<const float>(B), ptr<void>(y), ptr<float>(u), ptr<void>(xs_out));
  };
}
template <auto F>
auto adapter_backward_binding() {
  return [](int64_t M, int64_t K, int64_t N, int64_t p, int64_t q, int64_t r, int64_t a_ld, int64_t b_ld, bool has_b,
            float scale, uintptr_t dy, int dt, uintptr_t xs, int64_t xs_pool, uintptr_t A, uintptr_t B, uintptr_t u,
            uintptr_t dx, uintptr_t dA, uintptr_t dB, uintptr_t du) {
    F(AdapterGeom{M, K, N, p, q, r, a_ld, b_ld, has_b, scale}, ptr<const void>(dy), dt, ptr<const void>(xs), xs_pool,
      ptr<const float>(A), ptr<const float>(B), ptr<const float>(u), ptr<void>(dx), ptr<float>(dA), ptr<float>(dB),
      ptr<float>(du));
  };
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowtune's compiled kernels (CPU, and CUDA where built). Use lowtune.ops, not this.";
  m.def("build_info", &build_info, "What was compiled in: version, cuda, cuda_archs, compiler.");
  m.def("block_info", [](int qtype) {
    const BlockInfo b = block_info(qtype);
    return py::make_tuple(b.elems, b.bytes);
  }, "(elements, bytes) of one block of a type id.");
  m.def("type_ids", &type_ids, "Every quantized type id the kernels take.");
  m.def("set_num_threads", &cpu::set_num_threads);
  m.def("num_threads", &cpu::num_threads);

  m.def("quantize", [](int t, uintptr_t w, uintptr_t out, int64_t n, int64_t k) {
    cpu::quantize(t, ptr<const float>(w), ptr<void>(out), n, k);
  }, nogil());
  m.def("dequantize", [](int t, uintptr_t q, uintptr_t out, int dt, int64_t n, int64_t k) {
    cpu::dequantize(t, ptr<const void>(q), ptr<void>(out), dt, n, k);
  }, nogil());
  m.def("qmatmul_forward", [](int t, uintptr_t x, int dt, uintptr_t w, uintptr_t y, int64_t M,
                              int64_t N, int64_t K) {
    cpu::qmatmul_forward(t, ptr<const void>(x), dt, ptr<const void>(w), ptr<void>(y), M, N, K);
  }, nogil());
  m.def("qmatmul_input_grad", [](int t, uintptr_t dy, int dt, uintptr_t w, uintptr_t dx, int64_t M,
                                 int64_t N, int64_t K) {
    cpu::qmatmul_input_grad(t, ptr<const void>(dy), dt, ptr<const void>(w), ptr<void>(dx), M, N, K);
  }, nogil());

  m.def("qmatmul_forward_reference", [](int t, uintptr_t x, int dt, uintptr_t w, uintptr_t y,
                                        int64_t M, int64_t N, int64_t K) {
    cpu::qmatmul_forward_reference(t, ptr<const void>(x), dt, ptr<const void>(w), ptr<void>(y), M, N, K);
  }, nogil());
  m.def("qmatmul_input_grad_reference", [](int t, uintptr_t dy, int dt, uintptr_t w, uintptr_t dx,
                                           int64_t M, int64_t N, int64_t K) {
    cpu::qmatmul_input_grad_reference(t, ptr<const void>(dy), dt, ptr<const void>(w), ptr<void>(dx), M, N, K);
  }, nogil());

  m.def("cuda_available", &cuda::available);
  m.def("cuda_path", [](const std::string& product, int64_t M, int dtype, bool aligned, int64_t N, int64_t K,
                        int qtype) {
    namespace cp = cuda_policy;
    const cp::Product p = cp::product_from_name(product);
    const bool gemv = cp::has_gemv(qtype);  // (the kernel's shared-memory limit on K is not asked)
    const cp::Call call{p, M, N, K, dtype != D_F32, aligned, aligned, true, gemv, cp::gemv_grad_default(qtype),
                        cp::regs_default(qtype, M)};
    return std::string(cp::path_name(cp::choose(call)));
  }, py::arg("product"), py::arg("m"), py::arg("dtype"), py::arg("aligned"), py::arg("n") = 0, py::arg("k") = 0,
     py::arg("qtype") = -1,
     "The path cuda_policy::choose takes for a product ('forward', 'input_grad' or 'adapter') of M "
     "rows in dtype against an N x K weight (0: unknown) of type qtype (-1: unknown), operands "
     "aligned or not, where cuBLAS is available: 'gemv', 'regs', 'staged', 'direct', 'cublas' or 'fused'.");
  m.def("cuda_has_gemv", &cuda_policy::has_gemv, py::arg("qtype"),
        "Whether the type has the M = 1 CUDA-core kernel (its values an affine map of small codes).");
  m.def("cuda_gemv_rows", &cuda_policy::gemv_rows_per_warp, py::arg("qtype"), py::arg("one_row"), py::arg("k"),
        "Rows a warp of the M = 1 gemv (1 or 2) for a K-long row of type qtype; one_row: the one-row "
        "kernel would give every warp a row of its own (N up to ~4k).");
  m.def("cuda_gemv_split", &cuda_policy::gemv_split_k, py::arg("k"), py::arg("fits"),
        "CTAs of a cluster that split K in the two-row M = 1 gemv (1: no split) for K-long rows, where "
        "fits says every warp could take one task of the split.");
  m.def("cuda_gemv_stream", &cuda_policy::gemv_stream_ctas, py::arg("qtype"), py::arg("n"), py::arg("k"),
        "CTAs a multiprocessor of the streamed M = 1 gemv (weights through bulk copies, sm_90) for an "
        "N x K weight of type qtype; 0: the register kernels.");
  m.def("cuda_staged_split", [](int qtype, const std::string& product, int64_t tiles, int64_t nst, int64_t slots,
                                int64_t min_per) {
    namespace cp = cuda_policy;
    const bool forward = cp::product_from_name(product) == cp::Product::Forward;
    return cp::staged_stages_per_split(tiles, nst, slots, cp::staged_split_waves(qtype, forward), min_per);
  }, py::arg("qtype"), py::arg("product"), py::arg("tiles"), py::arg("nst"), py::arg("slots"), py::arg("min_per"),
     "Stages of the reduction a CTA of the staged kernels takes ('forward' or 'input_grad' of type qtype) "
     "when `tiles` tiles split nst stages for `slots` resident CTAs, each split at least min_per stages.");
  m.def("cuda_scratch_bytes", [](const std::string& product, int64_t M, int64_t N, int64_t K, int dtype) {
    namespace cp = cuda_policy;
    return cp::cublas_scratch_bytes(cp::product_from_name(product), M, N, K, dtype == D_F32 ? 4 : 2);
  }, py::arg("product"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("dtype"),
     "Bytes of scratch a quantized product ('forward' or 'input_grad') of M rows in dtype against "
     "an N x K weight takes on the CUDA cublas path (0 on the other paths), under the current "
     "LOWTUNE_CUDA_CHUNK_* / _SCRATCH_MB / _OVERLAP settings.");
  m.def("cuda_memory_stats", []() {
    const cuda::MemoryStats s = cuda::memory_stats();
    py::dict d;
    d["scratch_pool_reserved"] = s.scratch_pool_reserved;
    d["scratch_pool_reserved_high"] = s.scratch_pool_reserved_high;
    d["capture_arena_reserved"] = s.capture_arena_reserved;
    d["cublas_workspace_bytes"] = s.cublas_workspace_bytes;
    d["cublas_workspaces"] = s.cublas_workspaces;
    return d;
  }, "GPU memory the extension holds outside PyTorch's allocator on the current device, in bytes "
     "(all zero without CUDA).");
  m.def("cuda_scratch_reserve", [](int64_t bytes, uintptr_t stream) {
    cuda::scratch_reserve(bytes, ptr<void>(stream));
  }, nogil(), "Make the extension's scratch pool hold at least `bytes` (no-op without CUDA).");
  m.def("cuda_dequantize", [](int t, uintptr_t q, uintptr_t out, int dt, int64_t n, int64_t k,
                              uintptr_t stream) {
    cuda::dequantize(t, ptr<const void>(q), ptr<void>(out), dt, n, k, ptr<void>(stream));
  }, nogil());
  m.def("cuda_qmatmul_forward", [](int t, uintptr_t x, int dt, uintptr_t w, uintptr_t y, int64_t M,
                                   int64_t N, int64_t K, uintptr_t stream) {
    cuda::qmatmul_forward(t, ptr<const void>(x), dt, ptr<const void>(w), ptr<void>(y), M, N, K,
                          ptr<void>(stream));
  }, nogil());
  m.def("cuda_qmatmul_input_grad", [](int t, uintptr_t dy, int dt, uintptr_t w, uintptr_t dx,
                                      int64_t M, int64_t N, int64_t K, uintptr_t stream) {
    cuda::qmatmul_input_grad(t, ptr<const void>(dy), dt, ptr<const void>(w), ptr<void>(dx), M, N,
                             K, ptr<void>(stream));
  }, nogil());
  m.def("cuda_qmatmul_forward_lowrank", [](int t, uintptr_t x, int dt, uintptr_t w, uintptr_t bx, uintptr_t at,
                                           int rank, float scale, uintptr_t y, int64_t M, int64_t N, int64_t K,
                                           uintptr_t stream) {
    const cuda::LowRankUpdate u{ptr<const void>(bx), ptr<const void>(at), rank, scale};
    cuda::qmatmul_forward_lowrank(t, ptr<const void>(x), dt, ptr<const void>(w), u, ptr<void>(y), M, N, K,
                                  ptr<void>(stream));
  }, nogil(), "y = x . (deq(W) + scale Bx At^T)^T through the chunked cuBLAS path (Bx, At: ops.lowrank_ready).");
  m.def("cuda_qmatmul_input_grad_lowrank", [](int t, uintptr_t dy, int dt, uintptr_t w, uintptr_t bx, uintptr_t at,
                                              int rank, float scale, uintptr_t dx, int64_t M, int64_t N, int64_t K,
                                              uintptr_t stream) {
    const cuda::LowRankUpdate u{ptr<const void>(bx), ptr<const void>(at), rank, scale};
    cuda::qmatmul_input_grad_lowrank(t, ptr<const void>(dy), dt, ptr<const void>(w), u, ptr<void>(dx), M, N, K,
                                     ptr<void>(stream));
  }, nogil(), "dx = dy . (deq(W) + scale Bx At^T) through the chunked cuBLAS path (Bx, At: ops.lowrank_ready).");
  m.def("cuda_qmatmul_forward_epilogue", [](int t, uintptr_t x, int dt, uintptr_t w, uintptr_t left, uintptr_t right,
                                            int rank, float scale, uintptr_t y, int64_t M, int64_t N, int64_t K,
                                            uintptr_t stream) {
    cuda::LowRankUpdate u;
    u.left = ptr<const void>(left), u.right = ptr<const void>(right), u.rank = rank, u.scale = scale;
    cuda::qmatmul_forward_lowrank(t, ptr<const void>(x), dt, ptr<const void>(w), u, ptr<void>(y), M, N, K,
                                  ptr<void>(stream));
  }, nogil(), "y = x . deq(W)^T + scale left right^T, the update added after each chunk's GEMM "
              "(left [M, rank], right [N, rank]).");
  m.def("cuda_qmatmul_input_grad_epilogue", [](int t, uintptr_t dy, int dt, uintptr_t w, uintptr_t left,
                                               uintptr_t right, int rank, float scale, uintptr_t dx, int64_t M,
                                               int64_t N, int64_t K, uintptr_t stream) {
    cuda::LowRankUpdate u;
    u.left = ptr<const void>(left), u.right = ptr<const void>(right), u.rank = rank, u.scale = scale;
    cuda::qmatmul_input_grad_lowrank(t, ptr<const void>(dy), dt, ptr<const void>(w), u, ptr<void>(dx), M, N, K,
                                     ptr<void>(stream));
  }, nogil(), "dx = dy . deq(W) + scale left right^T, the update added after each chunk's GEMM "
              "(left [M, rank], right [K, rank]).");
  m.def("cuda_qmatmul_forward_expanded", [](int t, uintptr_t x, int dt, uintptr_t w, uintptr_t a, int pool,
                                            int repeat, float scale, uintptr_t y, int64_t M, int64_t N, int64_t K,
                                            uintptr_t stream) {
    cuda::LowRankUpdate u;
    u.a = ptr<const float>(a), u.pool = pool, u.repeat = repeat, u.scale = scale;
    cuda::qmatmul_forward_lowrank(t, ptr<const void>(x), dt, ptr<const void>(w), u, ptr<void>(y), M, N, K,
                                  ptr<void>(stream));
  }, nogil(), "y = x . (deq(W) + scale / pool a[i / repeat][j / pool])^T through the chunked cuBLAS path "
              "(a fp32 [N / repeat, K / pool]).");
  m.def("cuda_qmatmul_input_grad_expanded", [](int t, uintptr_t dy, int dt, uintptr_t w, uintptr_t a, int pool,
                                               int repeat, float scale, uintptr_t dx, int64_t M, int64_t N,
                                               int64_t K, uintptr_t stream) {
    cuda::LowRankUpdate u;
    u.a = ptr<const float>(a), u.pool = pool, u.repeat = repeat, u.scale = scale;
    cuda::qmatmul_input_grad_lowrank(t, ptr<const void>(dy), dt, ptr<const void>(w), u, ptr<void>(dx), M, N, K,
                                     ptr<void>(stream));
  }, nogil(), "dx = dy . (deq(W) + scale / pool a[i / repeat][j / pool]) through the chunked cuBLAS path.");
  m.def("cuda_qmatmul_forward_add_rms_norm", [](int t, uintptr_t x, uintptr_t r, uintptr_t nw, float eps,
                                                uintptr_t s, int dt, uintptr_t w, uintptr_t y, int64_t N, int64_t K,
                                                uintptr_t stream) {
    cuda::GemvPrologue p;
    p.kind = cuda::GemvPrologue::AddRmsNorm;
    p.b = ptr<const void>(r), p.w = ptr<const float>(nw), p.s = ptr<void>(s), p.eps = eps;
    return cuda::qmatmul_forward_one_row(t, p, ptr<const void>(x), dt, ptr<const void>(w), ptr<void>(y), N, K,
                                         ptr<void>(stream));
  }, nogil(), "y = rms_norm(x + r) * nw . deq(W)^T for one row, x + r written to s (r = 0: no residual), in the "
              "M = 1 kernel's preparation of x; False (nothing launched) where that kernel does not take the call.");
  m.def("cuda_qmatmul_forward_silu_mul", [](int t, uintptr_t g, uintptr_t u, int dt, uintptr_t w, uintptr_t y,
                                            int64_t N, int64_t K, uintptr_t stream) {
    cuda::GemvPrologue p;
    p.kind = cuda::GemvPrologue::SiluMul;
    p.b = ptr<const void>(u);
    return cuda::qmatmul_forward_one_row(t, p, ptr<const void>(g), dt, ptr<const void>(w), ptr<void>(y), N, K,
                                         ptr<void>(stream));
  }, nogil(), "y = (silu(g) * u) . deq(W)^T for one row, in the M = 1 kernel's preparation of x; False (nothing "
              "launched) where that kernel does not take the call.");
  // The reference CUDA kernels, for tests: same arguments as the cuda_* functions above.
  m.def("cuda_ref_dequantize", [](int t, uintptr_t q, uintptr_t out, int dt, int64_t n, int64_t k,
                                  uintptr_t stream) {
    cuda::reference::dequantize(t, ptr<const void>(q), ptr<void>(out), dt, n, k, ptr<void>(stream));
  }, nogil());
  m.def("cuda_ref_qmatmul_forward", [](int t, uintptr_t x, int dt, uintptr_t w, uintptr_t y, int64_t M,
                                       int64_t N, int64_t K, uintptr_t stream) {
    cuda::reference::qmatmul_forward(t, ptr<const void>(x), dt, ptr<const void>(w), ptr<void>(y), M, N,
                                     K, ptr<void>(stream));
  }, nogil());
  m.def("cuda_ref_qmatmul_input_grad", [](int t, uintptr_t dy, int dt, uintptr_t w, uintptr_t dx,
                                          int64_t M, int64_t N, int64_t K, uintptr_t stream) {
    cuda::reference::qmatmul_input_grad(t, ptr<const void>(dy), dt, ptr<const void>(w), ptr<void>(dx),
                                        M, N, K, ptr<void>(stream));
  }, nogil());

  // ---- adapters (csrc/adapter_kernels.h); lowtune.adapter_ops validates every argument -------
  // Geometry travels as (m, k, n, pool, repeat, rank, a_ld, b_ld, has_b, scale). The fast kernels
  // and their slow CPU twins (the *_reference names, for tests) take the same arguments.
  m.def("adapter_forward", adapter_forward_binding<cpu::adapter_forward>(), nogil());
  m.def("adapter_backward", adapter_backward_binding<cpu::adapter_backward>(), nogil());
  m.def("adapter_forward_reference", adapter_forward_binding<cpu::adapter_forward_reference>(), nogil());
  m.def("adapter_backward_reference", adapter_backward_binding<cpu::adapter_backward_reference>(), nogil());
  // ---- the CPU decoding step (csrc/decode_kernels.h); lowtune.generate builds and checks it ----
  // A matrix travels as (qtype, pointer, n, k); a layer as its seven matrices (q, k, v, o, gate,
  // up, down; then a shared expert's gate, up, down where it has one), its (attn_norm, ffn_norm,
  // k_cache, v_cache, the seven matrices' biases, q_norm, k_norm, post_attn_norm, post_ffn_norm,
  // router, the shared expert's gate, the router's bias, the experts' gate, up and down biases,
  // the experts' selection bias, sinks, attn_norm's and ffn_norm's LayerNorm biases, xIELU's four
  // scalars) pointers (0: none, for all but the caches), its rope kind
  // and window; the config as (dim, n_heads, n_kv_heads, head_dim, rope_dim, ffn_dim, vocab,
  // max_len, norm_eps), (neox, attn_scale, embedding_scale, residual_scale, logit_scale,
  // activation (cpu::Activation), attn_softcap, final_softcap, rope_kinds, qk_norm_whole,
  // layer_norm, parallel, qk_norm_after_rope) and (n_experts, n_experts_used, expert_ffn, shared_ffn, moe_renorm,
  // expert_gating); output_norm_bias: the final LayerNorm's bias (0: none).
  using Mat = std::tuple<int, uintptr_t, int64_t, int64_t>;
  auto mat = [](const Mat& t) {
    return cpu::DecodeMatrix{std::get<0>(t), ptr<const void>(std::get<1>(t)), std::get<2>(t), std::get<3>(t)};
  };
  py::class_<cpu::Decoder>(m, "CpuDecoder")
      .def(py::init([mat](std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float> c,
                          std::tuple<bool, float, float, float, float, int, float, float, int, bool, bool, bool,
                                     bool> f,
                          std::tuple<int64_t, int64_t, int64_t, int64_t, bool, int> moe,
                          const std::vector<std::tuple<std::vector<Mat>, std::vector<uintptr_t>, int, int64_t>>& layers,
                          const Mat& embedding, const Mat& head, uintptr_t output_norm, uintptr_t rope,
                          uintptr_t output_norm_bias) {
        auto [dim, nh, nkv, hd, rd, ffn, vocab, max_len, eps] = c;
        auto [neox, attn_scale, embedding_scale, residual_scale, logit_scale, act, attn_cap, final_cap, kinds,
              qk_whole, layer_norm, parallel, qk_late] = f;
        std::vector<cpu::DecodeLayer> ls;
        for (const auto& [ms, ps, rope_kind, window] : layers) {
          if ((ms.size() != 7 && ms.size() != 10) || ps.size() != 26)
            throw std::invalid_argument("decoder: a layer is 7 (or 10) matrices and 26 pointers");
          cpu::DecodeLayer l{mat(ms[0]), mat(ms[1]), mat(ms[2]), mat(ms[3]), mat(ms[4]), mat(ms[5]), mat(ms[6]),
                             ptr<const float>(ps[0]), ptr<const float>(ps[1]), ptr<float>(ps[2]), ptr<float>(ps[3])};
          for (int i = 0; i < 7; ++i) l.bias[i] = ptr<const float>(ps[4 + i]);
          l.q_norm = ptr<const float>(ps[11]), l.k_norm = ptr<const float>(ps[12]);
          l.post_attn_norm = ptr<const float>(ps[13]), l.post_ffn_norm = ptr<const float>(ps[14]);
          l.router = ptr<const float>(ps[15]), l.shared_gate_inp = ptr<const float>(ps[16]);
          l.router_bias = ptr<const float>(ps[17]);
          for (int i = 0; i < 3; ++i) l.expert_bias[i] = ptr<const float>(ps[18 + i]);
          l.selection_bias = ptr<const float>(ps[21]), l.sinks = ptr<const float>(ps[22]);
          l.attn_norm_bias = ptr<const float>(ps[23]), l.ffn_norm_bias = ptr<const float>(ps[24]);
          l.xielu = ptr<const float>(ps[25]);
          if (ms.size() == 10) l.shared_gate = mat(ms[7]), l.shared_up = mat(ms[8]), l.shared_down = mat(ms[9]);
          l.rope_kind = rope_kind, l.window = window;
          ls.push_back(l);
        }
        cpu::DecodeConfig config{dim, nh, nkv, hd, rd, ffn, vocab, max_len, eps};
        config.neox = neox, config.attn_scale = attn_scale, config.embedding_scale = embedding_scale;
        config.residual_scale = residual_scale, config.logit_scale = logit_scale;
        if (act < 0 || act > 5) throw std::invalid_argument("decoder: unknown activation");
        config.activation = static_cast<cpu::Activation>(act);
        config.attn_softcap = attn_cap, config.final_softcap = final_cap, config.rope_kinds = kinds;
        config.qk_norm_whole = qk_whole, config.layer_norm = layer_norm, config.parallel = parallel;
        config.qk_norm_after_rope = qk_late;
        std::tie(config.n_experts, config.n_experts_used, config.expert_ffn, config.shared_ffn,
                 config.moe_renorm, config.expert_gating) = moe;
        if (config.expert_gating != 1 && config.expert_gating != 3)
          throw std::invalid_argument("decoder: expert gating is 1 or 3");
        return new cpu::Decoder(config, std::move(ls), mat(embedding), mat(head), ptr<const float>(output_norm),
                                ptr<const float>(rope), ptr<const float>(output_norm_bias));
      }))
      .def("step", [](cpu::Decoder& d, int64_t token, int64_t pos, uintptr_t logits) {
        d.step(token, pos, ptr<float>(logits));
      }, nogil());

  m.def("cuda_adapter_forward", [](int64_t M, int64_t K, int64_t N, int64_t p, int64_t q, int64_t r,
                                   int64_t a_ld, int64_t b_ld, bool has_b, float scale, uintptr_t x,
                                   int dt, uintptr_t A, uintptr_t B, uintptr_t y, uintptr_t u,
                                   uintptr_t xs_out, uintptr_t stream) {
    cuda::adapter_forward(AdapterGeom{M, K, N, p, q, r, a_ld, b_ld, has_b, scale}, ptr<const void>(x), dt,
                          ptr<const float>(A), ptr<const float>(B), ptr<void>(y), ptr<float>(u),
                          ptr<void>(xs_out), ptr<void>(stream));
  }, nogil());
  m.def("cuda_adapter_pool", [](uintptr_t x, int dt, uintptr_t xs, int64_t M, int64_t K, int64_t pool,
                                uintptr_t stream) {
    cuda::adapter_pool(ptr<const void>(x), dt, ptr<void>(xs), M, K, pool, ptr<void>(stream));
  }, nogil(), "xs [M, K/pool] = x [M, K] averaged over each `pool` adjacent columns (CUDA).");
  m.def("cuda_adapter_dual_products", [](uintptr_t dy, int dt, uintptr_t B, uintptr_t u, uintptr_t g, uintptr_t dB,
                                         int64_t M, int64_t N, int64_t r, float scale, uintptr_t stream) {
    cuda::adapter_dual_products(ptr<const void>(dy), dt, ptr<const void>(B), ptr<const void>(u), ptr<float>(g),
                                ptr<float>(dB), M, N, r, scale, ptr<void>(stream));
  }, nogil(), "g [M, r] += scale dy B and dB [N, r] += scale dy^T u from one read of dy [M, N] (CUDA).");
  m.def("cuda_adapter_rank_update", [](uintptr_t out, int dt, uintptr_t left, uintptr_t right, int64_t M, int64_t C,
                                       int64_t r, bool right_kmajor, float alpha, uintptr_t stream) {
    cuda::adapter_rank_update(ptr<void>(out), dt, ptr<const void>(left), ptr<const void>(right), M, C, r, right_kmajor,
                              alpha, ptr<void>(stream));
  }, nogil(), "out [M, C] += alpha left right^T in one pass over out (right [C, r], or [r, C] when right_kmajor; "
              "CUDA).");
  m.def("cuda_adapter_backward", [](int64_t M, int64_t K, int64_t N, int64_t p, int64_t q, int64_t r,
                                    int64_t a_ld, int64_t b_ld, bool has_b, float scale, uintptr_t dy,
                                    int dt, uintptr_t xs, int64_t xs_pool, uintptr_t A, uintptr_t B,
                                    uintptr_t u, uintptr_t dx, uintptr_t dA, uintptr_t dB,
                                    uintptr_t du, uintptr_t stream) {
    cuda::adapter_backward(AdapterGeom{M, K, N, p, q, r, a_ld, b_ld, has_b, scale}, ptr<const void>(dy), dt,
                           ptr<const void>(xs), xs_pool, ptr<const float>(A), ptr<const float>(B),
                           ptr<const float>(u), ptr<void>(dx), ptr<float>(dA), ptr<float>(dB),
                           ptr<float>(du), ptr<void>(stream));
  }, nogil());
  m.def("cuda_rms_norm", [](uintptr_t x, int dt, uintptr_t w, uintptr_t y, int64_t rows, int64_t dim, float eps,
                            uintptr_t stream, uintptr_t r, uintptr_t s) {
    cuda::rms_norm(ptr<const void>(x), dt, ptr<const float>(w), ptr<void>(y), rows, dim, eps, ptr<void>(stream),
                   ptr<const void>(r), ptr<void>(s));
  }, py::arg("x"), py::arg("dtype"), py::arg("w"), py::arg("y"), py::arg("rows"), py::arg("dim"), py::arg("eps"),
     py::arg("stream"), py::arg("r") = 0, py::arg("s") = 0, nogil(),
     "RMSNorm of rows x dim; with r (a residual, same shape), x + r is written to s and normalized.");
  m.def("cuda_rms_norm_vectorized", [](int dt, int64_t dim, uintptr_t x, uintptr_t r, uintptr_t y, uintptr_t s) {
    return cuda::rms_norm_vectorized(dt, dim, ptr<const void>(x), ptr<const void>(r), ptr<const void>(y),
                                     ptr<const void>(s));
  });
  m.def("cuda_rope", [](uintptr_t x, int dt, uintptr_t rot, uintptr_t y, int64_t b, int64_t h, int64_t t,
                        int64_t hd, int64_t d, int64_t sb, int64_t sh, int64_t st, bool neox, uintptr_t stream) {
    cuda::rope(ptr<const void>(x), dt, ptr<const float>(rot), ptr<void>(y), b, h, t, hd, d, sb, sh, st, neox,
               ptr<void>(stream));
  }, nogil());
  // geom: (b, t, h, hkv, hd, d, cache_len, q strides (3), k strides (3), v strides (3), neox)
  m.def("cuda_rope_store", [](py::tuple geom, uintptr_t q, uintptr_t k, uintptr_t v, int dt, uintptr_t rot,
                              uintptr_t q_out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t pos, uintptr_t stream) {
    if (geom.size() != 17) throw std::invalid_argument("cuda_rope_store: geom has 17 entries");
    cuda::RopeStoreGeom g{};
    int64_t* dims[] = {&g.b, &g.t, &g.h, &g.hkv, &g.hd, &g.d, &g.cache_len};
    for (int i = 0; i < 7; ++i) *dims[i] = geom[i].cast<int64_t>();
    for (int i = 0; i < 3; ++i) {
      g.q_strides[i] = geom[7 + i].cast<int64_t>();
      g.k_strides[i] = geom[10 + i].cast<int64_t>();
      g.v_strides[i] = geom[13 + i].cast<int64_t>();
    }
    g.neox = geom[16].cast<bool>();
    py::gil_scoped_release release;
    cuda::rope_store(g, ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), dt, ptr<const float>(rot),
                     ptr<void>(q_out), ptr<void>(k_cache), ptr<void>(v_cache), ptr<const int64_t>(pos),
                     ptr<void>(stream));
  });
  m.def("cuda_decode_attention_fits", &cuda::decode_attention_fits);
  m.def("cuda_decode_attention", [](uintptr_t q, uintptr_t k, uintptr_t v, int dt, uintptr_t out, uintptr_t pos,
                                    int64_t h, int64_t hkv, int64_t hd, int64_t len, float scale, uintptr_t stream) {
    cuda::decode_attention(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v), dt, ptr<void>(out),
                           ptr<const int64_t>(pos), h, hkv, hd, len, scale, ptr<void>(stream));
  }, nogil());
  m.def("cuda_silu_mul", [](uintptr_t g, uintptr_t u, int dt, uintptr_t y, int64_t n, uintptr_t stream) {
    cuda::silu_mul(ptr<const void>(g), ptr<const void>(u), dt, ptr<void>(y), n, ptr<void>(stream));
  }, nogil());
}
