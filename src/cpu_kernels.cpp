#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GRADLORA_KERNELS 1
#define GRADLORA_TARGET __attribute__((target("avx512f")))
#define GRADLORA_INLINE GRADLORA_TARGET __attribute__((always_inline)) inline
// After a lambda's parameter list: its body is compiled for the kernels' target and inlined.
#define GRADLORA_LAMBDA GRADLORA_TARGET __attribute__((always_inline))
#endif

namespace gradlora::cpu {

namespace {

std::atomic<bool> g_enabled{true};

// Rows are split into at most kChunks chunks (of at least kMinChunkRows rows): the partial
// sums of Aᵀ·G are per chunk and added in chunk order, so the result does not depend on
// how many threads ran the chunks.
constexpr int64_t kChunks = 8;
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kPanelRows = 16;  // rows whose Σ_j G·B partials stay in registers' reach
constexpr int64_t kLanes = 16;

int64_t chunk_rows(int64_t n) {
  const int64_t chunks = std::clamp<int64_t>(n / kMinChunkRows, 1, kChunks);
  return (n + chunks - 1) / chunks;
}

// Columns per block of the projection, so that the block's rows of B and of the Aᵀ·G partial
// (2·r·w floats) stay in a 32 KiB share of the L1 cache while the rows of G stream past; but
// at least 512 (2 KiB of each row of G): shorter runs of a row defeat the hardware
// prefetcher, and at r = 32 (128 columns) the projection ran 1.5× slower from memory.
int64_t block_cols(int64_t q, int64_t arrays) {
  const int64_t w = (32 * 1024 / 4) / std::max<int64_t>(q * arrays, 1);
  return std::max<int64_t>(512, w / kLanes * kLanes);
}

// Columns per block of a write-back: whole rows up to 4096 floats. The block's rows of the
// terms' right factors (q·w floats) then sit in the L2 cache, and P streams row by row.
constexpr int64_t kUpdateCols = 4096;

// How far ahead in its row (in floats) the projection asks for G: the next block's run.
constexpr int64_t kPrefetch = 512;

// Sum of 16 lanes in a fixed order.
float lane_sum(const float* v) {
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) h[l] += h[l + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
}

#ifdef GRADLORA_KERNELS

// A run of 16 lanes is either whole (plain loads and stores) or the tail of a row (masked
// ones). Only the tail takes masks: on some CPUs a masked store costs about twice a plain one
// (AMD Zen 5 here: a 4096×4096 P += s·b pass took 5.8 ms with masks and 3.0 ms without).
struct Whole {};
struct Tail {
  __mmask16 k;
};
GRADLORA_INLINE __m512 load(const float* p, Whole) { return _mm512_loadu_ps(p); }
GRADLORA_INLINE __m512 load(const float* p, Tail t) { return _mm512_maskz_loadu_ps(t.k, p); }
GRADLORA_INLINE void store(float* p, __m512 v, Whole) { _mm512_storeu_ps(p, v); }
GRADLORA_INLINE void store(float* p, __m512 v, Tail t) { _mm512_mask_storeu_ps(p, t.k, v); }

// body(j, lane) for j = j0, j0 + 16, … below j1: whole runs, then the tail (if any).
template <typename Body>
GRADLORA_INLINE void for_lanes(int64_t j0, int64_t j1, Body&& body) {
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) body(j, Whole{});
  if (j < j1) body(j, Tail{static_cast<__mmask16>((1u << (j1 - j)) - 1u)});
}

// Rows i..i+R−1 of G (g, stride ldg), factor columns k..k+KG−1, columns [j0, j1):
//   acc[ii][kk] (16 lane partials in vacc, row stride vstride) += G[i+ii, j]·B[k+kk, j]
//   gb[kk][j] += A[i+ii, k+kk]·G[i+ii, j]
// With `prefetch` (the first factor group of a block), each row's next run is asked for.
template <int R, int KG, bool WA, bool WB>
GRADLORA_TARGET void project_micro(const float* g, int64_t ldg, const float* a, int64_t lda, const float* b, float* gb,
                                   int64_t m, int64_t j0, int64_t j1, float* vacc, int64_t vstride, bool prefetch) {
  __m512 acc[R][KG];
  __m512 av[R][KG];
  for (int ii = 0; ii < R; ++ii) {
    for (int kk = 0; kk < KG; ++kk) {
      if (WA) acc[ii][kk] = _mm512_loadu_ps(vacc + ii * vstride + kk * kLanes);
      if (WB) av[ii][kk] = _mm512_set1_ps(a[ii * lda + kk]);
    }
  }
  for_lanes(j0, j1, [&](int64_t j, auto lane) GRADLORA_LAMBDA {
    __m512 gv[R];
    if (prefetch) {
      for (int ii = 0; ii < R; ++ii)
        _mm_prefetch(reinterpret_cast<const char*>(g + ii * ldg + j + kPrefetch), _MM_HINT_T1);
    }
    for (int ii = 0; ii < R; ++ii) gv[ii] = load(g + ii * ldg + j, lane);
    for (int kk = 0; kk < KG; ++kk) {
      if (WA) {
        const __m512 bv = load(b + kk * m + j, lane);
        for (int ii = 0; ii < R; ++ii) acc[ii][kk] = _mm512_fmadd_ps(gv[ii], bv, acc[ii][kk]);
      }
      if (WB) {
        __m512 x = load(gb + kk * m + j, lane);
        for (int ii = 0; ii < R; ++ii) x = _mm512_fmadd_ps(av[ii][kk], gv[ii], x);
        store(gb + kk * m + j, x, lane);
      }
    }
  });
  if (WA) {
    for (int ii = 0; ii < R; ++ii) {
      for (int kk = 0; kk < KG; ++kk) _mm512_storeu_ps(vacc + ii * vstride + kk * kLanes, acc[ii][kk]);
    }
  }
}

using ProjectFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                           int64_t, float*, int64_t, bool);

