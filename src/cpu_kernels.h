#pragma once
// CPU kernels for the low-rank step on float32 matrices with contiguous rows: both factor
// projections from one pass over G, and a rank-q update of P in one pass over P. They are a
// CPU specialisation of the functions in maths.h (which call them when they apply and fall
// back to library calls otherwise); the maths is the same.
//
// Results are a function of the inputs alone: the same bits whatever the thread count (rows
// are split into a fixed number of chunks whose partial sums are added in a fixed order).
#include <cstdint>
#include <functional>
#include <vector>

namespace gradlora::cpu {

/// The instruction sets the kernels are built for, in increasing order. Both give the same
/// bits: a vector has 16 float lanes on each (one AVX-512 register, or two AVX2 ones), and
/// every lane does the same operations in the same order.
enum class Isa { none = 0, avx2 = 1, avx512f = 2 };

const char* isa_name(Isa isa);

/// The best instruction set this CPU runs the kernels on (x86-64 with AVX-512F, or with AVX2
/// and FMA), or none.
Isa best_isa();

/// The instruction set the kernels run on now (none: they are off).
Isa active_isa();

/// Runs the kernels on `isa` (none turns them off); false, changing nothing, when this CPU
/// does not have it. For benchmarks and tests that compare instruction sets or paths.
bool set_isa(Isa isa);

/// True when the kernels run (active_isa() is not none).
bool kernels_available();

/// Turns the kernels off, or back on at this CPU's best instruction set: the maths then takes
/// the library path. For benchmarks and tests that compare the two.
void set_kernels_enabled(bool enabled);

/// The number of distinct threads an at::parallel_for over at::get_num_threads() tasks ran on.
int parallel_threads();
/// task(0), …, task(n − 1), as many at a time as at::parallel_for runs threads (this unit is
/// compiled with OpenMP: in a unit compiled without it, at::parallel_for runs on one thread).
void parallel_tasks(int64_t n, const std::function<void(int64_t)>& task);

/// gA = s·G·Bᵀ (n×r) when gA is not null, gB = s·Aᵀ·G (r×m) when gB is not null.
/// G is n×m with row stride ldg; A is n×r and B r×m, both contiguous; gA, gB contiguous.
void project(const float* G, int64_t ldg, int64_t n, int64_t m, const float* A, const float* B, int64_t r, float s,
             float* gA, float* gB);

/// One rank-q term L·R of a low-rank update: L n×q and R q×m, both contiguous.
struct Term {
  const float* L;
  const float* R;
  int64_t q;
};

/// P ← beta·base + s·Σ L·R over the terms, Σ accumulated in float (beta·base rounded, then
/// the sum added and rounded once). P and base are n×m with row strides ldp and ldb; base
/// may equal P.
void add_lowrank(float* P, int64_t ldp, const float* base, int64_t ldb, int64_t n, int64_t m,
                 const std::vector<Term>& terms, float s, float beta = 1.0f);

/// True when the additive kernels below take rank r: r divides 16 or 16 divides r.
bool additive_rank_ok(int64_t r);

/// Block sums of the additive form: gA[i,k] = Σ_{j ≡ k (mod r)} G[i,j] (n×r) and
/// gB[k,j] = Σ_{i ≡ k (mod r)} G[i,j] (r×m), from one pass over G (row stride ldg).
void additive_project(const float* G, int64_t ldg, int64_t n, int64_t m, int64_t r, float* gA, float* gB);

/// P[i,j] += s·(dA[i, j mod r] + dB[i mod r, j]) in one pass over P (row stride ldp);
/// dA n×r, dB r×m contiguous.
void additive_update(float* P, int64_t ldp, int64_t n, int64_t m, int64_t r, const float* dA, const float* dB, float s);

}  // namespace gradlora::cpu
