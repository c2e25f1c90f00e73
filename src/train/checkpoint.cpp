#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "infer/chat_template.h"
#include "io/safetensors.h"

namespace muse {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

void fsync_path(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

std::vector<TensorRef> tensor_refs(const ParamTable& table, const float* base, const std::string& prefix) {
  std::vector<TensorRef> refs;
  for (const ParamInfo& p : table.entries()) refs.push_back({prefix + p.name, p.shape, base + p.offset});
  return refs;
}

// Copies each named tensor of `contents` into dest at its table offset, checking the set of names and
// every shape.
void copy_tensors(const std::string& file, SafetensorsContents& contents, const ParamTable& table,
                  const std::string& prefix, float* dest) {
  for (const ParamInfo& p : table.entries()) {
    auto it = contents.tensors.find(prefix + p.name);
    if (it == contents.tensors.end())
      throw std::runtime_error(file + ": tensor '" + prefix + p.name + "' is missing (expected shape " +
                               shape_string(p.shape) + ")");
    if (it->second.shape != p.shape)
      throw std::runtime_error(file + ": tensor '" + prefix + p.name + "' has shape " + shape_string(it->second.shape) +
                               ", the model expects " + shape_string(p.shape));
    std::copy(it->second.data.begin(), it->second.data.end(), dest + p.offset);
    contents.tensors.erase(it);
  }
  if (!contents.tensors.empty())
    throw std::runtime_error(file + ": unknown tensor '" + contents.tensors.begin()->first +
                             "' (not a parameter of this model's config)");
}

json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": missing");
  json j = json::parse(in, nullptr, false);
  if (j.is_discarded()) throw std::runtime_error(path + ": not valid JSON");
  return j;
}

}  // namespace

void write_file_atomic(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << contents;
    out.flush();
    if (!out) throw std::runtime_error(tmp + ": write failed");
  }
  fsync_path(tmp);
  fs::rename(tmp, path);
  fsync_path(fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path());
}

void write_checkpoint(const std::string& dir, const CheckpointWrite& c) {
  const fs::path final_dir = fs::absolute(dir);
  const fs::path tmp = final_dir.parent_path() / (".tmp-" + final_dir.filename().string() + "-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp / "tokenizer");

  write_safetensors((tmp / "model.safetensors").string(), tensor_refs(*c.table, c.params, ""),
                    {{"format", "muse"}, {"muse_version", MUSE_VERSION}});
  json config = {{"model", to_json(*c.config)}, {"preset", c.preset}, {"muse_version", MUSE_VERSION},
                 {"tokenizer", c.tokenizer->kind()}, {"chat_template", to_json(default_chat_template())}};
  std::ofstream(tmp / "config.json") << config.dump(2) << "\n";
  c.tokenizer->save((tmp / "tokenizer").string());
  if (c.optimizer) {
    auto refs = tensor_refs(*c.table, c.optimizer->first_moment_data(), "m.");
    auto v = tensor_refs(*c.table, c.optimizer->second_moment_data(), "v.");
    refs.insert(refs.end(), v.begin(), v.end());
    write_safetensors((tmp / "optimizer.safetensors").string(), refs,
                      {{"steps_taken", std::to_string(c.optimizer->steps_taken())}});
  }
  if (c.trainer_state) std::ofstream(tmp / "trainer.json") << c.trainer_state->dump(2) << "\n";
  for (const auto& entry : fs::recursive_directory_iterator(tmp))
    if (entry.is_regular_file()) fsync_path(entry.path());
  fsync_path(tmp / "tokenizer");
  fsync_path(tmp);

  // Replace an existing directory of the same name only after the new one is complete.
  const fs::path old = final_dir.parent_path() / (".old-" + final_dir.filename().string() + "-" + std::to_string(::getpid()));
  const bool replacing = fs::exists(final_dir);
  if (replacing) fs::rename(final_dir, old);
  fs::rename(tmp, final_dir);
  fsync_path(final_dir.parent_path());
  if (replacing) fs::remove_all(old);
}

std::string write_run_checkpoint(const std::string& run_dir, int64_t step, const CheckpointWrite& contents,
                                 int keep_last) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", (long long)step);
  const fs::path ckpts = fs::path(run_dir) / "checkpoints";
  fs::create_directories(ckpts);
  write_checkpoint((ckpts / name).string(), contents);
  write_file_atomic((fs::path(run_dir) / "latest").string(), std::string("checkpoints/") + name + "\n");
  if (keep_last > 0) {
    std::vector<std::string> steps;
    for (const auto& e : fs::directory_iterator(ckpts))
      if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0) steps.push_back(e.path().string());
    std::sort(steps.begin(), steps.end());
    for (size_t i = 0; i + size_t(keep_last) < steps.size(); ++i) fs::remove_all(steps[i]);
  }
  return (ckpts / name).string();
}

