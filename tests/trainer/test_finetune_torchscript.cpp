// `gradlora train` on the user's own TorchScript language model, end to end
// through the program: a GPT-2-shaped model exported from Python
// (tests/data/gpt2_tiny/model.pt, written by scripts/export_gpt2.py and
// pre-trained there on the first 90% of the GPL-3 text), u16 token files, the
// fine-tuned TorchScript file, the PEFT adapter, resumption and bad inputs.
#include "data.h"
#include "language_model.h"
#include "run_loop.h"
#include "settings.h"
#include "trainer_test_util.h"

#include <gradlora/adapter.h>
#include <gradlora/jit.h>
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace gradlora::app;
using namespace gradlora::app::cli_test;

namespace {

const std::string kModel = std::string(GRADLORA_SOURCE_DIR) + "/tests/data/gpt2_tiny/model.pt";
const std::string kConfig = std::string(GRADLORA_SOURCE_DIR) + "/examples/finetune_gpt2.yaml";
const std::string kGpl = "/usr/share/common-licenses/GPL-3";

/// Writes `ids` as a flat little-endian file of `width`-byte tokens.
void write_tokens(const fs::path& p, const std::vector<int64_t>& ids, int width) {
  std::string bytes;
  for (int64_t v : ids) {
    for (int b = 0; b < width; ++b) bytes.push_back(static_cast<char>((v >> (8 * b)) & 0xff));
  }
  std::ofstream(p, std::ios::binary) << bytes;
}

/// The bytes of `src` from fraction `from` to `to`, as token ids.
std::vector<int64_t> byte_ids(const std::string& src, double from = 0.0, double to = 1.0) {
  const std::string text = slurp(src);
  const auto a = static_cast<size_t>(from * static_cast<double>(text.size()));
  const auto b = static_cast<size_t>(to * static_cast<double>(text.size()));
  std::vector<int64_t> ids;
  for (size_t i = a; i < b; ++i) ids.push_back(static_cast<unsigned char>(text[i]));
  return ids;
}

/// A run's data in `dir`: the fine-tuning corpus (a C header) and the reference
/// corpus (the GPL-3 text the model was not pre-trained on), as u16 files.
struct Data {
  fs::path finetune, reference;
};

Data write_data(const fs::path& dir) {
  Data d{dir / "train.bin", dir / "reference.bin"};
  write_tokens(d.finetune, byte_ids("/usr/include/stdio.h"), 2);
  write_tokens(d.reference, byte_ids(kGpl, 0.9, 1.0), 2);
  return d;
}

/// The `train` arguments of a short run of the example config on `d`.
std::string train_args(const Data& d, const fs::path& out, const std::string& extra = "") {
  return "train --config " + kConfig + " --set model.path=" + kModel +
         " --set data.finetune.files=" + d.finetune.string() + " --set data.reference.files=" + d.reference.string() +
         " --set training.steps=30 --set training.batch=8 --set training.eval_every=10 "
         "--set training.eval_windows=16 --set training.checkpoint_every=10 --out " +
         out.string() + " " + extra;
}

torch::OrderedDict<std::string, torch::Tensor> cloned(const torch::jit::Module& m) {
  torch::OrderedDict<std::string, torch::Tensor> out;
  for (const auto& kv : gradlora::named_parameters(m)) out.insert(kv.key(), kv.value().detach().clone());
  return out;
}

bool is_lora_target(const std::string& name) {
  for (const char* m : {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"}) {
    if (name.size() > std::string(m).size() &&
        name.compare(name.size() - std::string(m).size(), std::string::npos, m) == 0)
      return true;
  }
  return false;
}

/// One fine-tuning run shared by the tests that inspect its outputs.
class FineTuneTorchScript : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = scratch("torchscript");
    data_ = write_data(dir_);
    result_ = run(train_args(data_, dir_ / "run"), dir_ / "log");
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }
  void SetUp() override { ASSERT_EQ(result_.code, 0) << result_.err; }
  static fs::path out() { return dir_ / "run"; }
  static nlohmann::json summary() { return nlohmann::json::parse(slurp(out() / "summary.json")); }

  static fs::path dir_;
  static Data data_;
  static Result result_;
};
fs::path FineTuneTorchScript::dir_;
Data FineTuneTorchScript::data_;
Result FineTuneTorchScript::result_;

}  // namespace

