#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GRADLORA_KERNELS 1
#endif

namespace gradlora::cpu {

namespace {

// Rows are split into at most kChunks chunks (of at least kMinChunkRows rows): the partial
// sums of Aᵀ·G are per chunk and added in chunk order, so the result does not depend on
// how many threads ran the chunks.
constexpr int64_t kChunks = 8;
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kLanes = 16;  // lanes of a vector, on every instruction set

int64_t chunk_rows(int64_t n) {
  const int64_t chunks = std::clamp<int64_t>(n / kMinChunkRows, 1, kChunks);
  return (n + chunks - 1) / chunks;
}

// n floats whose contents start undefined (new float[n] leaves them so; a std::vector would
// zero them): for scratch whose every element read has been written first. The first float
// starts a cache line (64 bytes), so that rows whose stride is a multiple of 16 floats start
// one too and a vector load never straddles two lines (half of the AVX2 loads did with the
// 16-byte alignment of new float[n]: the products alone ran 5–10 % slower, the kernels 2–4 %).
constexpr std::align_val_t kLine{64};
struct ScratchDelete {
  void operator()(float* p) const { ::operator delete[](p, kLine); }
};
using Scratch = std::unique_ptr<float[], ScratchDelete>;
Scratch scratch(size_t n) { return Scratch(new (kLine) float[n]); }

// Scratch that keeps its memory from one call to the next: one buffer per slot and thread,
// grown to the largest size asked of it and never shrunk; its contents start undefined, as
// scratch()'s. Fresh scratch each call came back from malloc as new pages whenever the heap
// had been trimmed in between (after large temporaries were freed: torch::optim::AdamW's in
// the roofline benchmark, a training step's gradients), and the kernel faulted them in and
// zeroed them, 7·r·m floats of partial sums per projection. The caller's slots (kPartials,
// kPacked) and its workers' (kPanel, kSums) are distinct, so a thread that is both never
// hands one buffer out twice.
enum Slot { kPartials, kPacked, kPanel, kSums, kSlotCount };
float* kept(Slot slot, size_t n) {
  struct Buffer {
    Scratch data;
    size_t size = 0;
  };
  thread_local Buffer buffers[kSlotCount];
  Buffer& b = buffers[slot];
  if (b.size < n) {
    b.data = scratch(n);
    b.size = n;
  }
  return b.data.get();
}

// Sum of 16 lanes in a fixed order.
float lane_sum(const float* v) {
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) h[l] += h[l + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
}

// Columns per block of a write-back with its sums in registers. Up to 16 factor columns:
// whole rows, so that each group of rows reads and writes P as a few long streams, the right
// factors coming from the L2 cache (Zen 4, 1 thread, in one process against blocks of 512
// columns at 4096×4096, 4096×11008, 2048×5632 and 2048×2048: 1.09–1.13× as fast with 4
// factor columns, 1.04–1.11× with 8, 0.99–1.07× with 16 (1.01–1.03× in three repeats); on 2
// threads 1.04–1.09× with 8 and as fast with 16; with 24 or more, within 2 %). More: the
// block's rows of the right factors (q·w floats) fit in half of a 32 KiB L1 cache, but at
// least 512 columns.
int64_t update_cols_in_registers(int64_t q) {
  if (q <= 16) return std::numeric_limits<int64_t>::max();
  return std::max<int64_t>(512, (16 * 1024 / 4) / q / kLanes * kLanes);
}

#ifdef GRADLORA_KERNELS

// ---- AVX-512F: a Part is one 512-bit register of 16 lanes.
namespace avx512 {
#define GRADLORA_TARGET __attribute__((target("avx512f")))
#define GRADLORA_OP GRADLORA_TARGET __attribute__((always_inline)) inline
using Part = __m512;
constexpr int64_t kPartLanes = 16;
struct PTail {
  __mmask16 k;
};
GRADLORA_OP PTail ptail(int64_t n) { return {static_cast<__mmask16>((1u << n) - 1u)}; }
GRADLORA_OP Part pload(const float* p) { return _mm512_loadu_ps(p); }
GRADLORA_OP Part pload(const float* p, PTail t) { return _mm512_maskz_loadu_ps(t.k, p); }
GRADLORA_OP void pstore(float* p, Part v) { _mm512_storeu_ps(p, v); }
GRADLORA_OP void pstore(float* p, Part v, PTail t) { _mm512_mask_storeu_ps(p, t.k, v); }
GRADLORA_OP Part pset1(float x) { return _mm512_set1_ps(x); }
GRADLORA_OP Part pzero() { return _mm512_setzero_ps(); }
GRADLORA_OP Part padd(Part a, Part b) { return _mm512_add_ps(a, b); }
GRADLORA_OP Part pmul(Part a, Part b) { return _mm512_mul_ps(a, b); }
GRADLORA_OP Part pfma(Part a, Part b, Part c) { return _mm512_fmadd_ps(a, b, c); }
// 32 registers: the projection over a panel of G in cache, s·G·Bᵀ 4 rows × 4 factor columns
// at a time (16 sums), Aᵀ·G up to 8 factor rows × 16 columns (8 sums: at r = 8 one group
// instead of 6 + 2 made the projection 1.08× as fast on Zen 4, and r = 16 or 32 no slower);
// the write-back keeps 6 rows × 16 columns of sums. On an AMD Zen 4 (1 thread, 4096×4096,
// r = 8) this ran the projection 1.4× and the write-back 2× as fast as one sweep over G with
// 2 rows × 4 factor columns of sums and a write-back through a row buffer; at r = 32, 2.2×
// and 2.3×. Storing each row of a group right after loading it beat loading the whole group
// first (which AVX2 on Zen 3 needs) by 7–16 % there.
constexpr int kProjRows = 4, kProjGroup = 4;
// s·G·Bᵀ alone (no Aᵀ·G) at 4 < r ≤ 8: one group of all r factor columns, 2 rows at a time,
// which reads G once and copies no panel (Zen 4, r = 8, in one process against two groups of
// 4 rows × 4: 1.04–1.06× as fast on 1 thread and 1.03–1.08× on 2 at 4096×4096, 4096×11008 and
// 2048×5632; at r = 16 two such groups were 1.13× slower than four).
constexpr int kProjWideRows = 2;
// With both products, Aᵀ·G runs first over each panel, its first group reading G and filling
// the panel, and every group of s·G·Bᵀ reads the panel (Zen 4, A/B in one process against
// s·G·Bᵀ first: 1 thread, 1.08–1.15× as fast at r = 2, 1.05–1.14× at r = 4, 1.04–1.11× at
// r = 8, 1.02–1.06× at r = 16, 1.00–1.01× at r = 32 over 4096×4096, 4096×11008, 2048×5632
// (and 2048×2048 at r = 8); 2 threads, 1.01–1.10× at r = 8 and 1.01–1.02× at r = 32).
constexpr bool kProjAtgFirst = true;
constexpr int kAtgGroup = 8;
constexpr int kUpdateRows = 6;
constexpr int64_t kUpdatePanelGroups = 10;
constexpr int64_t kPackStrips = 16;
constexpr bool kUpdateLoadsFirst = false;
// The additive kernels' rows of one class side by side (additive_class_rows): 8 in the block
// sums up to r = 32 (against 4: 1.02–1.10× as fast on Zen 4 at 4096×4096 and 4096×11008, in
// one process), 4 in the write-back (8 rows of P, 8 read-modify-write streams: as fast at best,
// up to 1.17× slower).
constexpr int kSumsRegs = 16, kUpdateRegs = 8;
// The additive write-back's own prefetch of P: none. On Zen 4 it made the pass 15–17 %
// slower (A/B in one process, 4096×4096, r = 8 and 32), as asking for a single stream's
// lines 256–1024 floats ahead slowed a plain read of it (11–12.5 GB/s against 15).
constexpr int64_t kStreamAhead = 0;
#include "cpu_kernels_body.inc"
#undef GRADLORA_OP
#undef GRADLORA_TARGET
}  // namespace avx512

// ---- AVX2 with FMA: a Part is one 256-bit register of 8 lanes.
namespace avx2 {
#define GRADLORA_TARGET __attribute__((target("avx2,fma")))
#define GRADLORA_OP GRADLORA_TARGET __attribute__((always_inline)) inline
using Part = __m256;
constexpr int64_t kPartLanes = 8;
struct PTail {
  __m256i k;
};
alignas(64) constexpr int32_t kTailMasks[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
GRADLORA_OP PTail ptail(int64_t n) {  // lanes [0, n) on, 0 < n < 8
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMasks + 8 - n))};
}
GRADLORA_OP Part pload(const float* p) { return _mm256_loadu_ps(p); }
GRADLORA_OP Part pload(const float* p, PTail t) { return _mm256_maskload_ps(p, t.k); }
GRADLORA_OP void pstore(float* p, Part v) { _mm256_storeu_ps(p, v); }
GRADLORA_OP void pstore(float* p, Part v, PTail t) { _mm256_maskstore_ps(p, t.k, v); }
GRADLORA_OP Part pset1(float x) { return _mm256_set1_ps(x); }
GRADLORA_OP Part pzero() { return _mm256_setzero_ps(); }
GRADLORA_OP Part padd(Part a, Part b) { return _mm256_add_ps(a, b); }
GRADLORA_OP Part pmul(Part a, Part b) { return _mm256_mul_ps(a, b); }
GRADLORA_OP Part pfma(Part a, Part b, Part c) { return _mm256_fmadd_ps(a, b, c); }
// 16 registers: too few to keep both products' sums of one sweep in them, so the projection
// is split over a panel of G in cache: s·G·Bᵀ 3 rows × 4 factor columns at a time (12 sums),
// Aᵀ·G 4 factor rows × 16 columns (8 sums); the write-back keeps 6 rows × 2 Parts of sums
// (12: with 8, the FMAs waited on each other).
constexpr int kProjRows = 3, kProjGroup = 4;
// Aᵀ·G first (kProjAtgFirst): the AVX2 form on Zen 4 ran 1.01–1.05× as fast at r = 4 and 8
// but 1.02× slower at r = 32; not measured on an AVX2-only CPU, so s·G·Bᵀ stays first.
constexpr bool kProjAtgFirst = false;
constexpr int kProjWideRows = 0;  // none: 8 factor columns of one row are 16 Parts of sums, all 16 registers
constexpr int kAtgGroup = 4;
constexpr int kUpdateRows = 6;
constexpr int64_t kUpdatePanelGroups = 10;     // kUpdateRows-row groups per row panel
constexpr int64_t kPackStrips = 16;            // strips (of 16 columns) from which the left factors are packed
constexpr bool kUpdateLoadsFirst = true;       // in place: a row group's loads of P before its stores
constexpr int kSumsRegs = 8, kUpdateRegs = 8;  // additive: 4 rows of a class up to r = 16, 2 at r = 32
constexpr int64_t kStreamAhead = 1024;         // the additive write-back asks for P this far ahead (floats)
#include "cpu_kernels_body.inc"
#undef GRADLORA_OP
#undef GRADLORA_TARGET
}  // namespace avx2

