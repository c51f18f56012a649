// PEFT-compatible LoRA adapters and the safetensors format (adapter.h).
#include <gradlora/adapter.h>
#include <gradlora/checkpoint.h>
#include <gradlora/method.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

namespace gradlora {

namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;  // the reference implementation's limit
constexpr const char* kModelFile = "adapter_model.safetensors";
constexpr const char* kConfigFile = "adapter_config.json";

struct DtypeName {
  const char* name;
  torch::ScalarType type;
};

const DtypeName kDtypes[] = {{"F64", torch::kFloat64},   {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
                             {"BF16", torch::kBFloat16}, {"I64", torch::kInt64},   {"I32", torch::kInt32},
                             {"I16", torch::kInt16},     {"I8", torch::kInt8},     {"U8", torch::kUInt8},
                             {"BOOL", torch::kBool}};

const char* dtype_name(torch::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (d.type == t) return d.name;
  }
  return nullptr;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw AdapterError(fmt::format("'{}': cannot be opened", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string module_of(const std::string& param_name) {
  static const std::string suffix = ".weight";
  if (param_name.size() <= suffix.size() ||
      param_name.compare(param_name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return {};
  }
  return param_name.substr(0, param_name.size() - suffix.size());
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// PEFT's rank_pattern / alpha_pattern lookup: a key names a module or a suffix of its dotted path.
const json* pattern_lookup(const json& patterns, const std::string& module) {
  if (!patterns.is_object()) return nullptr;
  for (auto it = patterns.begin(); it != patterns.end(); ++it) {
    if (module == it.key() || ends_with(module, "." + it.key())) return &it.value();
  }
  return nullptr;
}

json number(double v) {
  if (std::nearbyint(v) == v && std::abs(v) < 1e15) return json(static_cast<int64_t>(v));
  return json(v);
}

}  // namespace

// ---------------------------------------------------------- safetensors

void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__" || !names.insert(name).second) {
      throw AdapterError(fmt::format("'{}': tensor name '{}' is reserved or repeated", path, name));
    }
    const char* dt = dtype_name(t.scalar_type());
    if (!dt) {
      throw AdapterError(fmt::format("'{}': tensor '{}' has dtype {}, which safetensors I/O here does not support",
                                     path, name, c10::toString(t.scalar_type())));
    }
    torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    header[name] = {{"dtype", dt}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(c));
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  // Pad with spaces so the data starts 8-byte aligned (as the reference writer does).
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  uint64_t n = text.size();
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((n >> (8 * i)) & 0xff);
  write_file_atomically(path, [&](const std::function<void(const void*, size_t)>& sink) {
    sink(len, 8);
    sink(text.data(), text.size());
    for (const auto& c : data) {
      if (c.numel() > 0) sink(c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
    }
  });
}

SafetensorsFile read_safetensors(const std::string& path) {
  const std::string bytes = read_all(path);
  auto fail = [&](const std::string& what) { return AdapterError(fmt::format("safetensors '{}': {}", path, what)); };
  if (bytes.size() < 8) {
    throw fail(fmt::format("file has {} bytes, too short for the 8-byte header length", bytes.size()));
  }
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  if (n > kMaxHeaderBytes || n > bytes.size() - 8) {
    throw fail(fmt::format("header length {} does not fit a file of {} bytes", n, bytes.size()));
  }
  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  } catch (const json::exception& e) {
    throw fail(fmt::format("header is not valid JSON: {}", e.what()));
  }
  if (!header.is_object()) throw fail("header is not a JSON object");
  const char* data = bytes.data() + 8 + n;
  const uint64_t data_size = bytes.size() - 8 - n;

  SafetensorsFile out;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) throw fail("'__metadata__' is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw fail(fmt::format("'__metadata__.{}' is not a string", m.key()));
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string who = fmt::format("tensor '{}'", key);
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets")) {
      throw fail(who + ": expected an object with dtype, shape and data_offsets");
    }
    if (!v["dtype"].is_string()) throw fail(who + ": 'dtype' is not a string");
    const std::string dt = v["dtype"].get<std::string>();
    const DtypeName* d = nullptr;
    for (const auto& x : kDtypes) {
      if (dt == x.name) d = &x;
    }
    if (!d) throw fail(fmt::format("{}: dtype '{}' is not supported", who, dt));
    const json& shape = v["shape"];
    if (!shape.is_array()) throw fail(who + ": 'shape' is not a list");
    std::vector<int64_t> dims;
    uint64_t numel = 1;
    for (const auto& s : shape) {
      if (!s.is_number_unsigned()) {
        throw fail(fmt::format("{}: shape entry {} is not a non-negative integer", who, s.dump()));
      }
      const uint64_t x = s.get<uint64_t>();
      if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) || (x != 0 && numel > data_size / x + 1)) {
        throw fail(fmt::format("{}: shape {} is too large for the file", who, shape.dump()));
      }
      numel *= x;
      dims.push_back(static_cast<int64_t>(x));
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      throw fail(fmt::format("{}: 'data_offsets' {} is not a pair of non-negative integers", who, off.dump()));
    }
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    const uint64_t esize = c10::elementSize(d->type);
    if (b > e || e > data_size) {
      throw fail(fmt::format("{}: data_offsets [{}, {}] outside the data ({} bytes)", who, b, e, data_size));
    }
    if (numel > data_size || e - b != numel * esize) {
      throw fail(fmt::format("{}: data_offsets [{}, {}] hold {} bytes, shape {} of {} needs {}", who, b, e, e - b,
                             shape.dump(), dt, numel * esize));
    }
    torch::Tensor t = torch::empty(dims, torch::TensorOptions().dtype(d->type));
    if (e > b) std::memcpy(t.data_ptr(), data + b, e - b);
    out.tensors[key] = std::move(t);
    spans.emplace_back(b, e);
  }
  // The data must be covered exactly: no overlaps, no holes.
  std::sort(spans.begin(), spans.end());
  uint64_t pos = 0;
  for (const auto& [b, e] : spans) {
    if (b == e) continue;
    if (b != pos) {
      throw fail(fmt::format("data bytes [{}, {}) are {} by tensors", std::min(b, pos), std::max(b, pos),
                             b < pos ? "claimed twice" : "not claimed"));
    }
    pos = e;
  }
  if (pos != data_size) throw fail(fmt::format("data bytes [{}, {}) are not claimed by any tensor", pos, data_size));
  return out;
}

