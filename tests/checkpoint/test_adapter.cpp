// Adapters: the safetensors format (own round trip, a fixture from an
// independent writer, malformed files) and PEFT LoRA export → import.
#include "ckpt_util.h"

#include <gradlora/adapter.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>

#include <unistd.h>

namespace gradlora::ckpt_test {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kData = fs::path(GRADLORA_SOURCE_DIR) / "tests" / "data";

template <typename Fn>
std::string adapter_error(Fn&& fn) {
  try {
    fn();
  } catch (const AdapterError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected AdapterError";
  return {};
}

// ----------------------------------------------------------- safetensors

TEST(Safetensors, RoundTripOfEveryDtype) {
  const std::string dir = temp_dir("adapter"), path = dir + "/t.safetensors";
  const NamedTensors in = {
      {"f32", torch::randn({3, 5})},
      {"f64", torch::randn({4}, torch::kDouble)},
      {"bf16", torch::randn({2, 3}).to(torch::kBFloat16)},
      {"f16", torch::randn({7}).to(torch::kHalf)},
      {"i64", torch::arange(-3, 3, torch::kLong)},
      {"i32", torch::arange(0, 5, torch::kInt)},
      {"u8", torch::arange(250, 256).to(torch::kUInt8)},
      {"bool", torch::tensor({true, false, true})},
      {"empty", torch::zeros({0, 4})},
      {"scalar", torch::tensor(2.5)},
      {"strided", torch::randn({4, 6}).t()},  // non-contiguous input
  };
  write_safetensors(path, in, {{"format", "pt"}});
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  EXPECT_EQ((8 + n) % 8, 0u) << "data starts 8-byte aligned";
  const json header = json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["f32"]["dtype"], "F32");
  EXPECT_EQ(header["bf16"]["dtype"], "BF16");
  EXPECT_EQ(header["strided"]["shape"], json::array({6, 4}));
  EXPECT_EQ(header["__metadata__"]["format"], "pt");

  const SafetensorsFile out = read_safetensors(path);
  EXPECT_EQ(out.metadata.at("format"), "pt");
  ASSERT_EQ(out.tensors.size(), in.size());
  for (const auto& [name, t] : in) {
    SCOPED_TRACE(name);
    const torch::Tensor& r = out.tensors.at(name);
    EXPECT_EQ(r.scalar_type(), t.scalar_type());
    EXPECT_EQ(r.sizes(), t.sizes());
    EXPECT_TRUE(torch::equal(r, t));
  }
  fs::remove_all(dir);
}

// The fixture was written by scripts/gen_safetensors_fixture.py with Python's
// struct and json modules only (no padding, header order ≠ data order).
TEST(Safetensors, ReadsAFileFromAnIndependentWriter) {
  const SafetensorsFile f = read_safetensors((kData / "safetensors" / "fixture.safetensors").string());
  EXPECT_EQ(f.metadata.at("writer"), "gen_safetensors_fixture.py");
  ASSERT_EQ(f.tensors.size(), 8u);
  // Values: the formulas of the generator.
  torch::Tensor f32 = torch::arange(6, torch::kFloat).mul(0.25).sub(1.0).view({2, 3});
  EXPECT_TRUE(torch::equal(f.tensors.at("a.f32"), f32));
  torch::Tensor f64 = torch::tensor({1.0 / 3.0, -2.5, 1e-300, 6.02214076e23}, torch::kDouble);
  EXPECT_TRUE(torch::equal(f.tensors.at("b.f64"), f64));
  torch::Tensor bf16 = torch::tensor({1.5f, -2.0f, 0.15625f, 3.0f, -0.0078125f, 256.0f}).view({3, 2});
  EXPECT_EQ(f.tensors.at("c.bf16").scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(f.tensors.at("c.bf16").to(torch::kFloat), bf16));
  torch::Tensor f16 = torch::tensor({0.5f, -1.25f, 65504.0f, 0.000060975551605224609375f}).view({2, 2});
  EXPECT_EQ(f.tensors.at("d.f16").scalar_type(), torch::kHalf);
  EXPECT_TRUE(torch::equal(f.tensors.at("d.f16").to(torch::kFloat), f16));
  EXPECT_TRUE(torch::equal(f.tensors.at("e.i64"), torch::tensor({int64_t{-1}, int64_t{1} << 40, int64_t{7}})));
  EXPECT_TRUE(torch::equal(f.tensors.at("f.u8"), torch::tensor({0, 1, 127, 128, 255}).to(torch::kUInt8)));
  EXPECT_TRUE(torch::equal(f.tensors.at("g.bool"), torch::tensor({true, false})));
  EXPECT_EQ(f.tensors.at("h.empty").sizes(), (std::vector<int64_t>{0, 3}));
}

TEST(Safetensors, MalformedFilesThrowNamingTheProblem) {
  const std::string dir = temp_dir("adapter");
  auto file_with = [&](const std::string& header, const std::string& data) {
    std::string bytes(8, '\0');
    const uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    const std::string p = dir + "/bad.safetensors";
    write_bytes(p, bytes + header + data);
    return p;
  };
  const std::string eight(8, 'x');
  struct Bad {
    std::string header, data, fragment;
  };
  const std::vector<Bad> cases = {
      {"{", "", "not valid JSON"},
      {"[1, 2]", "", "not a JSON object"},
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}})", eight, "outside the data"},
      {R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", eight, "needs 12"},
      {R"({"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}})", eight, "dtype 'Q7'"},
      {R"({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", eight, "shape entry -2"},
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}})", eight, "outside the data"},
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", eight, "not claimed"},
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
       R"( "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
       eight, "claimed twice"},
      {R"({"t": {"dtype": "F32", "shape": [2]}})", eight, "data_offsets"},
      {R"({"t": {"dtype": "U8", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 8]}})", eight, "too large"},
      {R"({"__metadata__": {"k": 3}})", "", "__metadata__.k"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.header);
    const std::string p = file_with(c.header, c.data);
    const std::string msg = adapter_error([&] { read_safetensors(p); });
    EXPECT_NE(msg.find(c.fragment), std::string::npos) << msg;
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
  }
  // A header length larger than the file, and a file shorter than 8 bytes.
  write_bytes(dir + "/big.safetensors", std::string("\xff\xff\xff\x00\x00\x00\x00\x00{}", 10));
  EXPECT_NE(adapter_error([&] { read_safetensors(dir + "/big.safetensors"); }).find("header length"),
            std::string::npos);
  write_bytes(dir + "/short.safetensors", "abc");
  EXPECT_NE(adapter_error([&] { read_safetensors(dir + "/short.safetensors"); }).find("too short"), std::string::npos);
  fs::remove_all(dir);
}