std::string resolve_checkpoint_dir(const std::string& path) {
  if (fs::exists(fs::path(path) / "config.json")) return path;
  const fs::path latest = fs::path(path) / "latest";
  if (fs::exists(latest)) {
    std::ifstream in(latest);
    std::string rel;
    std::getline(in, rel);
    const fs::path dir = fs::path(path) / rel;
    if (!rel.empty() && fs::exists(dir / "config.json")) return dir.string();
    throw std::runtime_error(latest.string() + " names '" + rel + "', which is not a checkpoint");
  }
  throw std::runtime_error(path + ": not a checkpoint (no config.json) nor a run directory (no latest)");
}

CheckpointInfo read_checkpoint_info(const std::string& dir) {
  const json j = read_json_file(dir + "/config.json");
  if (!j.is_object() || !j.contains("model")) throw std::runtime_error(dir + "/config.json: no \"model\" section");
  CheckpointInfo info;
  try {
    info.config = model_config_from_json(j["model"]);
    validate(info.config);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(dir + "/config.json: " + e.what());
  }
  info.preset = j.value("preset", "");
  info.muse_version = j.value("muse_version", "");
  if (j.contains("chat_template")) info.chat_template = j["chat_template"];
  return info;
}

void load_params(const std::string& dir, const ParamTable& table, float* params) {
  const std::string file = dir + "/model.safetensors";
  SafetensorsContents contents = read_safetensors(file);
  copy_tensors(file, contents, table, "", params);
}

LoadedModel load_model(const std::string& path) {
  const std::string dir = resolve_checkpoint_dir(path);
  CheckpointInfo info = read_checkpoint_info(dir);
  LoadedModel loaded{Model<float>(info.config), load_tokenizer(dir + "/tokenizer"), info, dir, json::object()};
  load_params(dir, loaded.model.table(), loaded.model.params().data());
  if (fs::exists(dir + "/trainer.json")) loaded.trainer_state = read_json_file(dir + "/trainer.json");
  return loaded;
}

json load_training_state(const std::string& dir, const ParamTable& table, AdamW& optimizer) {
  const std::string file = dir + "/optimizer.safetensors";
  SafetensorsContents contents = read_safetensors(file);
  auto it = contents.metadata.find("steps_taken");
  if (it == contents.metadata.end()) throw std::runtime_error(file + ": no steps_taken in its metadata");
  SafetensorsContents m, v;
  for (auto& [name, t] : contents.tensors) {
    if (name.rfind("m.", 0) == 0)
      m.tensors[name] = std::move(t);
    else if (name.rfind("v.", 0) == 0)
      v.tensors[name] = std::move(t);
    else
      throw std::runtime_error(file + ": unknown tensor '" + name + "'");
  }
  copy_tensors(file, m, table, "m.", optimizer.first_moment_data());
  copy_tensors(file, v, table, "v.", optimizer.second_moment_data());
  optimizer.set_steps_taken(std::stoll(it->second));
  return read_json_file(dir + "/trainer.json");
}

}  // namespace muse