TEST_F(FineTuneTorchScript, LoraLowersTheHeldOutLossAndWritesEveryOutput) {
  const nlohmann::json s = summary();
  EXPECT_LT(s["eval_after"].get<double>(), s["eval_before"].get<double>() - 0.1) << s.dump();
  // The forgetting column comes from data.reference: the model knew that text
  // (loss well below the untrained model's ln 384 = 5.95 nats).
  EXPECT_LT(s["base_before"].get<double>(), 3.5) << s.dump();
  EXPECT_TRUE(std::isfinite(s["base_after"].get<double>()));
  for (const char* f : {"model.pt", "metrics.csv", "loss.svg", "summary.json", "adapter/adapter_config.json",
                        "adapter/adapter_model.safetensors"}) {
    EXPECT_TRUE(fs::exists(out() / f)) << f;
  }
  EXPECT_FALSE(fs::exists(out() / "checkpoint.pt"));
  EXPECT_NE(slurp(out() / "loss.svg").find("held-out loss (reference corpus)"), std::string::npos);
  EXPECT_NE(slurp(out() / "loss.svg").find("nats per token"), std::string::npos);
  EXPECT_NE(result_.out.find("reference held-out loss"), std::string::npos) << result_.out;
}

TEST_F(FineTuneTorchScript, SavedFileReloadsWithItsStructureAndReproducesTheReportedLoss) {
  const torch::jit::Module before = torch::jit::load(kModel);
  const torch::jit::Module after = torch::jit::load((out() / "model.pt").string());
  // Same structure: the same parameters, shapes and requires_grad flags, the same code.
  const auto pb = before.named_parameters(), pa = after.named_parameters();
  ASSERT_EQ(pb.size(), pa.size());
  for (auto b = pb.begin(), a = pa.begin(); b != pb.end(); ++b, ++a) {
    EXPECT_EQ((*b).name, (*a).name);
    EXPECT_EQ((*b).value.sizes(), (*a).value.sizes()) << (*b).name;
    EXPECT_EQ((*b).value.requires_grad(), (*a).value.requires_grad()) << (*b).name;
  }
  // (the dump prints each submodule's address: left out)
  auto code = [](const torch::jit::Module& m) {
    return std::regex_replace(m.dump_to_str(/*print_method_bodies=*/true, false, false), std::regex(" at 0x[0-9a-f]+"),
                              "");
  };
  EXPECT_EQ(code(before), code(after));
  EXPECT_EQ(before.type()->name()->qualifiedName(), after.type()->name()->qualifiedName());

  // The reloaded file's held-out loss is the one the run reported at its end.
  Settings s = load_settings(kConfig, {{"model.path", (out() / "model.pt").string()},
                                       {"data.finetune.files", data_.finetune.string()},
                                       {"data.reference.files", data_.reference.string()}});
  const Corpus fine = load_corpus(s.data.finetune, s.base_dir, s.model.context);
  const torch::Tensor held = eval_windows(fine.heldout, s.model.context + 1, 16);
  const std::unique_ptr<LanguageModel> m = load_torchscript_model(s);
  EXPECT_EQ(m->vocab(), 384);
  EXPECT_NEAR(evaluate(*m, held, 8), summary()["eval_after"].get<double>(), 1e-6);
  s.model.path = kModel;
  EXPECT_NEAR(evaluate(*load_torchscript_model(s), held, 8), summary()["eval_before"].get<double>(), 1e-6);
}

