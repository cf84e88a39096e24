// The Python module of the CPU kernels (kernels/cpu/__init__.py loads it).

#include <torch/extension.h>

void paged_attention_decode(at::Tensor out, at::Tensor query, at::Tensor k_cache,
                            at::Tensor v_cache, at::Tensor block_tables, at::Tensor context_lens,
                            double scale, int64_t window,
                            c10::optional<at::Tensor> query_start_loc);
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps,
              c10::optional<at::Tensor> residual, c10::optional<at::Tensor> new_residual);
void rotary_embedding(at::Tensor positions, at::Tensor x, at::Tensor cos, at::Tensor sin,
                      int64_t rotary_dim);
bool vectorized_decode(int64_t head_dim);
void silu_and_mul(at::Tensor out, at::Tensor x);
at::Tensor pack_linear_weight(at::Tensor w);
void packed_linear(at::Tensor out, at::Tensor x, at::Tensor packed,
                   c10::optional<at::Tensor> bias);
void store_kv(at::Tensor key, at::Tensor value, at::Tensor k_cache, at::Tensor v_cache,
              at::Tensor slot_mapping);
void greedy_sample(at::Tensor tokens, at::Tensor logprobs, at::Tensor logits);

// The AVX-512 paths are in (linear.cpp; decode attention: see vectorized_decode).
bool built_with_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode);
  m.def("rms_norm", &rms_norm);
  m.def("rotary_embedding", &rotary_embedding);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("store_kv", &store_kv);
  m.def("greedy_sample", &greedy_sample);
  m.def("built_with_avx512", &built_with_avx512);
  m.def("vectorized_decode", &vectorized_decode);
  m.def("pack_linear_weight", &pack_linear_weight);
  m.def("packed_linear", &packed_linear);
}
