// Float32 linear layers for CPUs with AVX-512: out = x @ W^T (+ bias), W packed once into
// panels of 16 output columns ([N/16][K][16]: a panel's row k is one vector).
//
// Each panel is swept over K once per 8 rows of x, 8 accumulators (one per row; fewer rows
// split K so that 8 chains still hide the FMA latency). While a thread reads a panel for its
// rows it prefetches its next panel into L2, the lines shared out over the tiles of rows so
// that the prefetches do not come in a burst (3% faster at 32 rows than all in the first
// tile): at the 32 rows of a decode step the weights stream from memory at every step, and
// oneDNN, with no such prefetch, spends a quarter of its time waiting for them (measured on
// 2 EPYC cores, the throughput benchmark's model: 8.5-9.0 ms a step where oneDNN takes 10.6;
// at 2,048 rows the two are level).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>

namespace {

constexpr int64_t kPanel = 16;  // output columns per panel: one vector
constexpr int kRows = 8;        // rows of x per tile: 8 accumulator chains
constexpr int64_t kBlockBytes = 512 << 10;  // of x per pass over the panels (half an L2)

#if defined(__AVX512F__)
// R rows of x times one panel, over all of K, into out[r] (R vectors). `next`: lines of the
// panel to fetch into L2 meanwhile, one in `every` (or null).
template <int R>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t K, const float* next,
                 int64_t every, __m512* out) {
  constexpr int U = (kRows + R - 1) / R;  // K split U ways: R * U >= 8 chains
  __m512 acc[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) acc[u][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u) {
      const __m512 w = _mm512_loadu_ps(panel + (k + u) * kPanel);
      if (next != nullptr && ((k + u) & (every - 1)) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(next + (k + u) * kPanel), _MM_HINT_T1);
      for (int r = 0; r < R; ++r)
        acc[u][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k + u]), w, acc[u][r]);
    }
  }
  for (; k < K; ++k) {
    const __m512 w = _mm512_loadu_ps(panel + k * kPanel);
    if (next != nullptr && (k & (every - 1)) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel), _MM_HINT_T1);
    for (int r = 0; r < R; ++r)
      acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), w, acc[0][r]);
  }
  for (int r = 0; r < R; ++r) {
    out[r] = acc[0][r];
    for (int u = 1; u < U; ++u) out[r] = _mm512_add_ps(out[r], acc[u][r]);
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, int64_t,
                       __m512*);
constexpr TileFn kTiles[kRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>,
                                      tile<5>, tile<6>, tile<7>, tile<8>};
#endif

}  // namespace

// w [N, K] float32 -> [ceil(N / 16), K, 16], columns past N zero.
at::Tensor pack_linear_weight(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_linear_weight: [N, K] float32");
  const int64_t n = w.size(0), k = w.size(1), panels = (n + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({panels * kPanel, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// out [M, N] = x [M, K] (rows may be strided) @ W^T + bias; `packed` from pack_linear_weight.
void packed_linear(at::Tensor out, at::Tensor x, at::Tensor packed,
                   c10::optional<at::Tensor> bias) {
#if defined(__AVX512F__)
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), panels = packed.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(1) == 1 && out.is_contiguous() &&
              packed.is_contiguous() && packed.size(1) == K && panels * kPanel >= N,
              "packed_linear: float32 x [M, K] with contiguous rows, a packed weight of K");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == N), "packed_linear: bias [N]");
  const float* xs = x.data_ptr<float>();
  const float* w = packed.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  // Rows of x per pass over a thread's panels: what stays in L2 (256 at K = 512). With every
  // row in one pass, each panel re-read all of x from L3 and a 2,048-row prefill ran 3-7%
  // slower than 512 rows.
  const int64_t block = std::max<int64_t>(kRows, (kBlockBytes / (K * 4)) / kRows * kRows);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    __m512 rows[kRows];
    for (int64_t m0 = 0; m0 < M; m0 += block) {
      const int64_t m1 = std::min(M, m0 + block);
      // The next panel's lines shared out over this block's tiles: tile t fetches lines
      // t, t + T, t + 2T... (T tiles, rounded down to a power of two).
      int64_t every = 1;
      while (every * 2 * kRows <= m1 - m0) every *= 2;
      for (int64_t p = begin; p < end; ++p) {
        const float* panel = w + p * K * kPanel;
        // The panel after this one, or the first one again for the next block of rows.
        const float* next = p + 1 < end ? panel + K * kPanel
                            : m1 < M   ? w + begin * K * kPanel
                                       : nullptr;
        const int64_t col = p * kPanel, width = std::min(kPanel, N - col);
        const __mmask16 mask = __mmask16((1u << width) - 1);
        const __m512 add =
            b != nullptr ? _mm512_maskz_loadu_ps(mask, b + col) : _mm512_setzero_ps();
        for (int64_t m = m0, t = 0; m < m1; m += kRows, ++t) {
          const int64_t r = std::min<int64_t>(kRows, m1 - m);
          const float* fetch = next != nullptr && t < every ? next + t * kPanel : nullptr;
          kTiles[r](xs + m * ldx, ldx, panel, K, fetch, every, rows);
          for (int64_t i = 0; i < r; ++i)
            _mm512_mask_storeu_ps(o + (m + i) * N + col, mask, _mm512_add_ps(rows[i], add));
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "packed_linear needs AVX-512 (see built_with_avx512)");
#endif
}