template <bool WA, bool WB>
ProjectFn project_kernel(int rows, int kg) {
  static const ProjectFn table[2][4] = {{project_micro<1, 1, WA, WB>, project_micro<1, 2, WA, WB>,
                                         project_micro<1, 3, WA, WB>, project_micro<1, 4, WA, WB>},
                                        {project_micro<2, 1, WA, WB>, project_micro<2, 2, WA, WB>,
                                         project_micro<2, 3, WA, WB>, project_micro<2, 4, WA, WB>}};
  return table[rows - 1][kg - 1];
}

// Rows [c0, c1) of the projection: gA rows (scaled by s) and this chunk's Aᵀ·G partial gbp.
template <bool WA, bool WB>
void project_chunk(const float* G, int64_t ldg, int64_t c0, int64_t c1, int64_t m, const float* A, const float* B,
                   int64_t r, float s, float* gA, float* gbp) {
  const int64_t w = block_cols(r, (WA ? 1 : 0) + (WB ? 1 : 0));
  const int64_t vstride = r * kLanes;
  std::vector<float> vacc(WA ? static_cast<size_t>(kPanelRows * vstride) : 0);
  for (int64_t p0 = c0; p0 < c1; p0 += kPanelRows) {
    const int64_t p1 = std::min(p0 + kPanelRows, c1);
    if (WA) std::fill(vacc.begin(), vacc.end(), 0.0f);
    for (int64_t j0 = 0; j0 < m; j0 += w) {
      const int64_t j1 = std::min(j0 + w, m);
      for (int64_t i = p0; i < p1; i += 2) {
        const int rows = static_cast<int>(std::min<int64_t>(2, p1 - i));
        for (int64_t k = 0; k < r; k += 4) {
          const int kg = static_cast<int>(std::min<int64_t>(4, r - k));
          project_kernel<WA, WB>(rows, kg)(
              G + i * ldg, ldg, WB ? A + i * r + k : nullptr, r, WA ? B + k * m : nullptr, WB ? gbp + k * m : nullptr,
              m, j0, j1, WA ? vacc.data() + (i - p0) * vstride + k * kLanes : nullptr, vstride, k == 0);
        }
      }
    }
    if (WA) {
      for (int64_t i = p0; i < p1; ++i) {
        for (int64_t k = 0; k < r; ++k) gA[i * r + k] = s * lane_sum(vacc.data() + (i - p0) * vstride + k * kLanes);
      }
    }
  }
}

