// The CPU kernels behind lora_factor_grads, galore_project, add_product and lora_write_back,
// against products computed in double by the library (torch::mm), over shapes that exercise
// every tail: rows not a multiple of the kernels' row groups, columns not a multiple of the
// vector width, ranks not a multiple of the factor groups, rows with a stride wider than m,
// and more than one row chunk; and against the order of their sums written out in scalar
// code, bit for bit (the contract every instruction set's kernels keep). Skipped where the
// CPU has no such kernels.
#include "test_util.h"

#include <gradlora/maths.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace gradlora::testing {
namespace {

struct Shape {
  int64_t n, m, r;
};

// On AVX2 the write-back packs the left factors of rows of at least 16 strips of 16 columns
// (129×515, 64×2048) and reads them in place on narrower ones (the others); rows come in
// groups of 6 within panels of 60, so every shape but 300×47 and 600×100 ends in a partial
// group (of 1 to 5 rows).
const std::vector<Shape> kShapes{{1, 1, 1},     {3, 17, 1},     {5, 33, 3},    {70, 130, 5},
                                 {129, 515, 8}, {600, 100, 32}, {64, 2048, 7}, {300, 47, 13}};

// max |x − ref| / max |ref|, ref in double.
double rel_error(const torch::Tensor& x, const torch::Tensor& ref) {
  const double scale = ref.abs().max().item<double>();
  return (x.to(torch::kDouble) - ref).abs().max().item<double>() / std::max(scale, 1e-300);
}

// A float n×m matrix whose rows are `pad` floats wider than m (row stride m + pad).
torch::Tensor strided_rows(int64_t n, int64_t m, int64_t pad) {
  return torch::randn({n, m + pad}).narrow(1, pad / 2, m);
}

class Kernels : public ::testing::TestWithParam<int64_t> {  // param: row padding of G / P
 protected:
  void SetUp() override {
    if (!cpu_kernels_active()) GTEST_SKIP() << "no CPU kernels on this CPU";
    torch::manual_seed(7);
  }
};

TEST_P(Kernels, FactorGradsEqualTheTwoProducts) {
  for (const Shape& sh : kShapes) {
    const torch::Tensor G = strided_rows(sh.n, sh.m, GetParam());
    const torch::Tensor A = torch::randn({sh.n, sh.r}), B = torch::randn({sh.r, sh.m});
    const double s = 0.37;
    auto [gA, gB] = lora_factor_grads(G, A, B, s);
    const torch::Tensor Gd = G.to(torch::kDouble);
    const double eA = rel_error(gA, torch::mm(Gd, B.to(torch::kDouble).t()) * s);
    const double eB = rel_error(gB, torch::mm(A.to(torch::kDouble).t(), Gd) * s);
    EXPECT_LT(eA, 1e-5) << "gA at " << sh.n << "x" << sh.m << " r " << sh.r;
    EXPECT_LT(eB, 1e-5) << "gB at " << sh.n << "x" << sh.m << " r " << sh.r;
  }
}

TEST_P(Kernels, GaloreProjectionsEqualTheProducts) {
  for (const Shape& sh : kShapes) {
    const torch::Tensor G = strided_rows(sh.n, sh.m, GetParam());
    const torch::Tensor Ql = torch::randn({sh.n, sh.r}), Qr = torch::randn({sh.m, sh.r});
    const torch::Tensor Gd = G.to(torch::kDouble);
    EXPECT_LT(rel_error(galore_project(Ql, G, true), torch::mm(Ql.to(torch::kDouble).t(), Gd)), 1e-5)
        << "left at " << sh.n << "x" << sh.m << " r " << sh.r;
    EXPECT_LT(rel_error(galore_project(Qr, G, false), torch::mm(Gd, Qr.to(torch::kDouble))), 1e-5)
        << "right at " << sh.n << "x" << sh.m << " r " << sh.r;
  }
}

TEST_P(Kernels, WriteBacksEqualTheProducts) {
  for (const Shape& sh : kShapes) {
    const double s = -0.61;
    const torch::Tensor A0 = torch::randn({sh.n, sh.r}), B0 = torch::randn({sh.r, sh.m});
    const torch::Tensor A1 = A0 + 0.1 * torch::randn({sh.n, sh.r}), B1 = B0 + 0.1 * torch::randn({sh.r, sh.m});
    const auto d = [](const torch::Tensor& t) { return t.to(torch::kDouble); };
    const torch::Tensor change = torch::mm(d(A1), d(B1)) - torch::mm(d(A0), d(B0));
    // In place: P ← P + s·(A1·B1 − A0·B0); the change is compared, P's own rounding aside.
    torch::Tensor P = strided_rows(sh.n, sh.m, GetParam());
    const torch::Tensor before = d(P);
    lora_write_back(P, A0, B0, A1, B1, s);
    EXPECT_LT(rel_error(d(P) - before, change * s), 2e-5) << "in place at " << sh.n << "x" << sh.m;
    // From a base: P ← base + s·(…), P's previous values unused.
    const torch::Tensor base = torch::randn({sh.n, sh.m});
    torch::Tensor Q = strided_rows(sh.n, sh.m, GetParam());
    lora_write_back(Q, A0, B0, A1, B1, s, base);
    EXPECT_LT(rel_error(d(Q) - d(base), change * s), 2e-5) << "from a base at " << sh.n << "x" << sh.m;
    // add_product, also with a transposed (non-contiguous) right factor.
    torch::Tensor R = strided_rows(sh.n, sh.m, GetParam());
    const torch::Tensor Rb = d(R);
    const torch::Tensor Nt = torch::randn({sh.m, sh.r});
    add_product(R, A1, Nt.t(), s);
    EXPECT_LT(rel_error(d(R) - Rb, torch::mm(d(A1), d(Nt).t()) * s), 2e-5) << "add_product at " << sh.n << "x" << sh.m;
    // A decoupled decay folded into the same pass: P ← 0.9·P + s·(A1·B1 − A0·B0).
    torch::Tensor D = strided_rows(sh.n, sh.m, GetParam());
    const torch::Tensor Db = d(D);
    lora_write_back(D, A0, B0, A1, B1, s, {}, 0.9);
    EXPECT_LT(rel_error(d(D) - 0.9 * Db, change * s), 2e-5) << "with decay at " << sh.n << "x" << sh.m;
  }
}

// Every kernel's result on one set of inputs: both factor gradients, the additive sums
// (r = 16 and r = 4), a write-back in place and from a base with decay, both additive
// write-backs, and galore's two projections.
std::vector<torch::Tensor> every_kernel(int64_t pad) {
  torch::manual_seed(11);
  const torch::Tensor G = strided_rows(600, 515, pad);
  const torch::Tensor A = torch::randn({600, 9}), B = torch::randn({9, 515});
  const torch::Tensor A1 = torch::randn({600, 9}), B1 = torch::randn({9, 515});
  const torch::Tensor P0 = strided_rows(600, 515, pad), base = torch::randn({600, 515});
  auto [ga, gb] = lora_factor_grads(G, A, B, 1.5);
  auto [sa, sb] = additive_factor_grads(G, 16);
  auto [ta, tb] = additive_factor_grads(G, 4);
  torch::Tensor P = P0.clone();
  lora_write_back(P, A, B, A1, B1, 0.7);
  torch::Tensor D = P0.clone();
  lora_write_back(D, A, B, A1, B1, -0.3, base, 0.9);
  torch::Tensor Q = P0.clone();
  additive_write_back(Q, sa, sb, 0.3);
  torch::Tensor T = P0.clone();
  additive_write_back(T, ta, tb, -0.2);
  return {ga, gb, sa, sb, ta, tb, P, D, Q, T, galore_project(A, G, true), galore_project(B.t().contiguous(), G, false)};
}

// The order in which the kernels add, written out in scalar float arithmetic (std::fma: one
// rounding, as a vector FMA lane): every instruction set must reproduce it bit for bit, which
// is what makes their results the same bits on every CPU that has the kernels.
//   s·G·Bᵀ: 16 lane partials per (i, k), lane l summing the columns j ≡ l (mod 16) in order,
//           then added in a fixed tree (lane_sum) and scaled by s.
//   Aᵀ·G:   rows split into chunks (at most 8, of at least 64 rows); each chunk sums its rows in
//           order from 0; the chunks' sums are added in chunk order, then scaled by s.
//   P ← beta·base + s·x, x = Σ over the terms' factor columns in order, from 0.
float model_lane_sum(const float* v) {
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) h[l] += h[l + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
}

torch::Tensor model_gbt(const torch::Tensor& G, const torch::Tensor& B, float s) {  // s·G·Bᵀ, n×r
  const int64_t n = G.size(0), m = G.size(1), r = B.size(0);
  torch::Tensor out = torch::empty({n, r});
  auto g = G.accessor<float, 2>();
  auto b = B.accessor<float, 2>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < r; ++k) {
      float lanes[16] = {};
      for (int64_t j = 0; j < m; ++j) lanes[j % 16] = std::fma(g[i][j], b[k][j], lanes[j % 16]);
      out[i][k] = s * model_lane_sum(lanes);
    }
  }
  return out;
}