// -------------------------------------------------------------- adapters

struct ConvNetImpl : torch::nn::Module {
  ConvNetImpl() : conv(register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 5, 3)))) {}
  torch::Tensor forward(const torch::Tensor& x) { return conv->forward(x).pow(2).mean(); }
  torch::nn::Conv2d conv;
};
TORCH_MODULE(ConvNet);

std::string lora_yaml(const std::string& init, const std::string& writeback) {
  // Different ranks and alphas per module exercise rank_pattern / alpha_pattern.
  return fmt::format(
      "optimizer:\n  type: adamw\n  lr: 0.02\ntargets:\n"
      "  - match: fc1.weight\n    method: lora\n    rank: 3\n    alpha: 6\n    init: {0}\n    writeback: {1}\n"
      "  - match: fc2.weight\n    method: lora\n    rank: 2\n    alpha: 1\n    init: {0}\n    writeback: {1}\n"
      "  - match: \"*.bias\"\n    method: full\n",
      init, writeback);
}

TEST(Adapter, ExportThenImportReproducesTheWeightChange) {
  for (const char* init : {"zero", "symmetric", "gradient"}) {
    for (const char* wb : {"incremental", "exact"}) {
      SCOPED_TRACE(fmt::format("init {}, writeback {}", init, wb));
      const std::string dir = temp_dir("adapter");
      Net net = make_net(1);
      LowRankOptimizer opt(net->named_parameters(), quiet(lora_yaml(init, wb)));
      train(net, opt, 0, 25);
      const AdapterExport info = export_adapter(opt, dir, AdapterOptions{"tests/mlp", "base_model.model.", {}});
      EXPECT_EQ(info.modules, (std::vector<std::string>{"fc1", "fc2"}));
      EXPECT_EQ(info.skipped, (std::vector<std::string>{"fc1.bias", "fc2.bias"}));
      const int64_t k = std::string(init) == "zero" ? 1 : 2;  // symmetric, gradient: rank 2r

      // adapter_config.json
      const json cfg = json::parse(read_bytes(dir + "/adapter_config.json"));
      EXPECT_EQ(cfg["peft_type"], "LORA");
      EXPECT_EQ(cfg["r"], 3 * k);
      EXPECT_DOUBLE_EQ(cfg["lora_alpha"].get<double>(), 6.0 * k);  // scale alpha/r = 2 = s
      EXPECT_EQ(cfg["rank_pattern"]["fc2"], 2 * k);
      EXPECT_DOUBLE_EQ(cfg["alpha_pattern"]["fc2"].get<double>(), 1.0 * k);
      EXPECT_EQ(cfg["target_modules"], json::array({"fc1", "fc2"}));
      EXPECT_EQ(cfg["base_model_name_or_path"], "tests/mlp");
      // adapter_model.safetensors: PEFT's keys and orientation.
      const SafetensorsFile st = read_safetensors(dir + "/adapter_model.safetensors");
      ASSERT_EQ(st.tensors.size(), 4u);
      EXPECT_EQ(st.tensors.at("base_model.model.fc1.lora_A.weight").sizes(), (std::vector<int64_t>{3 * k, kIn}));
      EXPECT_EQ(st.tensors.at("base_model.model.fc1.lora_B.weight").sizes(), (std::vector<int64_t>{kHidden, 3 * k}));
      EXPECT_EQ(st.tensors.at("base_model.model.fc2.lora_A.weight").sizes(), (std::vector<int64_t>{2 * k, kHidden}));
      EXPECT_EQ(st.tensors.at("base_model.model.fc2.lora_B.weight").sizes(), (std::vector<int64_t>{kOut, 2 * k}));
      EXPECT_EQ(st.metadata.at("format"), "pt");

      // Import into the untrained model: the weights become the trained ones.
      Net base = make_net(1);
      const torch::Tensor b1 = base->fc(1)->bias.detach().clone();
      const auto changed = load_adapter(base->named_parameters(), dir);
      EXPECT_EQ(changed, (std::vector<std::string>{"fc1.weight", "fc2.weight"}));
      for (const char* name : {"fc1.weight", "fc2.weight"}) {
        // named_parameters() returns a temporary: copy the (shallow) tensor handles out of it.
        const torch::Tensor W = *net->named_parameters().find(name);
        const torch::Tensor L = *base->named_parameters().find(name);
        const torch::Tensor W0 = *make_net(1)->named_parameters().find(name);
        EXPECT_GT((W - W0).abs().max().item<double>(), 1e-2) << name << ": training changed little";
        EXPECT_LE((L - W).abs().max().item<double>(), 1e-6) << name;
      }
      EXPECT_TRUE(torch::equal(base->fc(1)->bias, b1)) << "biases are not in a LoRA adapter";
      fs::remove_all(dir);
    }
  }
}

