// Checkpoints: bit-identical resume in a new process for every method and
// inner rule, crash-safe saving, and loads that reject bad files without
// changing anything.
#include "ckpt_util.h"

#include <gradlora/checkpoint.h>

#include <fmt/format.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>

#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace gradlora::ckpt_test {
namespace {

namespace fs = std::filesystem;
using Snapshot = std::vector<std::pair<std::string, torch::Tensor>>;

// ---------------------------------------------------------------- cases

struct MethodCase {
  const char* name;
  const char* target;  // YAML of the "*.weight" target, after `match`
};

const MethodCase kMethods[] = {
    {"lora_zero", "method: lora\n    rank: 3\n    alpha: 6\n    init: zero"},
    {"lora_symmetric", "method: lora\n    rank: 3\n    init: symmetric"},
    {"lora_zero_merge", "method: lora\n    rank: 2\n    init: zero\n    merge_every: 4"},
    {"lora_symmetric_exact_merge",
     "method: lora\n    rank: 2\n    init: symmetric\n    writeback: exact\n    merge_every: 4"},
    {"random_every1_transfer", "method: random\n    rank: 3\n    resample_every: 1\n    on_resample: transfer"},
    {"random_every3_transfer", "method: random\n    rank: 3\n    resample_every: 3\n    on_resample: transfer"},
    {"additive", "method: additive\n    rank: 3"},
    {"full", "method: full"},
};

struct InnerCase {
  const char* name;
  const char* optimizer;  // YAML of `optimizer:`
};

const InnerCase kInners[] = {
    {"sgd_momentum", "type: sgd\n  lr: 0.05\n  momentum: 0.9"},
    {"adam", "type: adam\n  lr: 0.01"},
    {"adamw", "type: adamw\n  lr: 0.01\n  weight_decay: 0.05"},
};

std::string yaml_of(const std::string& method, const std::string& inner) {
  const MethodCase* mc = nullptr;
  const InnerCase* ic = nullptr;
  for (const auto& m : kMethods) {
    if (method == m.name) mc = &m;
  }
  for (const auto& i : kInners) {
    if (inner == i.name) ic = &i;
  }
  if (!mc || !ic) throw std::invalid_argument("unknown case " + method + "/" + inner);
  return fmt::format(
      "seed: 7\noptimizer:\n  {}\ntargets:\n  - match: \"*.weight\"\n    {}\n  - match: \"*.bias\"\n    method: full\n",
      ic->optimizer, mc->target);
}

// Runs this test binary again with `args`; returns the raw wait status.
int run_self(const std::vector<std::string>& args) {
  std::vector<std::string> all{"/proc/self/exe"};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

// ------------------------------------------------ child-process entry points

// Fresh model (other initial weights) on `device` and optimizer, load, train 10..20, save
// the snapshot (moved to the CPU). Exit code 0 on success.
int resume_child(const std::string& method, const std::string& inner, const std::string& device,
                 const std::string& ckpt, const std::string& out) {
  torch::set_num_threads(1);
  Net net = make_net(/*seed=*/1234, kHidden, torch::kFloat, torch::Device(device));
  LowRankOptimizer opt(net->named_parameters(), quiet(yaml_of(method, inner)));
  load_checkpoint(opt, *net, ckpt);
  if (opt.step_count() != 10) return 3;
  train(net, opt, 10, 20);
  std::vector<torch::Tensor> values;
  for (auto& kv : snapshot(opt, *net)) values.push_back(kv.second.cpu());
  torch::save(values, out);
  return 0;
}

// Trains 2 steps and dies (SIGKILL) in the middle of writing `path`.
int kill_child(const std::string& path) {
  torch::set_num_threads(1);
  Net net = make_net(1);
  LowRankOptimizer opt(net->named_parameters(), quiet(yaml_of("lora_zero", "adam")));
  train(net, opt, 0, 2);
  detail::set_write_hook([](size_t written) {
    if (written > 2000) ::raise(SIGKILL);
  });
  save_checkpoint(opt, *net, path);
  return 4;  // not reached when the hook fires
}

// ----------------------------------------------------------- resume tests

using ResumeCase = std::tuple<const char*, const char*>;  // (method, inner rule)
class Resume : public ::testing::TestWithParam<std::tuple<ResumeCase, torch::Device>> {};

// 10 steps, save, new process: fresh model + optimizer, load, 10 more steps
// ⇒ bit-identical to 20 uninterrupted steps (parameters, every state tensor,
// counters, learning rates). Both runs on the same device; compared on the CPU.
TEST_P(Resume, NewProcessIsBitIdenticalToUninterrupted) {
  const std::string method = std::get<0>(std::get<0>(GetParam())), inner = std::get<1>(std::get<0>(GetParam()));
  const torch::Device device = std::get<1>(GetParam());
  GRADLORA_SKIP_IF_UNAVAILABLE(device);
  torch::set_num_threads(1);  // the child runs single-threaded too: same reduction order
  const std::string dir = temp_dir("ckpt");
  const Config cfg = quiet(yaml_of(method, inner));

  Net ref = make_net(1, kHidden, torch::kFloat, device);
  LowRankOptimizer ref_opt(ref->named_parameters(), cfg);
  train(ref, ref_opt, 0, 20);
  const Snapshot expected = snapshot(ref_opt, *ref);
  Snapshot expected_cpu;  // what the child wrote: its snapshot moved to the CPU
  for (const auto& kv : expected) expected_cpu.emplace_back(kv.first, kv.second.cpu());

  Net net = make_net(1, kHidden, torch::kFloat, device);
  LowRankOptimizer opt(net->named_parameters(), cfg);
  train(net, opt, 0, 10);
  const std::string ckpt = dir + "/run.ckpt", out = dir + "/child.pt";
  save_checkpoint(opt, *net, ckpt);

  const int status = run_self({"--gradlora-resume-child", method, inner, device.str(), ckpt, out});
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  std::vector<torch::Tensor> values;
  torch::load(values, out);
  ASSERT_EQ(values.size(), expected.size());
  Snapshot got;
  for (size_t i = 0; i < values.size(); ++i) got.emplace_back(expected[i].first, values[i]);
  expect_identical(expected_cpu, got);
  // The comparison has teeth: the state after 10 steps is not the one after 20.
  EXPECT_FALSE(torch::equal(snapshot(opt, *net)[0].second, expected[0].second));
  fs::remove_all(dir);
}

std::vector<ResumeCase> all_cases() {
  std::vector<ResumeCase> v;
  for (const auto& m : kMethods) {
    for (const auto& i : kInners) v.emplace_back(m.name, i.name);
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(AllMethodsAndRules, Resume,
                         ::testing::Combine(::testing::ValuesIn(all_cases()),
                                            ::testing::ValuesIn(::gradlora::testing::test_devices())),
                         [](const auto& info) {
                           const ResumeCase& c = std::get<0>(info.param);
                           return std::string(std::get<0>(c)) + "_" + std::get<1>(c) + "_" +
                                  ::gradlora::testing::device_name(std::get<1>(info.param));
                         });

// LibTorch's own convention, torch::save(opt) / torch::load(opt), over a model
// restored with torch::save / torch::load, round-trips just as well.
TEST(Checkpoint, TorchSaveLoadConventionResumesBitIdentically) {
  for (const char* method : {"lora_symmetric_exact_merge", "random_every3_transfer", "additive"}) {
    SCOPED_TRACE(method);
    const std::string dir = temp_dir("ckpt");
    const Config cfg = quiet(yaml_of(method, "adamw"));
    Net ref = make_net(1);
    LowRankOptimizer ref_opt(ref->named_parameters(), cfg);
    train(ref, ref_opt, 0, 20);

    Net net = make_net(1);
    LowRankOptimizer opt(net->named_parameters(), cfg);
    train(net, opt, 0, 10);
    torch::save(net, dir + "/model.pt");
    torch::save(opt, dir + "/opt.pt");

    Net net2 = make_net(99);
    torch::load(net2, dir + "/model.pt");
    LowRankOptimizer opt2(net2->named_parameters(), cfg);
    torch::load(opt2, dir + "/opt.pt");
    train(net2, opt2, 10, 20);
    expect_identical(snapshot(ref_opt, *ref), snapshot(opt2, *net2));
    fs::remove_all(dir);
  }
}

// ------------------------------------------------------- crash-safe saving

TEST(Checkpoint, SaveWritesNoTemporaryFileAndReplacesAtomically) {
  const std::string dir = temp_dir("ckpt"), path = dir + "/a.ckpt";
  Net net = make_net(1);
  LowRankOptimizer opt(net->named_parameters(), quiet(yaml_of("lora_zero", "adamw")));
  train(net, opt, 0, 2);
  save_checkpoint(opt, *net, path);
  train(net, opt, 2, 4);
  save_checkpoint(opt, *net, path);  // over an existing file
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().filename().string());
  EXPECT_EQ(files, std::vector<std::string>{"a.ckpt"});
  Net net2 = make_net(5);
  LowRankOptimizer opt2(net2->named_parameters(), quiet(yaml_of("lora_zero", "adamw")));
  load_checkpoint(opt2, *net2, path);
  expect_identical(snapshot(opt, *net), snapshot(opt2, *net2));
  fs::remove_all(dir);
}

/// A run trained for `steps` steps and saved to run.ckpt in a fresh folder (removed on
/// destruction): what a later save that fails must leave in place, loadable.
struct SavedRun {
  SavedRun(const char* method, const char* inner, int64_t steps)
      : dir(temp_dir("ckpt")),
        path(dir + "/run.ckpt"),
        cfg(quiet(yaml_of(method, inner))),
        net(make_net(1)),
        opt(net->named_parameters(), cfg) {
    train(net, opt, 0, steps);
    save_checkpoint(opt, *net, path);
    saved = snapshot(opt, *net);
    bytes = read_bytes(path);
  }
  ~SavedRun() { fs::remove_all(dir); }
  SavedRun(const SavedRun&) = delete;
  SavedRun& operator=(const SavedRun&) = delete;

  /// A fresh model and optimizer that load the file equal the run as it was saved.
  void expect_file_loads_as_saved() const {
    Net net2 = make_net(9);
    LowRankOptimizer opt2(net2->named_parameters(), cfg);
    load_checkpoint(opt2, *net2, path);
    expect_identical(saved, snapshot(opt2, *net2));
  }

  const std::string dir, path;
  const Config cfg;
  Net net;
  LowRankOptimizer opt;
  Snapshot saved;
  std::string bytes;
};

TEST(Checkpoint, FailingWriteLeavesPreviousFileLoadable) {
  SavedRun run("lora_symmetric", "adam", 3);
  train(run.net, run.opt, 3, 6);
  detail::set_write_hook([](size_t written) {
    if (written > 1500) throw std::runtime_error("disk full (simulated)");
  });
  try {
    save_checkpoint(run.opt, *run.net, run.path);
    ADD_FAILURE() << "expected CheckpointError";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("disk full (simulated)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(run.path), std::string::npos) << e.what();
  }
  detail::set_write_hook(nullptr);
  EXPECT_EQ(read_bytes(run.path), run.bytes);
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(run.dir)) files += e.is_regular_file();
  EXPECT_EQ(files, 1u) << "the temporary file must be removed";
  run.expect_file_loads_as_saved();
}

TEST(Checkpoint, ProcessKilledWhileSavingLeavesPreviousFileLoadable) {
  SavedRun run("lora_zero", "adam", 1);
  const int status = run_self({"--gradlora-kill-child", run.path});
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "child status " << status;
  EXPECT_EQ(read_bytes(run.path), run.bytes);
  // The child died mid-write: its partial temporary file is what is left.
  size_t partial = 0;
  for (const auto& e : fs::directory_iterator(run.dir)) {
    if (e.path().filename().string().rfind("run.ckpt.tmp.", 0) == 0) {
      ++partial;
      EXPECT_LT(fs::file_size(e.path()), run.bytes.size());
    }
  }
  EXPECT_EQ(partial, 1u);
  run.expect_file_loads_as_saved();
}

TEST(Checkpoint, SaveIntoMissingFolderThrowsNamingThePath) {
  Net net = make_net(1);
  LowRankOptimizer opt(net->named_parameters(), quiet(yaml_of("lora_zero", "sgd_momentum")));
  const std::string path = "/nonexistent-gradlora-folder/x.ckpt";
  try {
    save_checkpoint(opt, *net, path);
    ADD_FAILURE() << "expected CheckpointError";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-gradlora-folder/x.ckpt"), std::string::npos) << e.what();
  }
}

// ------------------------------------------------------------ bad files

// Expects load_checkpoint to throw CheckpointError containing every fragment and
// to leave `opt` and `net` exactly as they were.
void expect_rejected(LowRankOptimizer& opt, Net& net, const std::string& path,
                     std::initializer_list<std::string> fragments) {
  const Snapshot before = snapshot(opt, *net);
  try {
    load_checkpoint(opt, *net, path);
    ADD_FAILURE() << "expected CheckpointError for " << path;
  } catch (const CheckpointError& e) {
    for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
  expect_identical(before, snapshot(opt, *net));
}

class BadFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = temp_dir("ckpt");
    good_ = dir_ + "/good.ckpt";
    Net src = make_net(1);
    LowRankOptimizer src_opt(src->named_parameters(), quiet(yaml_of("lora_symmetric", "adamw")));
    train(src, src_opt, 0, 4);
    save_checkpoint(src_opt, *src, good_);
    // The optimizer under test has state of its own (3 steps on another model).
    train(net_, opt_, 0, 3);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string dir_, good_;
  Net net_ = make_net(2);
  LowRankOptimizer opt_{net_->named_parameters(), quiet(yaml_of("lora_symmetric", "adamw"))};
};

TEST_F(BadFiles, TruncatedFilesAreRejectedAndChangeNothing) {
  const std::string bytes = read_bytes(good_);
  for (size_t len :
       {size_t{0}, size_t{7}, size_t{100}, bytes.size() / 3, bytes.size() / 2, bytes.size() - 30, bytes.size() - 1}) {
    SCOPED_TRACE(len);
    const std::string p = dir_ + "/cut.ckpt";
    write_bytes(p, bytes.substr(0, len));
    expect_rejected(opt_, net_, p, {"cut.ckpt", "corrupt or truncated"});
  }
}

TEST_F(BadFiles, RandomBytesAreRejectedAndChangeNothing) {
  std::mt19937 rng(3);
  for (size_t len : {size_t{16}, size_t{4096}, size_t{70000}}) {
    std::string junk(len, '\0');
    for (auto& c : junk) c = static_cast<char>(rng() & 0xff);
    const std::string p = dir_ + "/junk.ckpt";
    write_bytes(p, junk);
    expect_rejected(opt_, net_, p, {"junk.ckpt", "corrupt or truncated"});
  }
  // A zip-shaped file: the good checkpoint with random bytes over its first half.
  std::string bytes = read_bytes(good_);
  for (size_t i = 0; i < bytes.size() / 2; ++i) bytes[i] = static_cast<char>(rng() & 0xff);
  write_bytes(dir_ + "/half.ckpt", bytes);
  expect_rejected(opt_, net_, dir_ + "/half.ckpt", {"half.ckpt"});
  expect_rejected(opt_, net_, dir_ + "/missing.ckpt", {"missing.ckpt", "cannot be opened"});
}

TEST_F(BadFiles, FileFromAnotherConfigListsEveryMismatch) {
  struct Other {
    std::string yaml;
    std::vector<std::string> fragments;
  };
  const std::vector<Other> others = {
      {yaml_of("lora_zero_merge", "adamw"), {"fc1.weight", "fc2.weight", "rank is 3 in the checkpoint, 2 here"}},
      {yaml_of("lora_symmetric", "sgd_momentum"),
       {"fc1.weight", "fc2.weight", "inner rule is 'adamw' in the checkpoint, 'sgd' here"}},
      {yaml_of("additive", "adamw"), {"fc1.weight", "method is 'lora' in the checkpoint, 'additive' here"}},
      // Same shapes, other meaning: init zero and alpha 6 (scale 2) instead of symmetric with scale 1.
      {yaml_of("lora_zero", "adamw"),
       {"fc1.weight", "fc2.weight",
        "settings are 'scale 1, init symmetric, init_std auto, merge_every 0' in the "
        "checkpoint, 'scale 2, init zero, init_std -, merge_every 0' here"}},
  };
  for (const auto& o : others) {
    SCOPED_TRACE(o.yaml);
    Net net = make_net(3);
    LowRankOptimizer opt(net->named_parameters(), quiet(o.yaml));
    train(net, opt, 0, 2);
    const Snapshot before = snapshot(opt, *net);
    try {
      load_checkpoint(opt, *net, good_);
      ADD_FAILURE() << "expected CheckpointError";
    } catch (const CheckpointError& e) {
      for (const auto& f : o.fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
    expect_identical(before, snapshot(opt, *net));
  }
}

TEST_F(BadFiles, OtherModelShapesAreListedAndChangeNothing) {
  Net wide = make_net(4, /*hidden=*/20);
  LowRankOptimizer opt(wide->named_parameters(), quiet(yaml_of("lora_symmetric", "adamw")));
  train(wide, opt, 0, 2);
  expect_rejected(opt, wide, good_,
                  {"model parameter 'fc1.weight' has shape [16, 12] in the checkpoint, [20, 12] here",
                   "model parameter 'fc2.weight' has shape [6, 16] in the checkpoint, [6, 20] here"});
}

TEST_F(BadFiles, ForeignArchivesAreRejected) {
  torch::save(net_, dir_ + "/module.pt");  // a plain LibTorch module archive
  expect_rejected(opt_, net_, dir_ + "/module.pt", {"not written by gradlora::save_checkpoint"});
  save_checkpoint(opt_, dir_ + "/opt_only.ckpt");  // no model section
  expect_rejected(opt_, net_, dir_ + "/opt_only.ckpt", {"holds no model"});
  // The optimizer-only load of an optimizer-only file works.
  Net net = make_net(2);
  LowRankOptimizer opt(net->named_parameters(), quiet(yaml_of("lora_symmetric", "adamw")));
  load_checkpoint(opt, dir_ + "/opt_only.ckpt");
  EXPECT_EQ(opt.step_count(), 3);
}

// torch::load(opt, path) validates too and leaves the optimizer as it was.
TEST_F(BadFiles, TorchLoadOfAnotherConfigThrowsAndChangesNothing) {
  Net src = make_net(1);
  LowRankOptimizer src_opt(src->named_parameters(), quiet(yaml_of("lora_zero_merge", "adam")));
  train(src, src_opt, 0, 2);
  torch::save(src_opt, dir_ + "/opt.pt");
  const Snapshot before = snapshot(opt_, *net_);
  try {
    torch::load(opt_, dir_ + "/opt.pt");
    ADD_FAILURE() << "expected an error";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("fc1.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("rank is 2 in the checkpoint, 3 here"), std::string::npos) << msg;
  }
  expect_identical(before, snapshot(opt_, *net_));
}

}  // namespace
}  // namespace gradlora::ckpt_test

// The resume and kill tests re-run this binary with a flag to get a new process.
int main(int argc, char** argv) {
  using namespace gradlora::ckpt_test;
  if (argc == 7 && std::string(argv[1]) == "--gradlora-resume-child") {
    try {
      return resume_child(argv[2], argv[3], argv[4], argv[5], argv[6]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "resume child: %s\n", e.what());
      return 2;
    }
  }
  if (argc == 3 && std::string(argv[1]) == "--gradlora-kill-child") return kill_child(argv[2]);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