torch::Tensor model_atg(const torch::Tensor& A, const torch::Tensor& G, float s) {  // s·Aᵀ·G, r×m
  const int64_t n = G.size(0), m = G.size(1), r = A.size(1);
  const int64_t chunks = std::clamp<int64_t>(n / 64, 1, 8), rows = (n + chunks - 1) / chunks;
  torch::Tensor out = torch::zeros({r, m});
  auto g = G.accessor<float, 2>();
  auto a = A.accessor<float, 2>();
  auto o = out.accessor<float, 2>();
  for (int64_t c0 = 0; c0 < n; c0 += rows) {
    for (int64_t k = 0; k < r; ++k) {
      for (int64_t j = 0; j < m; ++j) {
        float x = 0.0f;
        for (int64_t i = c0; i < std::min(n, c0 + rows); ++i) x = std::fma(a[i][k], g[i][j], x);
        o[k][j] = c0 == 0 ? x : o[k][j] + x;
      }
    }
  }
  if (s != 1.0f) out.mul_(s);  // one rounding per element, as the kernels' scaling
  return out;
}

// beta·base + s·(L1·R1 + L2·R2), the sum over the factor columns of L1 then L2.
torch::Tensor model_write_back(const torch::Tensor& base, const torch::Tensor& L1, const torch::Tensor& R1,
                               const torch::Tensor& L2, const torch::Tensor& R2, float s, float beta) {
  const int64_t n = base.size(0), m = base.size(1);
  torch::Tensor out = torch::empty({n, m});
  auto p = base.accessor<float, 2>();
  auto o = out.accessor<float, 2>();
  auto l1 = L1.accessor<float, 2>();
  auto r1 = R1.accessor<float, 2>();
  auto l2 = L2.accessor<float, 2>();
  auto r2 = R2.accessor<float, 2>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      float x = 0.0f;
      for (int64_t k = 0; k < L1.size(1); ++k) x = std::fma(l1[i][k], r1[k][j], x);
      for (int64_t k = 0; k < L2.size(1); ++k) x = std::fma(l2[i][k], r2[k][j], x);
      o[i][j] = std::fma(s, x, beta == 1.0f ? p[i][j] : beta * p[i][j]);
    }
  }
  return out;
}