// Rows i..i+R−1 of a rank-q term, factor columns k..k+KG−1, into the float accumulator
// rows acc (stride w) for columns [j0, j1) (relative column 0 = j0).
template <int R, int KG>
GRADLORA_TARGET void update_micro(float* acc, int64_t w, const float* l, int64_t q, const float* rt, int64_t m,
                                  int64_t j0, int64_t j1) {
  __m512 lv[R][KG];
  for (int ii = 0; ii < R; ++ii) {
    for (int kk = 0; kk < KG; ++kk) lv[ii][kk] = _mm512_set1_ps(l[ii * q + kk]);
  }
  for_lanes(j0, j1, [&](int64_t j, auto lane) GRADLORA_LAMBDA {
    __m512 rv[KG];
    for (int kk = 0; kk < KG; ++kk) rv[kk] = load(rt + kk * m + j, lane);
    for (int ii = 0; ii < R; ++ii) {
      float* out = acc + ii * w + (j - j0);
      __m512 x = load(out, lane);
      for (int kk = 0; kk < KG; ++kk) x = _mm512_fmadd_ps(lv[ii][kk], rv[kk], x);
      store(out, x, lane);
    }
  });
}

using UpdateFn = void (*)(float*, int64_t, const float*, int64_t, const float*, int64_t, int64_t, int64_t);

UpdateFn update_kernel(int rows, int kg) {
  static const UpdateFn table[4][4] = {
      {update_micro<1, 1>, update_micro<1, 2>, update_micro<1, 3>, update_micro<1, 4>},
      {update_micro<2, 1>, update_micro<2, 2>, update_micro<2, 3>, update_micro<2, 4>},
      {update_micro<3, 1>, update_micro<3, 2>, update_micro<3, 3>, update_micro<3, 4>},
      {update_micro<4, 1>, update_micro<4, 2>, update_micro<4, 3>, update_micro<4, 4>}};
  return table[rows - 1][kg - 1];
}

// out[j] = beta·base[j] + s·acc[j] for one row.
GRADLORA_TARGET void finish_row(float* out, const float* base, const float* acc, int64_t len, float s, float beta) {
  const __m512 sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(beta);
  for_lanes(0, len, [&](int64_t j, auto lane) GRADLORA_LAMBDA {
    const __m512 x = _mm512_fmadd_ps(sv, load(acc + j, lane),
                                     beta == 1.0f ? load(base + j, lane) : _mm512_mul_ps(bv, load(base + j, lane)));
    store(out + j, x, lane);
  });
}

// Adds src into dst (len floats).
GRADLORA_TARGET void add_into(float* dst, const float* src, int64_t len) {
  for_lanes(0, len, [&](int64_t j, auto lane) GRADLORA_LAMBDA {
    store(dst + j, _mm512_add_ps(load(dst + j, lane), load(src + j, lane)), lane);
  });
}

// One row of the additive block sums: gb_row += g (the row i mod r of gB's partial), and the
// row's sums by column class j mod r, through 16-lane accumulators (r | 16: lanes fold onto
// classes; 16 | r: N = r/16 accumulators in rotation, kept in registers).
template <int N>
GRADLORA_TARGET void additive_row(const float* g, int64_t m, int64_t r, float* gb_row, float* ga_row) {
  __m512 acc[N];
  for (int a = 0; a < N; ++a) acc[a] = _mm512_setzero_ps();
  auto add = [&](int64_t j, int a, auto lane) GRADLORA_LAMBDA {
    const __m512 gv = load(g + j, lane);
    store(gb_row + j, _mm512_add_ps(load(gb_row + j, lane), gv), lane);
    acc[a] = _mm512_add_ps(acc[a], gv);
  };
  int64_t j = 0;
  for (; j + N * kLanes <= m; j += N * kLanes) {
    for (int a = 0; a < N; ++a) add(j + a * kLanes, a, Whole{});
  }
  for (int a = 0; a < N && j < m; ++a, j += kLanes) {
    if (j + kLanes <= m) {
      add(j, a, Whole{});
    } else {
      add(j, a, Tail{static_cast<__mmask16>((1u << (m - j)) - 1u)});
    }
  }
  float lanes[N * kLanes];
  for (int a = 0; a < N; ++a) _mm512_storeu_ps(lanes + a * kLanes, acc[a]);
  if (r >= kLanes) {
    for (int64_t k = 0; k < r; ++k) ga_row[k] = lanes[k];
  } else {
    for (int64_t k = 0; k < r; ++k) {
      float sum = 0.0f;
      for (int64_t l = k; l < kLanes; l += r) sum += lanes[l];
      ga_row[k] = sum;
    }
  }
}

