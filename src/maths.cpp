#include <gradlora/maths.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>

namespace gradlora {

std::pair<torch::Tensor, torch::Tensor> lora_factor_grads(const torch::Tensor& G, const torch::Tensor& A,
                                                          const torch::Tensor& B, double s) {
  const torch::Tensor g = G.scalar_type() == A.scalar_type() ? G : G.to(A.scalar_type());
  torch::Tensor gA = torch::mm(g, B.t());
  torch::Tensor gB = torch::mm(A.t(), g);
  if (s != 1.0) {
    gA.mul_(s);
    gB.mul_(s);
  }
  return {gA, gB};
}

void lora_write_back(torch::Tensor& P2d, const torch::Tensor& A0, const torch::Tensor& B0, const torch::Tensor& A1,
                     const torch::Tensor& B1, double s) {
  // A1·B1 − A0·B0 = (A1 − A0)·B1 + A0·(B1 − B0) = [ΔA, A0]·[B1; ΔB]: one rank-2r product.
  torch::Tensor left = torch::cat({A1 - A0, A0}, 1);
  torch::Tensor right = torch::cat({B1, B1 - B0}, 0);
  if (P2d.scalar_type() == left.scalar_type()) {
    P2d.addmm_(left, right, /*beta=*/1.0, /*alpha=*/s);
  } else {
    P2d.add_(torch::mm(left, right).mul_(s).to(P2d.scalar_type()));
  }
}

namespace {

// The first q·r columns of a row-major n×m matrix as an n×q×r view (no copy).
torch::Tensor column_blocks(const torch::Tensor& X, int64_t q, int64_t r) {
  return X.as_strided({X.size(0), q, r}, {X.stride(0), r * X.stride(1), X.stride(1)}, X.storage_offset());
}

}  // namespace

std::pair<torch::Tensor, torch::Tensor> additive_factor_grads(const torch::Tensor& G, int64_t r) {
  const int64_t n = G.size(0), m = G.size(1);
  const int64_t q = m / r, t = m % r;  // full column blocks, width of the last one
  const int64_t p = n / r, u = n % r;  // full row blocks, height of the last one
  torch::Tensor gA = q > 0 ? column_blocks(G, q, r).sum(1) : torch::zeros({n, r}, G.options());
  if (t > 0) gA.narrow(1, 0, t).add_(G.narrow(1, q * r, t));
  torch::Tensor gB = p > 0 ? G.narrow(0, 0, p * r).reshape({p, r, m}).sum(0) : torch::zeros({r, m}, G.options());
  if (u > 0) gB.narrow(0, 0, u).add_(G.narrow(0, p * r, u));
  return {gA, gB};
}

void additive_write_back(torch::Tensor& P2d, const torch::Tensor& dA, const torch::Tensor& dB, double s) {
  const int64_t n = P2d.size(0), m = P2d.size(1), r = dA.size(1);
  const int64_t q = m / r, t = m % r;
  const int64_t p = n / r, u = n % r;
  const torch::Tensor a = dA.scalar_type() == P2d.scalar_type() ? dA : dA.to(P2d.scalar_type());
  const torch::Tensor b = dB.scalar_type() == P2d.scalar_type() ? dB : dB.to(P2d.scalar_type());
  if (q > 0) column_blocks(P2d, q, r).add_(a.unsqueeze(1), s);
  if (t > 0) P2d.narrow(1, q * r, t).add_(a.narrow(1, 0, t), s);
  if (p > 0) {
    torch::Tensor rows = P2d.narrow(0, 0, p * r);
    rows.as_strided({p, r, m}, {r * P2d.stride(0), P2d.stride(0), P2d.stride(1)}, rows.storage_offset())
        .add_(b.unsqueeze(0), s);
  }
  if (u > 0) P2d.narrow(0, p * r, u).add_(b.narrow(0, 0, u), s);
}

torch::Tensor additive_expand(const torch::Tensor& A, const torch::Tensor& B, int64_t n, int64_t m) {
  torch::Tensor out = torch::zeros({n, m}, A.options());
  additive_write_back(out, A, B, 1.0);
  return out;
}

double unbiased_random_std(double s, int64_t r) { return 1.0 / (s * std::sqrt(2.0 * static_cast<double>(r))); }

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t derive_seed(uint64_t seed, const std::string& name, uint64_t counter) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return splitmix64(splitmix64(splitmix64(seed) ^ h) ^ counter);
}

namespace {

torch::Tensor seeded_cpu(at::IntArrayRef shape, const torch::TensorOptions& options) {
  const auto dtype = options.dtype().toScalarType() == torch::kDouble ? torch::kDouble : torch::kFloat;
  return torch::empty(shape, torch::TensorOptions().dtype(dtype).device(torch::kCPU));
}

}  // namespace

torch::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed, const torch::TensorOptions& options) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  torch::Tensor t = seeded_cpu(shape, options);
  t.normal_(0.0, std, gen);
  return t.to(options.device(), options.dtype().toScalarType());
}

torch::Tensor seeded_kaiming_uniform(at::IntArrayRef shape, uint64_t seed, const torch::TensorOptions& options) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  torch::Tensor t = seeded_cpu(shape, options);
  const double bound = 1.0 / std::sqrt(static_cast<double>(shape.size() > 1 ? shape[1] : shape[0]));
  t.uniform_(-bound, bound, gen);
  return t.to(options.device(), options.dtype().toScalarType());
}

torch::ScalarType factor_dtype(torch::ScalarType param_dtype) {
  return param_dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
}

}  // namespace gradlora
