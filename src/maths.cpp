#include <gradlora/maths.h>

#include "cpu_kernels.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace gradlora {

namespace {

// Rows per panel so that an h×m panel in `dtype` holds at most about 256 KiB.
int64_t panel_rows(int64_t m, torch::ScalarType dtype) {
  constexpr int64_t kPanelBytes = 256 * 1024;
  const int64_t esize = static_cast<int64_t>(c10::elementSize(dtype));
  return std::max<int64_t>(1, kPanelBytes / std::max<int64_t>(m * esize, 1));
}

// The CPU kernels serve float32 CPU matrices whose rows are contiguous (and factors that
// are contiguous), when this CPU has them.
bool rows_ok(const torch::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.dim() == 2 && t.size(0) > 0 &&
         t.size(1) > 0 && t.stride(1) == 1 && t.stride(0) >= t.size(1);
}

bool factor_ok(const torch::Tensor& t) { return rows_ok(t) && t.is_contiguous(); }

bool kernels_serve(std::initializer_list<const torch::Tensor*> matrices,
                   std::initializer_list<const torch::Tensor*> factors) {
  if (!cpu::kernels_available()) return false;
  for (const torch::Tensor* t : matrices) {
    if (!rows_ok(*t)) return false;
  }
  for (const torch::Tensor* t : factors) {
    if (!factor_ok(*t)) return false;
  }
  return true;
}

}  // namespace

void set_cpu_kernels_enabled(bool enabled) { cpu::set_kernels_enabled(enabled); }
bool cpu_kernels_active() { return cpu::kernels_available(); }
std::string cpu_kernels_isa() { return cpu::isa_name(cpu::active_isa()); }
bool set_cpu_kernels_isa(const std::string& isa) {
  for (const cpu::Isa i : {cpu::Isa::none, cpu::Isa::avx2, cpu::Isa::avx512f}) {
    if (isa == cpu::isa_name(i)) return cpu::set_isa(i);
  }
  throw std::invalid_argument("gradlora: set_cpu_kernels_isa: unknown instruction set '" + isa +
                              "' (avx512f, avx2 or none)");
}
int cpu_kernel_threads() { return cpu::parallel_threads(); }

void for_each_row_panel(const torch::Tensor& G, torch::ScalarType dtype, int64_t row_multiple,
                        const std::function<void(int64_t, const torch::Tensor&)>& fn, bool always_copy) {
  const int64_t n = G.size(0), m = G.size(1);
  if (G.scalar_type() == dtype && !always_copy) {
    fn(0, G);
    return;
  }
  const int64_t mult = std::max<int64_t>(row_multiple, 1);
  const int64_t rows = std::max<int64_t>(mult, panel_rows(m, dtype) / mult * mult);
  torch::Tensor buffer = torch::empty({std::min(rows, n), m}, G.options().dtype(dtype));
  for (int64_t i = 0; i < n; i += rows) {
    const int64_t h = std::min(rows, n - i);
    torch::Tensor panel = buffer.narrow(0, 0, h);
    panel.copy_(G.narrow(0, i, h));
    fn(i, panel);
  }
}

void add_product(torch::Tensor& P2d, const torch::Tensor& L, const torch::Tensor& R, double s,
                 const torch::Tensor& base, double decay) {
  const torch::Tensor b = base.defined() ? base : P2d;
  if (L.size(1) > 0) {
    const torch::Tensor Rc = R.is_contiguous() ? R : R.contiguous();  // Qᵀ of a right projector: r×m, small
    if (kernels_serve({&P2d, &b}, {&L, &Rc})) {
      cpu::add_lowrank(P2d.data_ptr<float>(), P2d.stride(0), b.data_ptr<float>(), b.stride(0), P2d.size(0), P2d.size(1),
                       {{L.data_ptr<float>(), Rc.data_ptr<float>(), L.size(1)}}, static_cast<float>(s),
                       static_cast<float>(decay));
      return;
    }
  }
  if (decay != 1.0) {  // the library path scales first: P2d ← decay·base, then adds in place
    if (base.defined()) P2d.copy_(base);
    P2d.mul_(decay);
    add_product(P2d, L, R, s);
    return;
  }
  if (P2d.scalar_type() == L.scalar_type() && b.scalar_type() == L.scalar_type()) {
    if (base.defined()) {
      at::addmm_out(P2d, base, L, R, /*beta=*/1.0, /*alpha=*/s);
    } else {
      P2d.addmm_(L, R, /*beta=*/1.0, /*alpha=*/s);
    }
    return;
  }
  for_each_row_panel(
      b, L.scalar_type(), 1,
      [&](int64_t row0, const torch::Tensor& panel) {
        // The panel is a copy of the base's rows: it is the accumulator.
        panel.addmm_(L.narrow(0, row0, panel.size(0)), R, 1.0, s);
        P2d.narrow(0, row0, panel.size(0)).copy_(panel);
      },
      /*always_copy=*/true);
}