TEST_P(Kernels, ResultsFollowTheirSummationOrderBitForBit) {
  for (const Shape& sh : kShapes) {
    const torch::Tensor G = strided_rows(sh.n, sh.m, GetParam());
    const torch::Tensor A = torch::randn({sh.n, sh.r}), B = torch::randn({sh.r, sh.m});
    const torch::Tensor A1 = torch::randn({sh.n, sh.r}), B1 = torch::randn({sh.r, sh.m});
    const std::string at = std::to_string(sh.n) + "x" + std::to_string(sh.m) + " r " + std::to_string(sh.r);
    auto [gA, gB] = lora_factor_grads(G, A, B, 0.37);
    EXPECT_TRUE(torch::equal(gA, model_gbt(G, B, 0.37f))) << "gA at " << at;
    EXPECT_TRUE(torch::equal(gB, model_atg(A, G, 0.37f))) << "gB at " << at;
    EXPECT_TRUE(torch::equal(galore_project(A, G, true), model_atg(A, G, 1.0f))) << "Qᵀ·G at " << at;
    const torch::Tensor Q = torch::randn({sh.m, sh.r});
    EXPECT_TRUE(torch::equal(galore_project(Q, G, false), model_gbt(G, Q.t().contiguous(), 1.0f))) << "G·Q at " << at;
    const torch::Tensor dA = A1 - A, dB = B1 - B;
    torch::Tensor P = strided_rows(sh.n, sh.m, GetParam());
    const torch::Tensor P0 = P.clone();
    lora_write_back(P, A, B, A1, B1, -0.61);
    EXPECT_TRUE(torch::equal(P, model_write_back(P0, dA, B1, A, dB, -0.61f, 1.0f))) << "write-back at " << at;
    const torch::Tensor base = torch::randn({sh.n, sh.m});
    lora_write_back(P, A, B, A1, B1, 0.25, base, 0.9);
    EXPECT_TRUE(torch::equal(P, model_write_back(base, dA, B1, A, dB, 0.25f, 0.9f))) << "decayed write-back at " << at;
  }
}