// -------------------------------------------------------------- export

std::set<std::string> embedding_modules(const torch::nn::Module& module) {
  std::set<std::string> out;
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    if (item.value()->as<torch::nn::Embedding>() != nullptr) out.insert(item.key());
  }
  return out;
}

bool has_adapter_parameters(const LowRankOptimizer& opt) {
  for (const auto& name : opt.names()) {
    if (opt.method_of(name) == Method::lora) return true;
  }
  return false;
}

AdapterExport export_adapter(const LowRankOptimizer& opt, const std::string& folder, const AdapterOptions& options) {
  torch::NoGradGuard guard;
  AdapterExport info;
  NamedTensors tensors;
  struct ModuleScale {
    std::string module;
    int64_t r;
    double alpha;
  };
  std::vector<ModuleScale> scales;
  std::vector<std::pair<std::string, bool>> ffio;   // fan_in_fan_out of each non-embedding module
  auto& self = const_cast<LowRankOptimizer&>(opt);  // projector() is non-const; nothing is modified
  for (const auto& name : opt.names()) {
    const Method method = opt.method_of(name);
    if (method == Method::frozen) continue;
    if (method != Method::lora) {
      info.skipped.push_back(name);
      continue;
    }
    const std::string module = module_of(name);
    if (module.empty()) {
      throw AdapterError(fmt::format(
          "export_adapter: parameter '{}' (method lora) does not end in '.weight'; a PEFT adapter names modules, "
          "not parameters",
          name));
    }
    const Projector& p = self.projector(name);
    const Target& t = p.context().target;
    const int64_t merge_every = option_int(t, "merge_every");
    if (merge_every > 0 && p.steps() >= merge_every) {
      throw AdapterError(fmt::format(
          "export_adapter: parameter '{}' merged its factors into the weight {} time(s) (merge_every: {}); its "
          "change is no longer of rank {} and cannot be an adapter (save the weights instead)",
          name, p.steps() / merge_every, merge_every, t.rank));
    }
    auto [A, B] = p.factors();
    auto [A0, B0] = p.initial_factors();
    // The change of the n×m matrix the method sees is s·L·R (L n×r, R r×m).
    torch::Tensor L = A, R = B;
    if (t.init != Init::zero) {
      // Symmetric and gradient init: s·(A·B − A0·B0) = s·[A, −A0]·[B; B0]: rank 2r, exact.
      L = torch::cat({A, -A0}, 1);
      R = torch::cat({B, B0}, 0);
    }
    const int64_t r = R.size(0);
    const torch::Tensor& P = p.context().param;
    const bool embedding = options.embedding_modules.count(module) > 0;
    torch::Tensor first, second;  // lora_A / lora_embedding_A, lora_B / lora_embedding_B
    if (embedding) {
      if (P.dim() != 2) {
        throw AdapterError(fmt::format(
            "export_adapter: module '{}' is listed in embedding_modules, but its weight '{}' has shape [{}], not "
            "(num_embeddings, embedding_dim)",
            module, name, fmt::join(P.sizes(), ", ")));
      }
      // PEFT: ΔW = (lora_embedding_B·lora_embedding_A)ᵀ·scale, A r×num_embeddings, B embedding_dim×r.
      // Stored ΔW = s·L·R (or its transpose under fan_in_fan_out).
      first = p.transposed() ? R : L.t();
      second = p.transposed() ? L : R.t();
    } else {
      // PEFT: ΔW = lora_B·lora_A·scale (Linear), or its transpose under fan_in_fan_out (Conv1D);
      // the method's view is out×in in both cases.
      first = R;
      second = L;
      ffio.emplace_back(module, p.transposed());
      std::vector<int64_t> a_shape{r}, b_shape{p.rows(), r};
      if (p.transposed()) {
        a_shape.push_back(p.cols());  // r × in
      } else {
        for (int64_t d = 1; d < P.dim(); ++d) a_shape.push_back(P.size(d));  // conv: r × in × kh × kw
        for (int64_t d = 2; d < P.dim(); ++d) b_shape.push_back(1);          // conv: out × r × 1 × 1
      }
      first = first.reshape(a_shape);
      second = second.reshape(b_shape);
    }
    if (options.dtype) {
      first = first.to(*options.dtype);
      second = second.to(*options.dtype);
    }
    const std::string key = options.key_prefix + module;
    tensors.emplace_back(key + (embedding ? ".lora_embedding_A" : ".lora_A.weight"), first.contiguous());
    tensors.emplace_back(key + (embedding ? ".lora_embedding_B" : ".lora_B.weight"), second.contiguous());
    scales.push_back({module, r, t.scale() * static_cast<double>(r)});
    info.modules.push_back(module);
    info.ranks[module] = r;
  }
  if (info.modules.empty()) {
    throw AdapterError(fmt::format("export_adapter: the optimizer trains no parameter with method lora"));
  }
  // adapter_config.json has one fan_in_fan_out for all (non-embedding) modules.
  for (const auto& f : ffio) {
    if (f.second != ffio.front().second) {
      throw AdapterError(fmt::format(
          "export_adapter: module '{}' has fan_in_fan_out {} and module '{}' has {}; a PEFT adapter_config.json holds "
          "one fan_in_fan_out for all its modules, so one adapter cannot carry both layouts",
          ffio.front().first, ffio.front().second, f.first, f.second));
    }
  }
  const bool fan_in_fan_out = !ffio.empty() && ffio.front().second;
  if (!info.skipped.empty()) {
    spdlog::warn("gradlora: export_adapter: a LoRA adapter cannot carry {} (not method lora); not exported",
                 fmt::join(info.skipped, ", "));
  }

  json cfg;
  cfg["peft_type"] = "LORA";
  cfg["task_type"] = nullptr;
  cfg["base_model_name_or_path"] =
      options.base_model_name_or_path.empty() ? json(nullptr) : json(options.base_model_name_or_path);
  cfg["r"] = scales[0].r;
  cfg["lora_alpha"] = number(scales[0].alpha);
  json rank_pattern = json::object(), alpha_pattern = json::object();
  for (const auto& s : scales) {
    if (s.r != scales[0].r) rank_pattern[s.module] = s.r;
    if (s.alpha != scales[0].alpha) alpha_pattern[s.module] = number(s.alpha);
  }
  cfg["rank_pattern"] = rank_pattern;
  cfg["alpha_pattern"] = alpha_pattern;
  cfg["target_modules"] = info.modules;
  cfg["lora_dropout"] = 0.0;
  cfg["bias"] = "none";
  cfg["fan_in_fan_out"] = fan_in_fan_out;
  cfg["use_rslora"] = false;
  cfg["init_lora_weights"] = true;
  cfg["modules_to_save"] = nullptr;
  cfg["inference_mode"] = true;
  cfg["revision"] = nullptr;

  std::error_code ec;
  std::filesystem::create_directories(folder, ec);
  if (ec) throw AdapterError(fmt::format("export_adapter: cannot create folder '{}': {}", folder, ec.message()));
  write_safetensors(folder + "/" + kModelFile, tensors, {{"format", "pt"}});
  const std::string text = cfg.dump(2) + "\n";
  write_file_atomically(folder + "/" + kConfigFile,
                        [&](const std::function<void(const void*, size_t)>& sink) { sink(text.data(), text.size()); });
  return info;
}