using AdditiveRowFn = void (*)(const float*, int64_t, int64_t, float*, float*);

AdditiveRowFn additive_row_kernel(int64_t r) {  // r | 16 or 16 | r ≤ 128: additive_rank_ok
  static const AdditiveRowFn table[8] = {additive_row<1>, additive_row<2>, additive_row<3>, additive_row<4>,
                                         additive_row<5>, additive_row<6>, additive_row<7>, additive_row<8>};
  return table[(r >= kLanes ? r / kLanes : 1) - 1];
}

// One row of the additive write-back: P[j] += s·(a[j mod r] + b[j]).
GRADLORA_TARGET void additive_update_row(float* p, int64_t m, int64_t r, const float* a, const float* b, float s) {
  const int64_t nacc = r >= kLanes ? r / kLanes : 1;
  float pattern[8 * kLanes];
  for (int64_t l = 0; l < nacc * kLanes; ++l) pattern[l] = a[l % r];
  __m512 t[8];
  for (int64_t c = 0; c < nacc; ++c) t[c] = _mm512_loadu_ps(pattern + c * kLanes);
  const __m512 sv = _mm512_set1_ps(s);
  int64_t c = 0;
  for_lanes(0, m, [&](int64_t j, auto lane) GRADLORA_LAMBDA {
    const __m512 x = _mm512_add_ps(t[c], load(b + j, lane));
    store(p + j, _mm512_fmadd_ps(sv, x, load(p + j, lane)), lane);
    if (++c == nacc) c = 0;
  });
}

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

#endif  // GRADLORA_KERNELS

}  // namespace

bool kernels_available() {
#ifdef GRADLORA_KERNELS
  return g_enabled.load(std::memory_order_relaxed) && cpu_has_avx512f();
#else
  return false;
#endif
}

void set_kernels_enabled(bool enabled) { g_enabled.store(enabled, std::memory_order_relaxed); }

int parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<std::atomic<bool>> ran(static_cast<size_t>(n));
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    ran[static_cast<size_t>(at::get_thread_num()) % ran.size()].store(true, std::memory_order_relaxed);
  });
  return static_cast<int>(std::count_if(ran.begin(), ran.end(), [](const std::atomic<bool>& r) { return r.load(); }));
}

void project(const float* G, int64_t ldg, int64_t n, int64_t m, const float* A, const float* B, int64_t r, float s,
             float* gA, float* gB) {
#ifdef GRADLORA_KERNELS
  if (!kernels_available()) throw std::logic_error("gradlora: the CPU kernels are not available here");
  const int64_t rows = chunk_rows(n);
  const int64_t chunks = (n + rows - 1) / rows;
  const size_t part = static_cast<size_t>(r * m);
  // Chunk 0 accumulates into gB itself, the others into their own partials.
  std::vector<float> partials(gB ? part * static_cast<size_t>(chunks - 1) : 0, 0.0f);
  if (gB) std::fill(gB, gB + part, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t c0 = c * rows, c1 = std::min(n, c0 + rows);
      float* gbp = gB ? (c == 0 ? gB : partials.data() + part * static_cast<size_t>(c - 1)) : nullptr;
      if (gA && gB) {
        project_chunk<true, true>(G, ldg, c0, c1, m, A, B, r, s, gA, gbp);
      } else if (gA) {
        project_chunk<true, false>(G, ldg, c0, c1, m, A, B, r, s, gA, gbp);
      } else {
        project_chunk<false, true>(G, ldg, c0, c1, m, A, B, r, s, gA, gbp);
      }
    }
  });
  if (!gB) return;
  // gB = s·(partial 0 + partial 1 + …), in chunk order; columns in parallel.
  at::parallel_for(0, r, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      float* row = gB + k * m;
      for (int64_t c = 1; c < chunks; ++c)
        add_into(row, partials.data() + part * static_cast<size_t>(c - 1) + k * m, m);
      if (s != 1.0f) {
        for (int64_t j = 0; j < m; ++j) row[j] *= s;
      }
    }
  });
#else
  (void)G, (void)ldg, (void)n, (void)m, (void)A, (void)B, (void)r, (void)s, (void)gA, (void)gB;
  throw std::logic_error("gradlora: the CPU kernels are not available here");
#endif
}