TEST(Adapter, ConvKernelsUsePeftConvShapes) {
  const std::string dir = temp_dir("adapter");
  torch::manual_seed(3);
  ConvNet net;
  const torch::Tensor W0 = net->conv->weight.detach().clone();
  LowRankOptimizer opt(net->named_parameters(),
                       quiet("optimizer:\n  type: adam\n  lr: 0.05\ntargets:\n  - match: conv.weight\n"
                             "    method: lora\n    rank: 2\n    init: symmetric\n"));
  for (int i = 0; i < 10; ++i) {
    opt.zero_grad();
    net->forward(torch::randn({2, 3, 8, 8})).backward();
    opt.step();
  }
  export_adapter(opt, dir);
  const SafetensorsFile st = read_safetensors(dir + "/adapter_model.safetensors");
  EXPECT_EQ(st.tensors.at("base_model.model.conv.lora_A.weight").sizes(), (std::vector<int64_t>{4, 3, 3, 3}));
  EXPECT_EQ(st.tensors.at("base_model.model.conv.lora_B.weight").sizes(), (std::vector<int64_t>{5, 4, 1, 1}));
  torch::OrderedDict<std::string, torch::Tensor> base;
  base.insert("conv.weight", W0.clone());
  load_adapter(base, dir);
  EXPECT_GT((net->conv->weight - W0).abs().max().item<double>(), 1e-2);
  EXPECT_LE((base["conv.weight"] - net->conv->weight).abs().max().item<double>(), 1e-6);
  fs::remove_all(dir);
}