TEST_F(FineTuneTorchScript, FrozenParametersAreBitIdenticalAndTheAdapterGivesTheFineTunedWeights) {
  const auto base = cloned(torch::jit::load(kModel));
  const auto tuned = cloned(torch::jit::load((out() / "model.pt").string()));
  int targets = 0;
  for (const auto& kv : base) {
    const torch::Tensor& w = tuned[kv.key()];
    if (is_lora_target(kv.key())) {
      ++targets;
      EXPECT_GT((w - kv.value()).abs().max().item<double>(), 1e-3) << kv.key() << " did not train";
    } else {
      EXPECT_TRUE(torch::equal(w, kv.value())) << kv.key() << " is frozen and changed";
    }
  }
  EXPECT_EQ(targets, 8);
  // The adapter applied to the original weights gives the fine-tuned ones.
  const torch::jit::Module fresh = torch::jit::load(kModel);
  const auto params = gradlora::named_parameters(fresh);
  const std::vector<std::string> changed = gradlora::load_adapter(params, (out() / "adapter").string());
  EXPECT_EQ(changed.size(), 8u);
  for (const auto& kv : params) {
    EXPECT_LE((kv.value() - tuned[kv.key()]).abs().max().item<double>(), 1e-5) << kv.key();
  }
  const std::string config = slurp(out() / "adapter" / "adapter_config.json");
  EXPECT_NE(config.find("\"fan_in_fan_out\": true"), std::string::npos) << config;
}

TEST(FineTuneTorchScriptResume, AResumedRunEndsWithTheWeightsOfAnUninterruptedOne) {
  const fs::path d = scratch("torchscript_resume");
  const Data data = write_data(d);
  ASSERT_EQ(run(train_args(data, d / "full"), d / "l0").code, 0);
  const Result part = run(train_args(data, d / "part", "--set training.halt_after=13"), d / "l1");
  ASSERT_EQ(part.code, 130) << part.err;
  EXPECT_FALSE(fs::exists(d / "part" / "model.pt"));
  const Result rest = run(train_args(data, d / "part", "--resume"), d / "l2");
  ASSERT_EQ(rest.code, 0) << rest.err;
  EXPECT_NE(rest.err.find("resuming from step 13"), std::string::npos) << rest.err;
  const auto a = cloned(torch::jit::load((d / "full" / "model.pt").string()));
  const auto b = cloned(torch::jit::load((d / "part" / "model.pt").string()));
  for (const auto& kv : a) EXPECT_TRUE(torch::equal(kv.value(), b[kv.key()])) << kv.key();
  EXPECT_EQ(slurp(d / "full" / "adapter" / "adapter_model.safetensors"),
            slurp(d / "part" / "adapter" / "adapter_model.safetensors"));
  // Another model file is another run: its checkpoint is refused.
  fs::copy_file(kModel, d / "other.pt");
  {
    torch::jit::Module m = torch::jit::load((d / "other.pt").string());
    torch::NoGradGuard guard;
    m.attr("transformer").toModule().attr("ln_f").toModule().attr("bias").toTensor().add_(1.0);
    m.save((d / "other.pt").string());
  }
  ASSERT_EQ(run(train_args(data, d / "again", "--set training.halt_after=5"), d / "l3").code, 130);
  const Result other =
      run(train_args(data, d / "again", "--resume --set model.path=" + (d / "other.pt").string()), d / "l4");
  expect_clean_error(other, {"different settings"});
  fs::remove_all(d);
}

TEST(FineTuneTorchScriptInspect, ListsEveryParameterWithShapeMethodRankAndState) {
  const fs::path d = scratch("torchscript_inspect");
  const Data data = write_data(d);
  const Result r = run("inspect --config " + kConfig + " --set model.path=" + kModel, d);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("torchscript '" + kModel +
                       "' (__torch__.GPT2LMHeadModel), 39808 parameters in 28 tensors, "
                       "vocabulary 384, context 64"),
            std::string::npos)
      << r.out;
  for (const auto& kv : gradlora::named_parameters(torch::jit::load(kModel))) {
    const std::string& n = kv.key();
    const size_t at = r.out.find("\n" + n + " ");
    ASSERT_NE(at, std::string::npos) << n << " missing in:\n" << r.out;
    const std::string line = r.out.substr(at + 1, r.out.find('\n', at + 1) - at - 1);
    std::string shape;
    for (int64_t i = 0; i < kv.value().dim(); ++i) shape += (i ? "x" : "") + std::to_string(kv.value().size(i));
    EXPECT_NE(line.find(" " + shape + " "), std::string::npos) << line;
    if (is_lora_target(n)) {
      EXPECT_NE(line.find(" lora "), std::string::npos) << line;
      EXPECT_NE(line.find(" 8 "), std::string::npos) << line;
      EXPECT_NE(line.find("fan_in_fan_out"), std::string::npos) << line;
    } else {
      EXPECT_NE(line.find(" frozen "), std::string::npos) << line;
    }
  }
  fs::remove_all(d);
}