#endif  // GRADLORA_KERNELS

// The entry points of one instruction set.
struct Table {
  void (*project)(const float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t, float, float*, float*);
  void (*add_lowrank)(float*, int64_t, const float*, int64_t, int64_t, int64_t, const std::vector<Term>&, float, float);
  void (*additive_project)(const float*, int64_t, int64_t, int64_t, int64_t, float*, float*);
  void (*additive_update)(float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, float);
};

#ifdef GRADLORA_KERNELS
constexpr Table kAvx512{avx512::project, avx512::add_lowrank, avx512::additive_project, avx512::additive_update};
constexpr Table kAvx2{avx2::project, avx2::add_lowrank, avx2::additive_project, avx2::additive_update};
#endif

// The best instruction set this CPU has.
Isa cpu_best() {
#ifdef GRADLORA_KERNELS
  static const Isa best = __builtin_cpu_supports("avx512f")                                   ? Isa::avx512f
                          : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::avx2
                                                                                              : Isa::none;
  return best;
#else
  return Isa::none;
#endif
}

std::atomic<Isa> g_isa{cpu_best()};

const Table& table() {
  switch (g_isa.load(std::memory_order_relaxed)) {
#ifdef GRADLORA_KERNELS
    case Isa::avx512f:
      return kAvx512;
    case Isa::avx2:
      return kAvx2;
#endif
    default:
      throw std::logic_error("gradlora: the CPU kernels are not available here");
  }
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512f:
      return "avx512f";
    case Isa::avx2:
      return "avx2";
    case Isa::none:
      break;
  }
  return "none";
}