// tests/data/adapter_fixture was written by scripts/gen_safetensors_fixture.py
// (PEFT's layout, with rank_pattern and alpha_pattern); the expected weight
// changes were computed there in Python floats.
TEST(Adapter, LoadsAFixtureFromAnIndependentWriter) {
  torch::OrderedDict<std::string, torch::Tensor> params;
  params.insert("layers.0.proj.weight", torch::ones({3, 4}));
  params.insert("layers.1.proj.weight", torch::zeros({2, 3}, torch::kDouble));
  params.insert("layers.1.proj.bias", torch::zeros({2}));
  const auto changed = load_adapter(params, (kData / "adapter_fixture").string());
  EXPECT_EQ(changed, (std::vector<std::string>{"layers.0.proj.weight", "layers.1.proj.weight"}));
  const SafetensorsFile expected =
      read_safetensors((kData / "safetensors" / "adapter_fixture_expected.safetensors").string());
  EXPECT_LE((params["layers.0.proj.weight"].to(torch::kDouble) - 1.0 - expected.tensors.at("layers.0.proj.weight"))
                .abs()
                .max()
                .item<double>(),
            1e-6);
  EXPECT_LE((params["layers.1.proj.weight"] - expected.tensors.at("layers.1.proj.weight")).abs().max().item<double>(),
            1e-12);
  EXPECT_TRUE(torch::equal(params["layers.1.proj.bias"], torch::zeros({2})));
}

// A GPT-2-like model: an embedding table, and a Conv1D whose weight is stored (in, out).
struct Conv1DImpl : torch::nn::Module {
  Conv1DImpl(int64_t nx, int64_t nf) : weight(register_parameter("weight", torch::randn({nx, nf}) * 0.2)) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::mm(x, weight); }  // x (b, in) → (b, out)
  torch::Tensor weight;
};
TORCH_MODULE(Conv1D);

struct AttnImpl : torch::nn::Module {
  AttnImpl(int64_t nx, int64_t nf) : c_proj(register_module("c_proj", Conv1D(nx, nf))) {}
  Conv1D c_proj;
};
TORCH_MODULE(Attn);

struct Gpt2LikeImpl : torch::nn::Module {
  Gpt2LikeImpl(int64_t num, int64_t dim, int64_t nx, int64_t nf)
      : wte(register_module("wte", torch::nn::Embedding(num, dim))), attn(register_module("attn", Attn(nx, nf))) {}
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& x) {
    return wte->forward(ids).pow(2).mean() + attn->c_proj->forward(x).sin().mean();
  }
  torch::nn::Embedding wte;
  Attn attn;
};
TORCH_MODULE(Gpt2Like);

Gpt2Like make_gpt2_like(uint64_t seed, int64_t num = 5, int64_t dim = 5, int64_t nx = 4, int64_t nf = 4) {
  torch::manual_seed(seed);
  return Gpt2Like(num, dim, nx, nf);
}

std::map<std::string, torch::Tensor> weights_of(const Gpt2Like& m) {
  return {{"wte.weight", m->wte->weight.detach().clone()},
          {"attn.c_proj.weight", m->attn->c_proj->weight.detach().clone()}};
}

TEST(Adapter, EmbeddingModulesAreFoundByModuleType) {
  Gpt2Like m = make_gpt2_like(1);
  EXPECT_EQ(embedding_modules(*m), (std::set<std::string>{"wte"}));
  EXPECT_TRUE(embedding_modules(*make_net(1)).empty());
}