// ---------------------------------------------------------------- load

std::vector<std::string> load_adapter(const torch::OrderedDict<std::string, torch::Tensor>& named_parameters,
                                      const std::string& folder) {
  const std::string cfg_path = folder + "/" + kConfigFile;
  const std::string st_path = folder + "/" + kModelFile;
  json cfg;
  try {
    cfg = json::parse(read_all(cfg_path));
  } catch (const json::exception& e) {
    throw AdapterError(fmt::format("adapter config '{}': not valid JSON: {}", cfg_path, e.what()));
  }
  auto bad = [&](const std::string& key, const std::string& what) {
    return AdapterError(fmt::format("adapter config '{}': key '{}': {}", cfg_path, key, what));
  };
  if (!cfg.is_object()) throw bad("(top level)", "expected a JSON object");
  if (!cfg.contains("peft_type") || cfg["peft_type"] != "LORA") {
    throw bad("peft_type", fmt::format("expected \"LORA\", got {}",
                                       cfg.contains("peft_type") ? cfg["peft_type"].dump() : "nothing"));
  }
  if (!cfg.contains("r") || !cfg["r"].is_number_integer() || cfg["r"].get<int64_t>() <= 0) {
    throw bad("r", fmt::format("expected an integer > 0, got {}", cfg.contains("r") ? cfg["r"].dump() : "nothing"));
  }
  if (!cfg.contains("lora_alpha") || !cfg["lora_alpha"].is_number()) {
    throw bad("lora_alpha", fmt::format("expected a number, got {}",
                                        cfg.contains("lora_alpha") ? cfg["lora_alpha"].dump() : "nothing"));
  }
  if (cfg.contains("fan_in_fan_out") && !cfg["fan_in_fan_out"].is_boolean()) {
    throw bad("fan_in_fan_out", fmt::format("expected true or false, got {}", cfg["fan_in_fan_out"].dump()));
  }
  const bool fan_in_fan_out = cfg.value("fan_in_fan_out", false);
  const bool rslora = cfg.contains("use_rslora") && cfg["use_rslora"] == true;
  const json rank_pattern = cfg.value("rank_pattern", json::object());
  const json alpha_pattern = cfg.value("alpha_pattern", json::object());

  const SafetensorsFile file = read_safetensors(st_path);
  struct Pair {
    torch::Tensor A, B;
    bool embedding = false;  // lora_embedding_A / lora_embedding_B
    bool mixed = false;      // a Linear factor and an embedding factor
  };
  std::map<std::string, Pair> modules;
  std::vector<std::string> problems;
  struct Suffix {
    const char* text;
    bool a, embedding;
  };
  const Suffix suffixes[] = {{".lora_A.weight", true, false},
                             {".lora_B.weight", false, false},
                             {".lora_embedding_A", true, true},
                             {".lora_embedding_B", false, true}};
  for (const auto& [key, t] : file.tensors) {
    std::string k = key;
    if (k.rfind("base_model.model.", 0) == 0) k = k.substr(std::strlen("base_model.model."));
    const Suffix* found = nullptr;
    for (const auto& sfx : suffixes) {
      if (ends_with(k, sfx.text)) found = &sfx;
    }
    if (!found) {
      problems.push_back(
          fmt::format("key '{}' is not a LoRA factor (expected '<module>.lora_A.weight', '<module>.lora_B.weight', "
                      "'<module>.lora_embedding_A' or '<module>.lora_embedding_B')",
                      key));
      continue;
    }
    const std::string module = k.substr(0, k.size() - std::strlen(found->text));
    Pair& f = modules[module];
    if ((f.A.defined() || f.B.defined()) && f.embedding != found->embedding) f.mixed = true;
    f.embedding = found->embedding;
    (found->a ? f.A : f.B) = t;
  }
  struct Update {
    std::string name;
    torch::Tensor param, A, B;
    double scale;
    bool transpose;  // ΔW = (B·A)ᵀ·scale: embeddings, and Linear factors under fan_in_fan_out
  };
  std::vector<Update> updates;
  for (const auto& [module, f] : modules) {
    const std::string name = module + ".weight";
    const std::string who = fmt::format("module '{}': ", module);
    const char* a_name = f.embedding ? "lora_embedding_A" : "lora_A.weight";
    const char* b_name = f.embedding ? "lora_embedding_B" : "lora_B.weight";
    const char* a_short = f.embedding ? "lora_embedding_A" : "lora_A";
    if (f.mixed) {
      problems.push_back(who + "holds both lora_A/lora_B and lora_embedding_A/lora_embedding_B factors");
      continue;
    }
    if (!f.A.defined() || !f.B.defined()) {
      problems.push_back(who + fmt::format("{} is missing", f.A.defined() ? b_name : a_name));
      continue;
    }
    const torch::Tensor* P = named_parameters.find(name);
    if (!P) {
      problems.push_back(who + fmt::format("the model has no parameter '{}'", name));
      continue;
    }
    if (!f.A.is_floating_point() || !f.B.is_floating_point()) {
      problems.push_back(who + "the factors must be floating point");
      continue;
    }
    // The matrix B·A is n×m; it is the weight's (rows × the rest) view, or the transpose of a
    // 2-D weight (embedding: (num_embeddings, dim) = (B·A)ᵀ; fan_in_fan_out: (in, out) = (B·A)ᵀ).
    const bool transpose = f.embedding || fan_in_fan_out;
    if (transpose && P->dim() != 2) {
      problems.push_back(who + fmt::format("{} needs a 2-D weight, parameter '{}' has shape [{}]",
                                           f.embedding ? "an embedding adapter" : "fan_in_fan_out: true", name,
                                           fmt::join(P->sizes(), ", ")));
      continue;
    }
    const int64_t rows = P->dim() == 0 ? 1 : P->size(0);
    const int64_t cols = rows == 0 ? 0 : P->numel() / rows;
    const int64_t n = transpose ? cols : rows, m = transpose ? rows : cols;
    const int64_t r = f.A.dim() > 0 ? f.A.size(0) : 0;
    if (r == 0 || f.A.numel() != r * m || f.B.dim() < 2 || f.B.size(0) != n || f.B.numel() != n * r) {
      problems.push_back(who + fmt::format("{} [{}] and {} [{}] do not fit parameter '{}' of shape [{}]{}", a_name,
                                           fmt::join(f.A.sizes(), ", "), b_name, fmt::join(f.B.sizes(), ", "), name,
                                           fmt::join(P->sizes(), ", "),
                                           f.embedding      ? " (an embedding adapter: ΔW = (B·A)ᵀ)"
                                           : fan_in_fan_out ? " (fan_in_fan_out: ΔW = (B·A)ᵀ)"
                                                            : ""));
      continue;
    }
    const json* rp = pattern_lookup(rank_pattern, module);
    const json* ap = pattern_lookup(alpha_pattern, module);
    if ((rp && !rp->is_number_integer()) || (ap && !ap->is_number())) {
      problems.push_back(who + "rank_pattern / alpha_pattern entry is not a number");
      continue;
    }
    const int64_t cfg_r = rp ? rp->get<int64_t>() : cfg["r"].get<int64_t>();
    const double alpha = ap ? ap->get<double>() : cfg["lora_alpha"].get<double>();
    if (cfg_r != r) {
      problems.push_back(who + fmt::format("the config says r = {}, {} has {} rows", cfg_r, a_short, r));
      continue;
    }
    const double scale = rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
    updates.push_back({name, *P, f.A.reshape({r, m}), f.B.reshape({n, r}), scale, transpose});
  }
  if (modules.empty() && problems.empty()) problems.push_back("the file holds no LoRA factors");
  if (!problems.empty()) {
    throw AdapterError(fmt::format("adapter '{}' does not fit these parameters ({} problem(s)):\n  {}", folder,
                                   problems.size(), fmt::join(problems, "\n  ")));
  }
  torch::NoGradGuard guard;
  std::vector<std::string> changed;
  for (auto& u : updates) {
    const auto dt = u.param.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    torch::Tensor delta = torch::mm(u.B.to(dt), u.A.to(dt)).mul_(u.scale);
    torch::Tensor P = u.param;
    delta = u.transpose ? delta.to(P.device()).t() : delta.to(P.device()).view(P.sizes());
    if (P.scalar_type() == dt) {
      P.add_(delta);
    } else {
      P.copy_(P.to(dt).add_(delta));  // one rounding to the weight's precision
    }
    changed.push_back(u.name);
  }
  return changed;
}

}  // namespace gradlora