// ------------------------------------------------------------ bad inputs

namespace {

/// A scripted module built in C++: an embedding table `weight` (vocab × dim)
/// and a forward whose result is `result` (x: the token ids).
fs::path scripted(const fs::path& dir, const std::string& name, const std::string& result) {
  torch::jit::Module m("Toy", std::make_shared<torch::jit::CompilationUnit>(), /*shouldMangle=*/true);
  m.register_parameter("weight", torch::randn({384, 16}).requires_grad_(true), /*is_buffer=*/false);
  m.define("def forward(self, x):\n    return " + result + "\n");
  const fs::path p = dir / name;
  m.save(p.string());
  return p;
}

}  // namespace

TEST(FineTuneTorchScriptErrors, EachBadInputIsOneClearErrorAndLeavesNoOutput) {
  const fs::path d = scratch("torchscript_bad");
  const Data data = write_data(d);
  auto expect_refused = [&](const std::string& what, const std::string& extra,
                            const std::vector<std::string>& needles) {
    SCOPED_TRACE(what);
    const fs::path out = d / ("out_" + std::to_string(std::hash<std::string>()(what)));
    const Result r = run(train_args(data, out, extra), d / "log");
    expect_clean_error(r, needles);
    EXPECT_EQ(r.err.find("gradlora: error:"), r.err.rfind("gradlora: error:")) << "one error: " << r.err;
    EXPECT_FALSE(fs::exists(out)) << "a refused run wrote " << out;
  };
  expect_refused("missing file", "--set model.path=" + (d / "none.pt").string(),
                 {"config key 'model.path'", (d / "none.pt").string(), "does not exist"});
  std::ofstream(d / "text.pt") << "not a model\n";
  expect_refused("not TorchScript", "--set model.path=" + (d / "text.pt").string(),
                 {"config key 'model.path'", (d / "text.pt").string(), "is not a TorchScript file"});
  const fs::path flat = scripted(d, "flat.pt", "self.weight[x].sum(-1)");
  expect_refused("output (batch, T)", "--set model.path=" + flat.string(),
                 {flat.string(), "shape [2, 64]", "expected logits (batch, context, vocab)"});
  const fs::path str = scripted(d, "str.pt", "'logits'");
  expect_refused("output a string", "--set model.path=" + str.string(), {str.string(), "forward returned String"});
  expect_refused("context longer than the model", "--set model.context=100",
                 {kModel, "forward failed", "model.context = 100", "sequence longer than n_positions"});
  std::vector<int64_t> ids = byte_ids("/usr/include/stdio.h");
  ids[1234] = 384;
  write_tokens(d / "beyond.bin", ids, 2);
  expect_refused("token beyond the vocabulary", "--set data.finetune.files=" + (d / "beyond.bin").string(),
                 {"config key 'data.finetune'", "token 1234 of '" + (d / "beyond.bin").string() + "'", "is 384",
                  "vocabulary of model '" + kModel + "' (384 ids, 0..383)"});
  const std::string bytes = slurp(data.finetune);
  std::ofstream(d / "truncated.bin", std::ios::binary) << bytes.substr(0, bytes.size() - 1);
  expect_refused("truncated token file", "--set data.finetune.files=" + (d / "truncated.bin").string(),
                 {"config key 'data.finetune.format'", (d / "truncated.bin").string(),
                  std::to_string(bytes.size() - 1) + " bytes, not a multiple of 2"});
  expect_refused("a pattern that matches nothing", "--set targets[0].match=transformer.h.*.attn.q_proj.weight",
                 {"config key 'targets[0].match'", "transformer.h.*.attn.q_proj.weight", "matches no parameter"});
  expect_refused("pre-training a TorchScript model", "--set data.pretrain.files=" + data.reference.string(),
                 {"config key 'data.pretrain'", "data.reference"});
  expect_refused("unknown format", "--set data.finetune.format=u8",
                 {"config key 'data.finetune.format'", "unknown format 'u8'"});
  fs::remove_all(d);
}

