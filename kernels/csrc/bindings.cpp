// Python bindings of the qaas CUDA kernels. The functions are registered as the CUDA kernels of the
// `qaas::*` custom ops by kernels/ops.py (the schemas and CPU reference kernels live there).
#include <torch/extension.h>

namespace qaas {
std::tuple<at::Tensor, at::Tensor> act_quant_cuda(const at::Tensor& x, int64_t bits, const at::Tensor& clip,
                                                  int64_t mode, int64_t hb, const c10::optional<at::Tensor>& p1,
                                                  const c10::optional<at::Tensor>& p2,
                                                  const c10::optional<at::Tensor>& frags);
at::Tensor act_quant_fragments_cuda(const at::Tensor& x, int64_t mode, int64_t hb, const c10::optional<at::Tensor>& p1,
                                    const c10::optional<at::Tensor>& p2);
at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale, const at::Tensor& zero,
                           int64_t group_size, const c10::optional<at::Tensor>& bias);
at::Tensor w4a16_gemm_variant_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale,
                                   const at::Tensor& zero, int64_t group_size, const c10::optional<at::Tensor>& bias,
                                   int64_t variant);
int64_t w4a16_num_variants();
at::Tensor w4a16_gemm_packed_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& meta,
                                  int64_t group_size, const c10::optional<at::Tensor>& bias, bool pdl);
at::Tensor w4a16_gemm_packed_variant_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& meta,
                                          int64_t group_size, const c10::optional<at::Tensor>& bias,
                                          int64_t variant);
int64_t w4a16_packed_num_variants();
at::Tensor w4a16_gemm_packed_tiled_cuda(const at::Tensor& x, const at::Tensor& qt, const at::Tensor& meta,
                                        int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t n,
                                        int64_t variant);
at::Tensor w4a16_gemm_batched_cuda(const at::Tensor& x, const at::Tensor& qt, const at::Tensor& meta,
                                   int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t n,
                                   int64_t variant, int64_t splits);
int64_t w4a16_batched_num_variants();
at::Tensor w4a16_gemm_sm90_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                const at::Tensor& zero, int64_t group_size, const c10::optional<at::Tensor>& bias,
                                int64_t config, int64_t splits);
at::Tensor w4a16_sm90_reorder_cuda(const at::Tensor& codes);
int64_t w4a16_sm90_num_configs();
at::Tensor memory_probe_cuda(const at::Tensor& src, int64_t mode);
at::Tensor dequant_w4_cuda(const at::Tensor& qw, const at::Tensor& scale, const at::Tensor& zero, int64_t group_size,
                           bool tiled);
at::Tensor int8_gemm_cuda(const at::Tensor& a, int64_t a_bits, const at::Tensor& a_scale, const at::Tensor& w,
                          int64_t w_bits, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias);
at::Tensor scale_epilogue_cuda(const at::Tensor& acc, const at::Tensor& a_scale, const at::Tensor& w_scale,
                               const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> act_quant_s8_cuda(const at::Tensor& x, const at::Tensor& clip,
                                                                 int64_t mode, int64_t hb,
                                                                 const c10::optional<at::Tensor>& p1,
                                                                 const c10::optional<at::Tensor>& p2,
                                                                 const c10::optional<at::Tensor>& frags);
at::Tensor w8a8_gemm_sm90_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_corr,
                               const at::Tensor& w, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                               int64_t config);
bool has_sm90_gemm();
at::Tensor unpack_w4_u8_cuda(const at::Tensor& qw);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cuda(const at::Tensor& x, int64_t bits, bool symmetric,
                                                                double clip);