std::pair<torch::Tensor, torch::Tensor> lora_factor_grads(const torch::Tensor& G, const torch::Tensor& A,
                                                          const torch::Tensor& B, double s) {
  torch::Tensor gA, gB;
  if (A.size(1) > 0 && kernels_serve({&G}, {&A, &B})) {
    // One pass over G for both products.
    gA = torch::empty({G.size(0), A.size(1)}, A.options());
    gB = torch::empty({A.size(1), G.size(1)}, A.options());
    cpu::project(G.data_ptr<float>(), G.stride(0), G.size(0), G.size(1), A.data_ptr<float>(), B.data_ptr<float>(),
                 A.size(1), static_cast<float>(s), gA.data_ptr<float>(), gB.data_ptr<float>());
    return {gA, gB};
  }
  if (G.scalar_type() == A.scalar_type()) {
    gA = torch::mm(G, B.t());
    gB = torch::mm(A.t(), G);
  } else {
    gA = torch::empty({G.size(0), B.size(0)}, A.options());
    gB = torch::zeros({A.size(1), G.size(1)}, A.options());
    for_each_row_panel(G, A.scalar_type(), 1, [&](int64_t row0, const torch::Tensor& panel) {
      torch::Tensor rows = gA.narrow(0, row0, panel.size(0));
      at::mm_out(rows, panel, B.t());
      gB.addmm_(A.narrow(0, row0, panel.size(0)).t(), panel);
    });
  }
  if (s != 1.0) {
    gA.mul_(s);
    gB.mul_(s);
  }
  return {gA, gB};
}

void lora_write_back(torch::Tensor& P2d, const torch::Tensor& A0, const torch::Tensor& B0, const torch::Tensor& A1,
                     const torch::Tensor& B1, double s, const torch::Tensor& base, double decay) {
  // A1·B1 − A0·B0 = (A1 − A0)·B1 + A0·(B1 − B0) = [ΔA, A0]·[B1; ΔB]: one rank-2r product.
  const torch::Tensor b = base.defined() ? base : P2d;
  if (A1.size(1) > 0 && kernels_serve({&P2d, &b}, {&A0, &B0, &A1, &B1})) {
    // The two terms in one pass over P, without concatenating them.
    const torch::Tensor dA = A1 - A0, dB = B1 - B0;
    const int64_t r = A1.size(1);
    cpu::add_lowrank(P2d.data_ptr<float>(), P2d.stride(0), b.data_ptr<float>(), b.stride(0), P2d.size(0), P2d.size(1),
                     {{dA.data_ptr<float>(), B1.data_ptr<float>(), r}, {A0.data_ptr<float>(), dB.data_ptr<float>(), r}},
                     static_cast<float>(s), static_cast<float>(decay));
    return;
  }
  torch::Tensor left = torch::cat({A1 - A0, A0}, 1);
  torch::Tensor right = torch::cat({B1, B1 - B0}, 0);
  add_product(P2d, left, right, s, base, decay);
}

namespace {

// The first q·r columns of a row-major n×m matrix as an n×q×r view (no copy).
torch::Tensor column_blocks(const torch::Tensor& X, int64_t q, int64_t r) {
  return X.as_strided({X.size(0), q, r}, {X.stride(0), r * X.stride(1), X.stride(1)}, X.storage_offset());
}

}  // namespace