TEST(FineTuneTorchScriptOutputs, ATupleOrADictWithLogitsIsAccepted) {
  const fs::path d = scratch("torchscript_outputs");
  write_tokens(d / "ids.bin", byte_ids("/usr/include/stdio.h"), 2);
  for (const auto& [name, result] : std::vector<std::pair<std::string, std::string>>{
           {"tensor.pt", "self.weight[x]"},
           {"tuple.pt", "(self.weight[x], x)"},
           {"dict.pt", "{'hidden': self.weight[x][:, :, :4], 'logits': self.weight[x]}"}}) {
    const fs::path p = scripted(d, name, result);
    Settings s =
        load_settings(kConfig, {{"model.path", p.string()}, {"data.finetune.files", (d / "ids.bin").string()}});
    const std::unique_ptr<LanguageModel> m = load_torchscript_model(s);
    EXPECT_EQ(m->vocab(), 16) << name;  // the last dimension of what forward returns
    const torch::Tensor w = torch::arange(10, torch::kInt64).view({2, 5});
    const torch::Tensor table = gradlora::named_parameters(torch::jit::load(p.string()))["weight"];
    EXPECT_TRUE(torch::equal(m->logits(w), table.index({w}))) << name;
  }
  fs::remove_all(d);
}

// ------------------------------------------------------------ token files

TEST(TokenFiles, U16AndU32AndBytesReadTheIdsAcrossFilesWithTheTailOfEachHeldOut) {
  const fs::path d = scratch("token_files");
  const std::vector<int64_t> a{1, 2, 3, 65535, 5, 6, 7, 8, 9, 10},
      b{300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200};
  for (const auto& [format, width] : std::vector<std::pair<std::string, int>>{{"u16", 2}, {"u32", 4}}) {
    SCOPED_TRACE(format);
    write_tokens(d / ("a." + format), a, width);
    write_tokens(d / ("b." + format), b, width);
    CorpusSettings c;
    c.key = "data.finetune";
    c.format = format;
    c.holdout = 0.2;
    c.files = {"a." + format, "b." + format};
    const Corpus corpus = load_corpus(c, d.string(), 3);
    ASSERT_EQ(corpus.train.numel(), 16);
    ASSERT_EQ(corpus.heldout.numel(), 4);
    // Training: the first 8 of each file, one stream; a slice crosses the files.
    std::vector<int64_t> want(a.begin(), a.begin() + 8);
    want.insert(want.end(), b.begin(), b.begin() + 8);
    const torch::Tensor all = corpus.train.slice(0, 16);
    EXPECT_EQ(std::vector<int64_t>(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + 16), want);
    const torch::Tensor cross = corpus.train.slice(6, 11);
    EXPECT_EQ(std::vector<int64_t>(cross.data_ptr<int64_t>(), cross.data_ptr<int64_t>() + 5),
              (std::vector<int64_t>{7, 8, 300, 400, 500}));
    const torch::Tensor held = corpus.heldout.slice(0, 4);
    EXPECT_EQ(std::vector<int64_t>(held.data_ptr<int64_t>(), held.data_ptr<int64_t>() + 4),
              (std::vector<int64_t>{9, 10, 1100, 1200}));
    // The vocabulary check names the file and the index of the first id beyond it.
    try {
      check_vocabulary(corpus, 1000, "the model");
      ADD_FAILURE() << "expected SettingsError";
    } catch (const SettingsError& e) {
      EXPECT_NE(std::string(e.what()).find("token 3 of '" + (d / ("a." + format)).string() + "'"), std::string::npos)
          << e.what();
    }
    EXPECT_NO_THROW(check_vocabulary(corpus, 65536, "the model"));
  }
  // Bytes: every byte is a token.
  std::ofstream(d / "t.txt", std::ios::binary) << "abcdefghij";
  CorpusSettings c;
  c.key = "data.finetune";
  c.files = {"t.txt"};
  c.holdout = 0.5;
  const Corpus bytes = load_corpus(c, d.string(), 2);
  const torch::Tensor t = bytes.train.slice(0, 5);
  EXPECT_EQ(std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + 5),
            (std::vector<int64_t>{'a', 'b', 'c', 'd', 'e'}));
  // data.reference: held out whole.
  c.evaluation_only = true;
  EXPECT_EQ(load_corpus(c, d.string(), 2).heldout.numel(), 10);
  fs::remove_all(d);
}