at::Tensor kv_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                                    const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                                    const at::Tensor& v_zero, int64_t bits, const at::Tensor& seq_lens,
                                    double sm_scale);
}  // namespace qaas

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qaas CUDA kernels (sm_90a)";
  m.def("act_quant", &qaas::act_quant_cuda, "fused online transform + per-token symmetric activation quantisation",
        py::arg("x"), py::arg("bits"), py::arg("clip"), py::arg("mode"), py::arg("hb"), py::arg("p1"), py::arg("p2"),
        py::arg("frags") = py::none());
  m.def("act_quant_fragments", &qaas::act_quant_fragments_cuda,
        "the transform's factors staged once for the tensor-core act_quant kernel (its frags argument; empty where "
        "that kernel does not run)");
  m.def("w4a16_gemm", &qaas::w4a16_gemm_cuda, "int4 weight x fp16 activation GEMV (<= 16 rows)");
  m.def("w4a16_gemm_variant", &qaas::w4a16_gemm_variant_cuda,
        "w4a16_gemm with an explicit tensor-core decode variant (benchmarks; -1 = default)");
  m.def("w4a16_num_variants", &qaas::w4a16_num_variants, "number of tensor-core decode variants");
  m.def("w4a16_gemm_packed", &qaas::w4a16_gemm_packed_cuda,
        "int4 weight x fp16 activation GEMV (<= 16 rows) with packed scale/zero words (pack_w4_meta); pdl: "
        "programmatic dependent launch (the previous kernel in the stream must not write the weights)");
  m.def("w4a16_gemm_packed_variant", &qaas::w4a16_gemm_packed_variant_cuda,
        "w4a16_gemm_packed with an explicit variant (benchmarks; -1 = default)");
  m.def("w4a16_packed_num_variants", &qaas::w4a16_packed_num_variants, "number of packed-metadata decode variants");
  m.def("w4a16_gemm_packed_tiled", &qaas::w4a16_gemm_packed_tiled_cuda,
        "w4a16_gemm_packed over codes in the tiled order of reference.pack_w4_tiled (n output features; variant 0-7: "
        "16 warps x 1 block, x 2 blocks, 3 blocks/SM, 2 tiles per block; 8-9: persistent with the zero points folded out "
        "(w4a16_folded.cu); even plain, odd PDL)");
  m.def("w4a16_gemm_batched", &qaas::w4a16_gemm_batched_cuda,
        "int4 weight x fp16 activation GEMM for batched decode / short prefills (any M) over tiled codes and packed "
        "metadata (n output features; variant -1 by M, 0-3: see w4a16_batched.cu; splits: cluster blocks splitting K, "
        "-1 by occupancy)",
        pybind11::arg("x"), pybind11::arg("qt"), pybind11::arg("meta"), pybind11::arg("group_size"),
        pybind11::arg("bias"), pybind11::arg("n"), pybind11::arg("variant") = -1, pybind11::arg("splits") = -1);
  m.def("w4a16_batched_num_variants", &qaas::w4a16_batched_num_variants, "number of batched W4A16 GEMM variants");
  m.def("w4a16_gemm_sm90", &qaas::w4a16_gemm_sm90_cuda,
        "int4 weight x fp16 activation GEMM on Hopper wgmma (CUTLASS mixed-input collective, stream-K scheduler): "
        "codes [N, K/2] reordered by w4a16_sm90_reorder, fp16 scale "
        "and zero term [G, N]; config -1: by M; splits -1 heuristic, 1 data-parallel, > 1 split-K",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("group_size"), py::arg("bias"),
        py::arg("config") = -1, py::arg("splits") = -1);
  m.def("w4a16_sm90_reorder", &qaas::w4a16_sm90_reorder_cuda,
        "int4 codes [N, K/2] in row order -> the reordered layout of the sm90 W4A16 GEMM");
  m.def("w4a16_sm90_num_configs", &qaas::w4a16_sm90_num_configs, "number of sm90 W4A16 GEMM configurations (0 without CUTLASS)");
  m.def("memory_probe", &qaas::memory_probe_cuda,
        "benchmark probe: empty kernel (0) or a read of the whole buffer (1 one pass, 2 persistent at 4 blocks/SM, "
        "3 / 4 persistent at 2 blocks/SM with 2 / 4 loads in flight per thread; probes.cu)");
  m.def("dequant_w4", &qaas::dequant_w4_cuda,
        "int4 weight -> fp16 dequantisation (tiled: codes in the decode kernel's tiled order, reference.pack_w4_tiled)",
        pybind11::arg("qweight"), pybind11::arg("scale"), pybind11::arg("zero"), pybind11::arg("group_size"),
        pybind11::arg("tiled") = false);
  m.def("int8_gemm", &qaas::int8_gemm_cuda, "int8 tensor-core GEMM with scale epilogue (int8/int4 operands)");
  m.def("scale_epilogue", &qaas::scale_epilogue_cuda, "int32 accumulator -> fp16 scale epilogue (int_mm baseline)");
  m.def("act_quant_s8", &qaas::act_quant_s8_cuda,
        "fused online transform + per-token int8 quantisation to SIGNED codes, with 128 * row sums (sm90 GEMM input)",
        py::arg("x"), py::arg("clip"), py::arg("mode"), py::arg("hb"), py::arg("p1"), py::arg("p2"),
        py::arg("frags") = py::none());
  m.def("w8a8_gemm_sm90", &qaas::w8a8_gemm_sm90_cuda,
        "W8A8 GEMM on Hopper wgmma (CUTLASS collective): signed int8 activations x uint8 weight codes, scale epilogue");
  m.def("unpack_w4_u8", &qaas::unpack_w4_u8_cuda,
        "int4 weight codes -> uint8 codes + 120 (zero point 128): W4 weights on the sm90 GEMM");
  m.def("kv_quantize", &qaas::kv_quantize_cuda,
        "per-token-per-head KV-cache quantisation over head_dim: (uint8 codes, fp32 scale, fp32 zero)");
  m.def("kv_decode_attention", &qaas::kv_decode_attention_cuda,
        "split-K decode attention over an int8/int4 quantised KV cache (GQA, ragged seq_lens), fp16 out");
  m.def("has_sm90_gemm", &qaas::has_sm90_gemm, "whether the extension was built with the CUTLASS sm90 GEMM");
}