void add_lowrank(float* P, int64_t ldp, const float* base, int64_t ldb, int64_t n, int64_t m,
                 const std::vector<Term>& terms, float s, float beta) {
#ifdef GRADLORA_KERNELS
  if (!kernels_available()) throw std::logic_error("gradlora: the CPU kernels are not available here");
  int64_t q = 0;
  for (const Term& t : terms) q += t.q;
  const int64_t w = std::min(m, kUpdateCols);
  constexpr int64_t kRows = 4;
  // Row panels: each keeps the terms' block of R in cache while its rows pass.
  at::parallel_for(0, (n + 63) / 64, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> acc(static_cast<size_t>(kRows * w));
    for (int64_t pb = b_begin; pb < b_end; ++pb) {
      const int64_t p0 = pb * 64, p1 = std::min(n, p0 + 64);
      for (int64_t j0 = 0; j0 < m; j0 += w) {
        const int64_t j1 = std::min(j0 + w, m), len = j1 - j0;
        for (int64_t i = p0; i < p1; i += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, p1 - i));
          std::fill(acc.begin(), acc.begin() + rows * w, 0.0f);
          for (const Term& t : terms) {
            for (int64_t k = 0; k < t.q; k += 4) {
              const int kg = static_cast<int>(std::min<int64_t>(4, t.q - k));
              update_kernel(rows, kg)(acc.data(), w, t.L + i * t.q + k, t.q, t.R + k * m, m, j0, j1);
            }
          }
          for (int ii = 0; ii < rows; ++ii) {
            finish_row(P + (i + ii) * ldp + j0, base + (i + ii) * ldb + j0, acc.data() + ii * w, len, s, beta);
          }
        }
      }
    }
  });
#else
  (void)P, (void)ldp, (void)base, (void)ldb, (void)n, (void)m, (void)terms, (void)s, (void)beta;
  throw std::logic_error("gradlora: the CPU kernels are not available here");
#endif
}

bool additive_rank_ok(int64_t r) { return r > 0 && ((kLanes % r == 0) || (r % kLanes == 0 && r <= 8 * kLanes)); }

void additive_project(const float* G, int64_t ldg, int64_t n, int64_t m, int64_t r, float* gA, float* gB) {
#ifdef GRADLORA_KERNELS
  if (!kernels_available() || !additive_rank_ok(r)) throw std::logic_error("gradlora: no CPU kernel for this case");
  const int64_t rows = chunk_rows(n);
  const int64_t chunks = (n + rows - 1) / rows;
  const size_t part = static_cast<size_t>(r * m);
  std::vector<float> partials(part * static_cast<size_t>(chunks - 1), 0.0f);
  std::fill(gB, gB + part, 0.0f);
  const AdditiveRowFn row = additive_row_kernel(r);
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      float* gbp = c == 0 ? gB : partials.data() + part * static_cast<size_t>(c - 1);
      for (int64_t i = c * rows; i < std::min(n, (c + 1) * rows); ++i) {
        row(G + i * ldg, m, r, gbp + (i % r) * m, gA + i * r);
      }
    }
  });
  at::parallel_for(0, r, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      for (int64_t c = 1; c < chunks; ++c) {
        add_into(gB + k * m, partials.data() + part * static_cast<size_t>(c - 1) + k * m, m);
      }
    }
  });
#else
  (void)G, (void)ldg, (void)n, (void)m, (void)r, (void)gA, (void)gB;
  throw std::logic_error("gradlora: the CPU kernels are not available here");
#endif
}

void additive_update(float* P, int64_t ldp, int64_t n, int64_t m, int64_t r, const float* dA, const float* dB,
                     float s) {
#ifdef GRADLORA_KERNELS
  if (!kernels_available() || !additive_rank_ok(r)) throw std::logic_error("gradlora: no CPU kernel for this case");
  at::parallel_for(0, n, 16, [&](int64_t i_begin, int64_t i_end) {
    for (int64_t i = i_begin; i < i_end; ++i) additive_update_row(P + i * ldp, m, r, dA + i * r, dB + (i % r) * m, s);
  });
#else
  (void)P, (void)ldp, (void)n, (void)m, (void)r, (void)dA, (void)dB, (void)s;
  throw std::logic_error("gradlora: the CPU kernels are not available here");
#endif
}

}  // namespace gradlora::cpu