// On 1 thread and on 2 (which the kernels' loops really use: the library is built with the
// threading that at::parallel_for needs), every kernel gives the same bits.
TEST_P(Kernels, ResultsDoNotDependOnTheThreadCount) {
  const int threads = at::get_num_threads();
  std::vector<torch::Tensor> out[2];
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    EXPECT_EQ(cpu_kernel_threads(), t);
    out[t - 1] = every_kernel(GetParam());
  }
  at::set_num_threads(threads);
  for (size_t i = 0; i < out[0].size(); ++i) EXPECT_TRUE(torch::equal(out[0][i], out[1][i])) << "result " << i;
}

// The AVX2 kernels compute every lane as the AVX-512F ones do: the same bits. Only a CPU with
// AVX-512F runs both.
TEST_P(Kernels, ResultsDoNotDependOnTheInstructionSet) {
  if (cpu_kernels_isa() != "avx512f") GTEST_SKIP() << "needs AVX-512F; this CPU runs " << cpu_kernels_isa();
  const std::vector<torch::Tensor> wide = every_kernel(GetParam());
  ASSERT_TRUE(set_cpu_kernels_isa("avx2"));
  const std::vector<torch::Tensor> narrow = every_kernel(GetParam());
  ASSERT_TRUE(set_cpu_kernels_isa("avx512f"));
  for (size_t i = 0; i < wide.size(); ++i) EXPECT_TRUE(torch::equal(wide[i], narrow[i])) << "result " << i;
}

TEST_P(Kernels, LibraryPathAgreesWhenTheKernelsAreOff) {
  const torch::Tensor G = strided_rows(129, 515, GetParam());
  const torch::Tensor A = torch::randn({129, 8}), B = torch::randn({8, 515});
  auto [k1, k2] = lora_factor_grads(G, A, B, 2.0);
  set_cpu_kernels_enabled(false);
  EXPECT_FALSE(cpu_kernels_active());
  auto [l1, l2] = lora_factor_grads(G, A, B, 2.0);
  set_cpu_kernels_enabled(true);
  EXPECT_LT(rel_error(k1, l1.to(torch::kDouble)), 1e-5);
  EXPECT_LT(rel_error(k2, l2.to(torch::kDouble)), 1e-5);
}