std::pair<torch::Tensor, torch::Tensor> additive_factor_grads(const torch::Tensor& G, int64_t r) {
  const int64_t n = G.size(0), m = G.size(1);
  if (cpu::additive_rank_ok(r) && kernels_serve({&G}, {})) {  // one pass over G for both sums
    torch::Tensor gA = torch::empty({n, r}, G.options()), gB = torch::empty({r, m}, G.options());
    cpu::additive_project(G.data_ptr<float>(), G.stride(0), n, m, r, gA.data_ptr<float>(), gB.data_ptr<float>());
    return {gA, gB};
  }
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
  if (cpu::additive_rank_ok(r) && kernels_serve({&P2d}, {&dA, &dB})) {  // one pass over P
    cpu::additive_update(P2d.data_ptr<float>(), P2d.stride(0), n, m, r, dA.data_ptr<float>(), dB.data_ptr<float>(),
                         static_cast<float>(s));
    return;
  }
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

torch::Tensor galore_project(const torch::Tensor& Q, const torch::Tensor& G, bool left) {
  if (Q.size(1) > 0 && kernels_serve({&G}, {&Q})) {
    const int64_t n = G.size(0), m = G.size(1), r = Q.size(1);
    if (left) {  // Qᵀ·G: the Aᵀ·G product with A = Q
      torch::Tensor out = torch::empty({r, m}, Q.options());
      cpu::project(G.data_ptr<float>(), G.stride(0), n, m, Q.data_ptr<float>(), nullptr, r, 1.0f, nullptr,
                   out.data_ptr<float>());
      return out;
    }
    const torch::Tensor Qt = Q.t().contiguous();  // G·Q: the G·Bᵀ product with B = Qᵀ (r×m)
    torch::Tensor out = torch::empty({n, r}, Q.options());
    cpu::project(G.data_ptr<float>(), G.stride(0), n, m, nullptr, Qt.data_ptr<float>(), r, 1.0f, out.data_ptr<float>(),
                 nullptr);
    return out;
  }
  if (G.scalar_type() == Q.scalar_type()) return left ? torch::mm(Q.t(), G) : torch::mm(G, Q);
  const int64_t n = G.size(0), m = G.size(1), r = Q.size(1);
  torch::Tensor out = left ? torch::zeros({r, m}, Q.options()) : torch::empty({n, r}, Q.options());
  for_each_row_panel(G, Q.scalar_type(), 1, [&](int64_t row0, const torch::Tensor& panel) {
    if (left) {
      out.addmm_(Q.narrow(0, row0, panel.size(0)).t(), panel);
    } else {
      torch::Tensor rows = out.narrow(0, row0, panel.size(0));
      at::mm_out(rows, panel, Q);
    }
  });
  return out;
}

std::array<torch::Tensor, 4> hadamard_factor_grads(const torch::Tensor& G, const torch::Tensor& A1,
                                                   const torch::Tensor& B1, const torch::Tensor& A2,
                                                   const torch::Tensor& B2, double s) {
  // Row panels: G⊙W1 and G⊙W2 are formed h rows at a time, never n×m.
  const int64_t n = G.size(0), m = G.size(1), r = A1.size(1);
  const auto opts = A1.options();
  torch::Tensor gA1 = torch::empty({n, r}, opts), gA2 = torch::empty({n, r}, opts);
  torch::Tensor gB1 = torch::zeros({r, m}, opts), gB2 = torch::zeros({r, m}, opts);
  const int64_t rows = panel_rows(m, A1.scalar_type());
  for (int64_t i = 0; i < n; i += rows) {
    const int64_t h = std::min(rows, n - i);
    const torch::Tensor g = G.narrow(0, i, h).to(A1.scalar_type());
    const torch::Tensor a1 = A1.narrow(0, i, h), a2 = A2.narrow(0, i, h);
    const torch::Tensor H1 = g * torch::mm(a2, B2);  // rows of G ⊙ W2
    torch::Tensor out1 = gA1.narrow(0, i, h);
    at::mm_out(out1, H1, B1.t());
    gB1.addmm_(a1.t(), H1);
    const torch::Tensor H2 = g * torch::mm(a1, B1);  // rows of G ⊙ W1
    torch::Tensor out2 = gA2.narrow(0, i, h);
    at::mm_out(out2, H2, B2.t());
    gB2.addmm_(a2.t(), H2);
  }
  if (s != 1.0) {
    for (auto* t : {&gA1, &gB1, &gA2, &gB2}) t->mul_(s);
  }
  return {gA1, gB1, gA2, gB2};
}

void hadamard_write_back(torch::Tensor& P2d, const std::array<torch::Tensor, 4>& before,
                         const std::array<torch::Tensor, 4>& after, double s) {
  // W1'⊙W2' − W1⊙W2 = ΔW1⊙W2' + W1⊙ΔW2, with ΔW = A'·B' − A·B = [A' − A, A]·[B'; B' − B]
  // (one rank-2r product): no cancellation between two large products. Row panels.
  const auto& [A1, B1, A2, B2] = before;
  const auto& [A1n, B1n, A2n, B2n] = after;
  const torch::Tensor L1 = torch::cat({A1n - A1, A1}, 1), R1 = torch::cat({B1n, B1n - B1}, 0);
  const torch::Tensor L2 = torch::cat({A2n - A2, A2}, 1), R2 = torch::cat({B2n, B2n - B2}, 0);
  const int64_t n = P2d.size(0), m = P2d.size(1);
  const int64_t rows = panel_rows(m, A1.scalar_type());
  for (int64_t i = 0; i < n; i += rows) {
    const int64_t h = std::min(rows, n - i);
    torch::Tensor D = torch::mm(L1.narrow(0, i, h), R1).mul_(torch::mm(A2n.narrow(0, i, h), B2n));
    D.addcmul_(torch::mm(A1.narrow(0, i, h), B1), torch::mm(L2.narrow(0, i, h), R2));
    torch::Tensor target = P2d.narrow(0, i, h);
    if (target.scalar_type() == D.scalar_type()) {
      target.add_(D, s);
    } else {
      target.add_(D.mul_(s).to(target.scalar_type()));
    }
  }
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

// On the CPU, draws come from gradlora's own generator (xoshiro256**, seeded by splitmix64)
// and Marsaglia's polar method, computed in double with +, −, ×, ÷, √ and a logarithm written
// here: IEEE-754 gives those the same result on every x86-64 or ARM CPU, whichever vector unit
// it has. LibTorch's normal_ takes an AVX2 path or a scalar path depending on the CPU, and
// libm's log/cos have FMA variants chosen at run time, so neither can promise that two
// data-parallel ranks on different machines draw the same projection. (This file is compiled
// with -ffp-contract=off so that no compiler fuses a multiply-add either.)
struct Xoshiro256 {
  uint64_t s[4];
  explicit Xoshiro256(uint64_t seed) {
    for (auto& w : s) {
      seed += 0x9E3779B97F4A7C15ULL;
      uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
      w = z ^ (z >> 31);
    }
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

// The polar method's factor sqrt(−2·ln q / q)·std for kBatch values of q in (0, 1). The 12
// divisions of the logarithm's series dominate; they run kBatch lanes at a time in vector
// registers (GCC's and Clang's vector types: on x86-64, SSE2 divisions of 2 lanes, or with GCC
// AVX ones of 4 where the CPU has AVX2, chosen at load time), and a vector division rounds each
// lane exactly as a scalar one does, as do +, −, × and √: the same bits on every CPU. With the
// branch-free candidates below, a draw took 8.5–9 ns against 14 one pair at a time (Zen 4). The logarithm:
// q = m·2^e with m in [√½, √2) (q is normal: u, v are multiples of 2^−52, so q ≥ 2^−104),
// then ln q = e·ln 2 + 2·atanh(t), t = (m − 1)/(m + 1), |t| ≤ 0.1716, from the series' first
// 12 terms (t^25/25 < 1e−20).
constexpr int kBatch = 8;
using Lanes = double __attribute__((vector_size(kBatch * sizeof(double))));
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void polar_factors(const double* q, double std, double* f) {
  Lanes m, de, qv;
  for (int l = 0; l < kBatch; ++l) {
    uint64_t bits = 0;
    std::memcpy(&bits, &q[l], sizeof bits);
    const int64_t e = static_cast<int64_t>((bits >> 52) & 0x7ff) - 1022;  // q = m·2^e, m in [0.5, 1)
    bits = (bits & ~(uint64_t{0x7ff} << 52)) | (uint64_t{1022} << 52);
    double ml = 0.0;
    std::memcpy(&ml, &bits, sizeof ml);
    const bool low = ml < 0.70710678118654752440;
    m[l] = low ? ml * 2.0 : ml;
    de[l] = static_cast<double>(low ? e - 1 : e);
    qv[l] = q[l];
  }
  const Lanes t = (m - 1.0) / (m + 1.0), t2 = t * t;
  Lanes sum = t - t, power = t;  // sum: 0 in every lane
  for (int k = 0; k < 12; ++k) {
    sum += power / static_cast<double>(2 * k + 1);
    power *= t2;
  }
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  const Lanes ratio = -2.0 * (de * kLn2Hi + (2.0 * sum + de * kLn2Lo)) / qv;
  for (int l = 0; l < kBatch; ++l) f[l] = std::sqrt(ratio[l]) * std;
}

torch::Tensor cpu_normal(at::IntArrayRef shape, double std, uint64_t seed) {
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(torch::kDouble));
  double* out = t.data_ptr<double>();
  const int64_t count = t.numel();
  Xoshiro256 gen(seed);
  // Candidate pairs (u, v) come from the generator in order, kCandidates at a time, and the
  // accepted ones (0 < q < 1) are kept in order without a branch (a rejection is random, 21 % of
  // candidates: a branch on it is mispredicted often); then kBatch accepted pairs at a time get
  // their factors together. The generator is the draw's own, so candidates drawn past the last
  // pair needed change nothing.
  constexpr int kCandidates = 64;
  double u[kCandidates + kBatch], v[kCandidates + kBatch], q[kCandidates + kBatch];
  double cu[kCandidates], cv[kCandidates], qb[kBatch], f[kBatch];
  int head = 0, have = 0;  // accepted pairs [head, have) not yet used
  for (int64_t i = 0; i < count;) {
    const int pairs = static_cast<int>(std::min<int64_t>(kBatch, (count - i + 1) / 2));
    if (have - head < pairs) {
      std::copy(u + head, u + have, u);
      std::copy(v + head, v + have, v);
      std::copy(q + head, q + have, q);
      have -= head;
      head = 0;
      while (have < pairs) {
        for (int c = 0; c < kCandidates; ++c) {
          cu[c] = 2.0 * gen.uniform() - 1.0;
          cv[c] = 2.0 * gen.uniform() - 1.0;
        }
        for (int c = 0; c < kCandidates; ++c) {  // have < kBatch before a block: it fits
          const double qc = cu[c] * cu[c] + cv[c] * cv[c];
          u[have] = cu[c];
          v[have] = cv[c];
          q[have] = qc;
          have += qc < 1.0 && qc != 0.0;
        }
      }
    }
    for (int l = 0; l < kBatch; ++l) qb[l] = l < pairs ? q[head + l] : 0.5;  // unused lanes: any q in (0, 1)
    polar_factors(qb, std, f);
    for (int p = 0; p < pairs; ++p) {
      out[i++] = u[head + p] * f[p];
      if (i < count) out[i++] = v[head + p] * f[p];
    }
    head += pairs;
  }
  return t;
}

torch::Tensor cpu_uniform(at::IntArrayRef shape, double low, double high, uint64_t seed) {
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(torch::kDouble));
  double* out = t.data_ptr<double>();
  Xoshiro256 gen(seed);
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = low + (high - low) * gen.uniform();
  return t;
}

// On an accelerator, the draw happens there, with a copy of that device's default generator
// seeded with `seed` (so the global generator's state is left alone).
at::Generator device_generator(const torch::Device& device, uint64_t seed) {
  at::Generator gen = at::globalContext().defaultGenerator(device).clone();
  gen.set_current_seed(seed);
  return gen;
}

torch::ScalarType draw_dtype(const torch::TensorOptions& options) {
  const auto dtype = options.dtype().toScalarType();
  return dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
}

}  // namespace

torch::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed, const torch::TensorOptions& options) {
  const auto dtype = options.dtype().toScalarType();
  if (options.device().is_cpu()) return cpu_normal(shape, std, seed).to(dtype);
  torch::Tensor t = torch::empty(shape, options.dtype(draw_dtype(options)));
  t.normal_(0.0, std, device_generator(options.device(), seed));
  return t.to(dtype);
}

torch::Tensor seeded_kaiming_uniform(at::IntArrayRef shape, uint64_t seed, const torch::TensorOptions& options) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(shape.size() > 1 ? shape[1] : shape[0]));
  const auto dtype = options.dtype().toScalarType();
  if (options.device().is_cpu()) return cpu_uniform(shape, -bound, bound, seed).to(dtype);
  torch::Tensor t = torch::empty(shape, options.dtype(draw_dtype(options)));
  t.uniform_(-bound, bound, device_generator(options.device(), seed));
  return t.to(dtype);
}

torch::ScalarType factor_dtype(torch::ScalarType param_dtype) {
  return param_dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
}

}  // namespace gradlora
