// The CPU kernels behind lora_factor_grads, galore_project, add_product and lora_write_back,
// against products computed in double by the library (torch::mm), over shapes that exercise
// every tail: rows not a multiple of the kernels' row groups, columns not a multiple of the
// vector width, ranks not a multiple of the factor groups, rows with a stride wider than m,
// and more than one row chunk. Skipped where the CPU has no such kernels.
#include "test_util.h"

#include <gradlora/maths.h>

#include <ATen/Parallel.h>

namespace gradlora::testing {
namespace {

struct Shape {
  int64_t n, m, r;
};

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

// On 1 thread and on 2 (which the kernels' loops really use: the library is built with the
// threading that at::parallel_for needs), every kernel gives the same bits.
TEST_P(Kernels, ResultsDoNotDependOnTheThreadCount) {
  const int threads = at::get_num_threads();
  const torch::Tensor G = strided_rows(600, 515, GetParam());
  const torch::Tensor A = torch::randn({600, 9}), B = torch::randn({9, 515});
  const torch::Tensor A1 = torch::randn({600, 9}), B1 = torch::randn({9, 515});
  const torch::Tensor P0 = strided_rows(600, 515, GetParam());
  std::vector<torch::Tensor> out[2];
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    EXPECT_EQ(cpu_kernel_threads(), t);
    auto [ga, gb] = lora_factor_grads(G, A, B, 1.5);
    auto [sa, sb] = additive_factor_grads(G, 16);
    torch::Tensor P = P0.clone();
    lora_write_back(P, A, B, A1, B1, 0.7);
    torch::Tensor Q = P0.clone();
    additive_write_back(Q, sa, sb, 0.3);
    out[t - 1] = {ga, gb, sa, sb, P, Q};
  }
  at::set_num_threads(threads);
  for (size_t i = 0; i < out[0].size(); ++i) EXPECT_TRUE(torch::equal(out[0][i], out[1][i])) << "result " << i;
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

// The additive form's sums and write-back, against loops over the definitions (in double).
TEST_P(Kernels, AdditiveSumsAndWriteBackEqualTheirDefinitions) {
  for (const int64_t r : {1, 2, 4, 8, 16, 32}) {
    for (const auto& [n, m] : {std::pair<int64_t, int64_t>{37, 50}, {130, 515}, {600, 33}}) {
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

}  // namespace
}  // namespace gradlora::testing
