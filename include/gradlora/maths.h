#pragma once
/// \file maths.h
/// The projections as pure functions on plain tensors (design.md §2). The
/// projectors call these; tests call them directly.

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>

namespace gradlora {

/// Factor gradients of P = P0 + s·A·B: gA = s·G·Bᵀ (n×r), gB = s·Aᵀ·G (r×m).
std::pair<torch::Tensor, torch::Tensor> lora_factor_grads(const torch::Tensor& G,
                                                          const torch::Tensor& A,
                                                          const torch::Tensor& B, double s);

/// P ← P + s·(A1·B1 − A0·B0) = P + s·(ΔA·B1 + A0·ΔB), as one rank-2r `addmm_`
/// into the n×m view of P (no n×m temporary when dtypes agree).
void lora_write_back(torch::Tensor& P2d, const torch::Tensor& A0, const torch::Tensor& B0,
                     const torch::Tensor& A1, const torch::Tensor& B1, double s);

/// Block sums of the additive form (design.md §2.3), r need not divide n or m:
/// gA[i,k] = Σ_{j ≡ k (mod r)} G[i,j] (n×r), gB[k,j] = Σ_{i ≡ k (mod r)} G[i,j] (r×m).
std::pair<torch::Tensor, torch::Tensor> additive_factor_grads(const torch::Tensor& G, int64_t r);

/// P += s·(ΔA·J + J'·ΔB) by broadcasts: P[i,j] += s·(ΔA[i, j mod r] + ΔB[i mod r, j]).
void additive_write_back(torch::Tensor& P2d, const torch::Tensor& dA, const torch::Tensor& dB,
                         double s);

/// The dense n×m matrix A·J + J'·B (for tests and exports; the optimizer never forms it).
torch::Tensor additive_expand(const torch::Tensor& A, const torch::Tensor& B, int64_t n, int64_t m);

/// σ that makes the expected plain-SGD update of `random` equal −η·G:
/// E[ΔP] = −η·s²·(E[VᵀV] + E[UUᵀ])·G = −2·η·s²·r·σ²·G, so σ = 1/(s·√(2r)).
double unbiased_random_std(double s, int64_t r);

/// Deterministic 64-bit seed from (config seed, parameter name, counter):
/// FNV-1a of the name mixed with splitmix64. Independent of thread count and
/// of which other parameters are selected.
uint64_t derive_seed(uint64_t seed, const std::string& name, uint64_t counter);

/// Gaussian N(0, std²) of the given shape, drawn on the CPU from a generator
/// seeded with `seed` and then moved to `options`' device and dtype.
torch::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed,
                            const torch::TensorOptions& options);

/// Kaiming-uniform with a = √5 (PEFT's init of `lora_A`): U(−1/√fan_in, 1/√fan_in)
/// with fan_in = shape[1], drawn like seeded_normal.
torch::Tensor seeded_kaiming_uniform(at::IntArrayRef shape, uint64_t seed,
                                     const torch::TensorOptions& options);

/// The dtype factors are kept in: float64 for double weights, float32 otherwise.
torch::ScalarType factor_dtype(torch::ScalarType param_dtype);

}  // namespace gradlora
