#pragma once
/// \file maths.h
/// The projections as pure functions on plain tensors. The
/// projectors call these; tests call them directly.

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

namespace gradlora {

/// Factor gradients of P = P0 + s·A·B: gA = s·G·Bᵀ (n×r), gB = s·Aᵀ·G (r×m).
std::pair<torch::Tensor, torch::Tensor> lora_factor_grads(const torch::Tensor& G, const torch::Tensor& A,
                                                          const torch::Tensor& B, double s);

/// Calls fn(row0, panel) over consecutive row panels of the n×m matrix G, each
/// converted to `dtype`. When G already has that dtype there is one panel, G
/// itself (unless `always_copy`); otherwise each panel is a copy with a
/// multiple of `row_multiple` rows and at most about 256 KiB, so converting G
/// never allocates an n×m temporary.
void for_each_row_panel(const torch::Tensor& G, torch::ScalarType dtype, int64_t row_multiple,
                        const std::function<void(int64_t, const torch::Tensor&)>& fn, bool always_copy = false);

/// P2d ← base + s·L·R (or P2d + s·L·R when `base` is undefined), computed in
/// L's dtype and rounded once into P2d's dtype, without an n×m temporary:
/// addmm into P2d when the dtypes agree, row panels otherwise.
/// With `decay` ≠ 1 the base is scaled first: P2d ← decay·base + s·L·R, in the same pass
/// (a decoupled weight decay folded into the write-back).
void add_product(torch::Tensor& P2d, const torch::Tensor& L, const torch::Tensor& R, double s,
                 const torch::Tensor& base = {}, double decay = 1.0);

/// P ← P + s·(A1·B1 − A0·B0) = P + s·(ΔA·B1 + A0·ΔB), as one rank-2r `addmm_`
/// into the n×m view of P (no n×m temporary when dtypes agree).
/// With `base` defined: P ← base + s·(A1·B1 − A0·B0), rounded once.
/// `decay` as in add_product.
void lora_write_back(torch::Tensor& P2d, const torch::Tensor& A0, const torch::Tensor& B0, const torch::Tensor& A1,
                     const torch::Tensor& B1, double s, const torch::Tensor& base = {}, double decay = 1.0);

/// Block sums of the additive form, r need not divide n or m:
/// gA[i,k] = Σ_{j ≡ k (mod r)} G[i,j] (n×r), gB[k,j] = Σ_{i ≡ k (mod r)} G[i,j] (r×m).
std::pair<torch::Tensor, torch::Tensor> additive_factor_grads(const torch::Tensor& G, int64_t r);

/// P += s·(ΔA·J + J'·ΔB) by broadcasts: P[i,j] += s·(ΔA[i, j mod r] + ΔB[i mod r, j]).
void additive_write_back(torch::Tensor& P2d, const torch::Tensor& dA, const torch::Tensor& dB, double s);

/// The dense n×m matrix A·J + J'·B (for tests and exports; the optimizer never forms it).
torch::Tensor additive_expand(const torch::Tensor& A, const torch::Tensor& B, int64_t n, int64_t m);

/// GaLore's projection of G on Q (columns orthonormal): Qᵀ·G (r×m) when `left`,
/// else G·Q (n×r), in Q's dtype (a G of another dtype is converted by row panels).
torch::Tensor galore_project(const torch::Tensor& Q, const torch::Tensor& G, bool left);

/// Factor gradients of P = P0 + s·(A1·B1) ⊙ (A2·B2): with W1 = A1·B1, W2 = A2·B2,
/// gA1 = s·(G⊙W2)·B1ᵀ, gB1 = s·A1ᵀ·(G⊙W2), gA2 = s·(G⊙W1)·B2ᵀ, gB2 = s·A2ᵀ·(G⊙W1)
/// (the product rule), in the factors' dtype, by row panels of at most about 256 KiB
/// (no n×m temporary).
std::array<torch::Tensor, 4> hadamard_factor_grads(const torch::Tensor& G, const torch::Tensor& A1,
                                                   const torch::Tensor& B1, const torch::Tensor& A2,
                                                   const torch::Tensor& B2, double s);

/// P ← P + s·((A1'·B1')⊙(A2'·B2') − (A1·B1)⊙(A2·B2)) for factors `before` = {A1, B1, A2, B2}
/// and `after`, as ΔW1⊙W2' + W1⊙ΔW2 with each ΔW one rank-2r product, by row panels (no
/// n×m temporary); computed in the factors' dtype and added into P's.
void hadamard_write_back(torch::Tensor& P2d, const std::array<torch::Tensor, 4>& before,
                         const std::array<torch::Tensor, 4>& after, double s);

/// σ that makes the expected plain-SGD update of `random` equal −η·G:
/// E[ΔP] = −η·s²·(E[VᵀV] + E[UUᵀ])·G = −2·η·s²·r·σ²·G, so σ = 1/(s·√(2r)).
double unbiased_random_std(double s, int64_t r);

/// Deterministic 64-bit seed from (config seed, parameter name, counter):
/// FNV-1a of the name mixed with splitmix64. Independent of thread count and
/// of which other parameters are selected.
uint64_t derive_seed(uint64_t seed, const std::string& name, uint64_t counter);

/// Gaussian N(0, std²) of the given shape on `options`' device and dtype, a
/// function of `seed` alone. On the CPU it is drawn by gradlora's own generator
/// in portable arithmetic, bit-identical on every CPU whatever its vector unit
/// (LibTorch's CPU kernels are not); on an accelerator by that device's
/// generator, seeded with `seed`.
torch::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed, const torch::TensorOptions& options);

/// Kaiming-uniform with a = √5 (PEFT's init of `lora_A`): U(−1/√fan_in, 1/√fan_in)
/// with fan_in = shape[1], drawn like seeded_normal.
torch::Tensor seeded_kaiming_uniform(at::IntArrayRef shape, uint64_t seed, const torch::TensorOptions& options);

/// On x86-64 CPUs with AVX-512F, or with AVX2 and FMA, the projections and write-backs above
/// take gradlora's own kernels for float32 matrices with contiguous rows (one pass over G for
/// both factor gradients, one pass over P for a write-back), and library calls otherwise.
/// Both instruction sets give the same bits. Turning the kernels off makes every call take
/// the library path (for comparisons), turning them on again picks the CPU's best
/// instruction set; `cpu_kernels_active` says whether they run.
void set_cpu_kernels_enabled(bool enabled);
bool cpu_kernels_active();
/// The instruction set the CPU kernels run on now: "avx512f", "avx2" or "none" (off, or a
/// CPU without either).
std::string cpu_kernels_isa();
/// Runs the CPU kernels on the instruction set named ("avx512f", "avx2", or "none" for off);
/// returns false, changing nothing, when this CPU does not have it. Throws
/// std::invalid_argument for any other name.
bool set_cpu_kernels_isa(const std::string& isa);
/// How many threads the kernels' parallel loops run on now: at::get_num_threads(), unless
/// the library was built without the threading that ATen's at::parallel_for needs (then 1).
int cpu_kernel_threads();

/// The dtype factors are kept in: float64 for double weights, float32 otherwise.
torch::ScalarType factor_dtype(torch::ScalarType param_dtype);

}  // namespace gradlora