Isa best_isa() { return cpu_best(); }

Isa active_isa() { return g_isa.load(std::memory_order_relaxed); }

bool set_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(cpu_best())) return false;
  g_isa.store(isa, std::memory_order_relaxed);
  return true;
}

bool kernels_available() { return active_isa() != Isa::none; }

void set_kernels_enabled(bool enabled) { set_isa(enabled ? cpu_best() : Isa::none); }

int parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<std::atomic<bool>> ran(static_cast<size_t>(n));
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    ran[static_cast<size_t>(at::get_thread_num()) % ran.size()].store(true, std::memory_order_relaxed);
  });
  return static_cast<int>(std::count_if(ran.begin(), ran.end(), [](const std::atomic<bool>& r) { return r.load(); }));
}

void parallel_tasks(int64_t n, const std::function<void(int64_t)>& task) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) task(k);
  });
}

void project(const float* G, int64_t ldg, int64_t n, int64_t m, const float* A, const float* B, int64_t r, float s,
             float* gA, float* gB) {
  table().project(G, ldg, n, m, A, B, r, s, gA, gB);
}

void add_lowrank(float* P, int64_t ldp, const float* base, int64_t ldb, int64_t n, int64_t m,
                 const std::vector<Term>& terms, float s, float beta) {
  table().add_lowrank(P, ldp, base, ldb, n, m, terms, s, beta);
}

bool additive_rank_ok(int64_t r) { return r > 0 && ((kLanes % r == 0) || (r % kLanes == 0 && r <= 8 * kLanes)); }

void additive_project(const float* G, int64_t ldg, int64_t n, int64_t m, int64_t r, float* gA, float* gB) {
  if (!additive_rank_ok(r)) throw std::logic_error("gradlora: no CPU kernel for this case");
  table().additive_project(G, ldg, n, m, r, gA, gB);
}

void additive_update(float* P, int64_t ldp, int64_t n, int64_t m, int64_t r, const float* dA, const float* dB,
                     float s) {
  if (!additive_rank_ok(r)) throw std::logic_error("gradlora: no CPU kernel for this case");
  table().additive_update(P, ldp, n, m, r, dA, dB, s);
}

}  // namespace gradlora::cpu