// The additive form's sums and write-back, against loops over the definitions (in double);
// 5 rows: fewer than r, so that some row classes have no row; 4200 rows: chunks of 525, which
// take two or more whole blocks of a class's rows side by side at every r and then single rows.
TEST_P(Kernels, AdditiveSumsAndWriteBackEqualTheirDefinitions) {
  for (const int64_t r : {1, 2, 4, 8, 16, 32, 64, 128}) {
    for (const auto& [n, m] : {std::pair<int64_t, int64_t>{37, 50}, {130, 515}, {600, 33}, {5, 50}, {4200, 150}}) {
      const torch::Tensor G = strided_rows(n, m, GetParam());
      auto [gA, gB] = additive_factor_grads(G, r);
      const torch::Tensor Gd = G.to(torch::kDouble).contiguous();
      torch::Tensor refA = torch::zeros({n, r}, torch::kDouble), refB = torch::zeros({r, m}, torch::kDouble);
      auto g = Gd.accessor<double, 2>();
      auto a = refA.accessor<double, 2>();
      auto b = refB.accessor<double, 2>();
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          a[i][j % r] += g[i][j];
          b[i % r][j] += g[i][j];
        }
      }
      EXPECT_LT(rel_error(gA, refA), 1e-5) << "gA, r " << r << " at " << n << "x" << m;
      EXPECT_LT(rel_error(gB, refB), 1e-5) << "gB, r " << r << " at " << n << "x" << m;
      const torch::Tensor dA = torch::randn({n, r}), dB = torch::randn({r, m});
      torch::Tensor P = strided_rows(n, m, GetParam());
      const torch::Tensor before = P.to(torch::kDouble);
      additive_write_back(P, dA, dB, 0.3);
      torch::Tensor change = torch::zeros({n, m}, torch::kDouble);
      auto c = change.accessor<double, 2>();
      const torch::Tensor dAd = dA.to(torch::kDouble), dBd = dB.to(torch::kDouble);
      auto da = dAd.accessor<double, 2>();
      auto db = dBd.accessor<double, 2>();
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j) c[i][j] = 0.3 * (da[i][j % r] + db[i % r][j]);
      }
      EXPECT_LT(rel_error(P.to(torch::kDouble) - before, change), 1e-5)
          << "write-back, r " << r << " at " << n << "x" << m;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(RowPadding, Kernels, ::testing::Values<int64_t>(0, 5));

// The kernels run on every x86-64 CPU with AVX2 and FMA (so the tests above skip only where
// they cannot), on the best instruction set the CPU has; they can be turned off, limited to a
// set, and back on; a set the CPU lacks is refused without a change, an unknown name is an
// error naming it.
TEST(KernelSelection, BestInstructionSetByDefaultAndOnRequest) {
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string best = __builtin_cpu_supports("avx512f")                                   ? "avx512f"
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? "avx2"
                                                                                               : "none";
#else
  const std::string best = "none";
#endif
  EXPECT_EQ(cpu_kernels_isa(), best);
  EXPECT_EQ(cpu_kernels_active(), best != "none");
  ASSERT_TRUE(set_cpu_kernels_isa("none"));
  EXPECT_FALSE(cpu_kernels_active());
  EXPECT_EQ(cpu_kernels_isa(), "none");
  set_cpu_kernels_enabled(true);
  EXPECT_EQ(cpu_kernels_isa(), best);
  if (best == "avx2") {
    EXPECT_FALSE(set_cpu_kernels_isa("avx512f"));
    EXPECT_EQ(cpu_kernels_isa(), "avx2");
  }
  if (best != "none") {
    EXPECT_TRUE(set_cpu_kernels_isa("avx2"));
    EXPECT_EQ(cpu_kernels_isa(), "avx2");
    EXPECT_TRUE(set_cpu_kernels_isa(best));
  }
  try {
    set_cpu_kernels_isa("sse9");
    ADD_FAILURE() << "an unknown instruction set was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'sse9'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cpu_kernels_isa(), best);
}

}  // namespace
}  // namespace gradlora::testing
