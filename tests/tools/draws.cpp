// Writes a fixed set of seeded draws to the file named by argv[1], as raw bytes: gradlora's
// seeded_normal (fp32, fp64) and seeded_kaiming_uniform (fp32), then LibTorch's own fp32
// normal_ from a CPU generator with the same seed (the control). Run by the portability test
// in child processes with different ATEN_CPU_CAPABILITY settings.
#include <gradlora/maths.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_FILE\n", argv[0]);
    return 2;
  }
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const uint64_t seed = gradlora::derive_seed(7, "layers.0.weight", 3);
  at::Generator gen = at::detail::createCPUGenerator(seed);
  torch::Tensor torch_normal = torch::empty({1024, 8}, f32);
  torch_normal.normal_(0.0, 0.3, gen);
  const torch::Tensor parts[] = {gradlora::seeded_normal({1024, 8}, 0.3, seed, f32),
                                 gradlora::seeded_normal({8, 999}, 0.3, seed + 1, f64),
                                 gradlora::seeded_kaiming_uniform({8, 1024}, seed + 2, f32), torch_normal};
  std::FILE* out = std::fopen(argv[1], "wb");
  if (!out) return 1;
  for (const auto& t : parts) {
    const torch::Tensor c = t.contiguous();
    std::fwrite(c.data_ptr(), c.element_size(), static_cast<size_t>(c.numel()), out);
  }
  return std::fclose(out) == 0 ? 0 : 1;
}