// tests/data/adapter_fixture_gpt2 is what PEFT writes for an nn.Embedding and a Conv1D
// (fan_in_fan_out), both square, so that a transposed factor or change keeps its shape;
// scripts/gen_safetensors_fixture.py computed their weight changes with PEFT's formulas.
// The optimizer is given the fixture's factors (by the mapping of docs/adapters.md) and
// writes them back; then (1) its weight change must be the fixture's, and (2) the
// adapter it exports must be the fixture, tensor for tensor.
TEST(Adapter, EmbeddingAndConv1DExportMatchesAPeftFixture) {
  const std::string fixture = (kData / "adapter_fixture_gpt2").string();
  const SafetensorsFile peft = read_safetensors(fixture + "/adapter_model.safetensors");
  const json peft_cfg = json::parse(read_bytes(fixture + "/adapter_config.json"));
  const SafetensorsFile expected =
      read_safetensors((kData / "safetensors" / "adapter_fixture_gpt2_expected.safetensors").string());
  const std::string p = "base_model.model.";
  auto peft_tensor = [&](const std::string& key) { return peft.tensors.at(p + key); };

  Gpt2Like model = make_gpt2_like(2);
  const auto W0 = weights_of(model);
  // lr 0: the step leaves the factors as set, and the exact write-back makes P = P0 + s·A·B.
  LowRankOptimizer opt(model->named_parameters(),
                       quiet("optimizer: {type: sgd, lr: 0}\ntargets:\n"
                             "  - {match: wte.weight, method: lora, rank: 2, alpha: 4, writeback: exact}\n"
                             "  - {match: attn.c_proj.weight, method: lora, rank: 2, alpha: 3, writeback: exact,"
                             " fan_in_fan_out: true}\n"));
  {
    torch::NoGradGuard guard;
    auto [Ae, Be] = opt.projector("wte.weight").factors();  // A num×r, B r×dim
    Ae.copy_(peft_tensor("wte.lora_embedding_A").t());
    Be.copy_(peft_tensor("wte.lora_embedding_B").t());
    auto [Ac, Bc] = opt.projector("attn.c_proj.weight").factors();  // the out×in view: A out×r, B r×in
    Ac.copy_(peft_tensor("attn.c_proj.lora_B.weight"));
    Bc.copy_(peft_tensor("attn.c_proj.lora_A.weight"));
  }
  for (auto& param : model->parameters()) param.mutable_grad() = torch::zeros_like(param);
  opt.step();
  const auto W1 = weights_of(model);
  for (const auto& [name, delta] : expected.tensors) {
    EXPECT_LE((W1.at(name).to(torch::kDouble) - W0.at(name).to(torch::kDouble) - delta).abs().max().item<double>(),
              1e-6)
        << name << ": the optimizer's weight change is not PEFT's for the fixture's factors";
  }

  const std::string dir = temp_dir("adapter");
  AdapterOptions options;
  options.embedding_modules = embedding_modules(*model);
  export_adapter(opt, dir, options);
  const SafetensorsFile ours = read_safetensors(dir + "/adapter_model.safetensors");
  EXPECT_EQ(ours.tensors.size(), peft.tensors.size());
  for (const auto& [key, t] : peft.tensors) {
    auto it = ours.tensors.find(key);
    if (it == ours.tensors.end()) {
      ADD_FAILURE() << "the export has no key '" << key << "'";
      continue;
    }
    ASSERT_EQ(it->second.sizes(), t.sizes()) << key;
    EXPECT_TRUE(torch::equal(it->second, t))
        << key << ": max |exported - fixture| = " << (it->second - t).abs().max().item<double>() << "\nexported\n"
        << it->second << "\nfixture\n"
        << t;
  }
  const json cfg = json::parse(read_bytes(dir + "/adapter_config.json"));
  for (const char* key : {"peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "fan_in_fan_out"}) {
    EXPECT_EQ(cfg[key], peft_cfg[key]) << key;
  }

  // Import honours the same layouts: the fixture applied to W0 gives W0 + its changes, and so
  // does the export.
  for (const std::string& folder : {fixture, dir}) {
    SCOPED_TRACE(folder);
    torch::OrderedDict<std::string, torch::Tensor> base;
    for (const auto& [name, w] : W0) base.insert(name, w.clone());
    load_adapter(base, folder);
    for (const auto& [name, delta] : expected.tensors) {
      EXPECT_LE((base[name].to(torch::kDouble) - W0.at(name).to(torch::kDouble) - delta).abs().max().item<double>(),
                1e-6)
          << name;
    }
  }
  fs::remove_all(dir);
}

// Trained, not set by hand: non-square shapes, symmetric init (rank 2r), both layouts.
TEST(Adapter, EmbeddingAndConv1DRoundTripAfterTraining) {
  for (const char* init : {"zero", "symmetric"}) {
    SCOPED_TRACE(init);
    const std::string dir = temp_dir("adapter");
    Gpt2Like model = make_gpt2_like(3, /*num=*/9, /*dim=*/4, /*nx=*/6, /*nf=*/5);
    const auto W0 = weights_of(model);
    LowRankOptimizer opt(model->named_parameters(),
                         quiet(fmt::format("optimizer: {{type: adam, lr: 0.05}}\ntargets:\n"
                                           "  - {{match: wte.weight, method: lora, rank: 2, init: {0}}}\n"
                                           "  - {{match: attn.c_proj.weight, method: lora, rank: 3, alpha: 6, "
                                           "init: {0}, fan_in_fan_out: true}}\n",
                                           init)));
    torch::manual_seed(4);
    for (int i = 0; i < 10; ++i) {
      opt.zero_grad();
      model->forward(torch::randint(0, 9, {7}), torch::randn({3, 6})).backward();
      opt.step();
    }
    AdapterOptions options;
    options.embedding_modules = embedding_modules(*model);
    const AdapterExport info = export_adapter(opt, dir, options);
    const int64_t k = std::string(init) == "symmetric" ? 2 : 1;
    const SafetensorsFile st = read_safetensors(dir + "/adapter_model.safetensors");
    EXPECT_EQ(st.tensors.at("base_model.model.wte.lora_embedding_A").sizes(), (std::vector<int64_t>{2 * k, 9}));
    EXPECT_EQ(st.tensors.at("base_model.model.wte.lora_embedding_B").sizes(), (std::vector<int64_t>{4, 2 * k}));
    EXPECT_EQ(st.tensors.at("base_model.model.attn.c_proj.lora_A.weight").sizes(), (std::vector<int64_t>{3 * k, 6}));
    EXPECT_EQ(st.tensors.at("base_model.model.attn.c_proj.lora_B.weight").sizes(), (std::vector<int64_t>{5, 3 * k}));
    EXPECT_EQ(json::parse(read_bytes(dir + "/adapter_config.json"))["fan_in_fan_out"], true);
    torch::OrderedDict<std::string, torch::Tensor> base;
    for (const auto& [name, w] : W0) base.insert(name, w.clone());
    EXPECT_EQ(load_adapter(base, dir), (std::vector<std::string>{"attn.c_proj.weight", "wte.weight"}));
    for (const auto& [name, w] : weights_of(model)) {
      EXPECT_GT((w - W0.at(name)).abs().max().item<double>(), 1e-2) << name << ": training changed little";
      EXPECT_LE((base[name] - w).abs().max().item<double>(), 1e-6) << name;
    }
    (void)info;
    fs::remove_all(dir);
  }
}

TEST(Adapter, BadAdaptersThrowAndChangeNothing) {
  const std::string dir = temp_dir("adapter");
  Net net = make_net(1);
  LowRankOptimizer opt(net->named_parameters(), quiet(lora_yaml("zero", "auto")));
  train(net, opt, 0, 3);
  export_adapter(opt, dir);

  Net narrow = make_net(2, /*hidden=*/10);
  const torch::Tensor before = narrow->fc(2)->weight.detach().clone();
  std::string msg = adapter_error([&] { load_adapter(narrow->named_parameters(), dir); });
  EXPECT_NE(msg.find("module 'fc1'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("module 'fc2'"), std::string::npos) << msg;
  EXPECT_TRUE(torch::equal(narrow->fc(2)->weight, before)) << "fc2 fits no better: nothing may change";

  torch::OrderedDict<std::string, torch::Tensor> other;
  other.insert("encoder.weight", torch::zeros({16, 12}));
  msg = adapter_error([&] { load_adapter(other, dir); });
  EXPECT_NE(msg.find("no parameter 'fc1.weight'"), std::string::npos) << msg;

  write_bytes(dir + "/adapter_config.json", R"({"peft_type": "PREFIX_TUNING", "r": 3, "lora_alpha": 6})");
  msg = adapter_error([&] { load_adapter(net->named_parameters(), dir); });
  EXPECT_NE(msg.find("peft_type"), std::string::npos) << msg;
  write_bytes(dir + "/adapter_config.json", R"({"peft_type": "LORA", "r": 5, "lora_alpha": 6})");
  msg = adapter_error([&] { load_adapter(net->named_parameters(), dir); });
  EXPECT_NE(msg.find("the config says r = 5, lora_A has 3 rows"), std::string::npos) << msg;
  // fan_in_fan_out: the factors must fit the transposed weight: fc1 is 16×12, so lora_A must be r×16.
  write_bytes(dir + "/adapter_config.json", R"({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "fan_in_fan_out": true,)"
                                            R"( "rank_pattern": {"fc2": 2}, "alpha_pattern": {"fc2": 1}})");
  msg = adapter_error([&] { load_adapter(net->named_parameters(), dir); });
  EXPECT_NE(msg.find("(fan_in_fan_out: ΔW = (B·A)ᵀ)"), std::string::npos) << msg;
  write_bytes(dir + "/adapter_config.json", R"({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "fan_in_fan_out": 1})");
  msg = adapter_error([&] { load_adapter(net->named_parameters(), dir); });
  EXPECT_NE(msg.find("'fan_in_fan_out': expected true or false, got 1"), std::string::npos) << msg;
  write_bytes(dir + "/adapter_config.json", "{ not json");
  msg = adapter_error([&] { load_adapter(net->named_parameters(), dir); });
  EXPECT_NE(msg.find("adapter_config.json"), std::string::npos) << msg;
  fs::remove_all(dir);
}

TEST(Adapter, ExportRefusesWhatAnAdapterCannotHold) {
  const std::string dir = temp_dir("adapter");
  {  // merged factors: W − W0 is no longer of rank r
    Net net = make_net(1);
    LowRankOptimizer opt(net->named_parameters(),
                         quiet("targets:\n  - match: fc1.weight\n    method: lora\n    rank: 2\n    merge_every: 3\n"));
    train(net, opt, 0, 2);
    EXPECT_NO_THROW(export_adapter(opt, dir));  // no merge yet
    train(net, opt, 2, 4);
    const std::string msg = adapter_error([&] { export_adapter(opt, dir); });
    EXPECT_NE(msg.find("'fc1.weight' merged its factors"), std::string::npos) << msg;
  }
  {  // no lora parameter at all
    Net net = make_net(1);
    LowRankOptimizer opt(net->named_parameters(), quiet("targets:\n  - match: fc1.weight\n    method: additive\n"));
    EXPECT_FALSE(has_adapter_parameters(opt));
    const std::string msg = adapter_error([&] { export_adapter(opt, dir); });
    EXPECT_NE(msg.find("no parameter with method lora"), std::string::npos) << msg;
    LowRankOptimizer with_lora(net->named_parameters(),
                               quiet("targets:\n  - match: fc1.weight\n    method: additive\n"
                                     "  - match: fc2.weight\n    method: lora\n    rank: 2\n"));
    EXPECT_TRUE(has_adapter_parameters(with_lora));
  }
  {  // one adapter config holds one fan_in_fan_out
    Net net = make_net(1);
    LowRankOptimizer opt(net->named_parameters(),
                         quiet("targets:\n  - {match: fc1.weight, method: lora, rank: 2, fan_in_fan_out: true}\n"
                               "  - {match: fc2.weight, method: lora, rank: 2}\n"));
    const std::string msg = adapter_error([&] { export_adapter(opt, dir); });
    EXPECT_NE(msg.find("'fc1' has fan_in_fan_out true and module 'fc2' has false"), std::string::npos) << msg;
  }
  {  // an embedding module whose weight is not a table
    ConvNet net;
    LowRankOptimizer opt(net->named_parameters(), quiet("targets:\n  - {match: conv.weight, method: lora, rank: 2}\n"));
    AdapterOptions options;
    options.embedding_modules = {"conv"};
    const std::string msg = adapter_error([&] { export_adapter(opt, dir, options); });
    EXPECT_NE(msg.find("module 'conv' is listed in embedding_modules"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[5, 3, 3, 3]"), std::string::npos) << msg;
  }
  {  // a parameter that is not a module's weight
    torch::OrderedDict<std::string, torch::Tensor> p;
    p.insert("embedding_table", torch::randn({8, 6}).requires_grad_());
    LowRankOptimizer opt(p, quiet("targets:\n  - match: embedding_table\n    method: lora\n    rank: 2\n"));
    const std::string msg = adapter_error([&] { export_adapter(opt, dir); });
    EXPECT_NE(msg.find("'embedding_table'"), std::string::npos) << msg;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace gradlora::ckpt_test
