#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <map>
#include <memory>

#include "cli/commands.h"
#include "model/layout.h"
#include "train/checkpoint.h"

namespace muse::cli {

namespace {

nlohmann::json describe(const ModelConfig& config, const std::string& source) {
  ParamTable table;
  build_layout(config, table);
  std::map<std::string, int64_t> modules;
  for (const ParamInfo& p : table.entries()) modules[param_module(p.name)] += int64_t(p.size);
  return {{"source", source},
          {"config", to_json(config)},
          {"parameters", {{"total", int64_t(table.count())}, {"per_module", modules}, {"tensors", table.entries().size()}}}};
}

}  // namespace

void add_inspect_command(CLI::App& app) {
  auto preset = std::make_shared<std::string>();
  auto model_dir = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("inspect", "Config, parameter counts per module, tokenizer and training state");
  auto* p = cmd->add_option("--preset,-p", *preset, "A preset name");
  auto* m = cmd->add_option("--model,-m", *model_dir, "A checkpoint or run directory")->check(CLI::ExistingDirectory);
  p->excludes(m);
  cmd->add_flag("--json", *as_json, "Print JSON");
  cmd->callback([preset, model_dir, as_json] {
    if (preset->empty() == model_dir->empty()) throw std::invalid_argument("give exactly one of --preset and --model");
    nlohmann::json out;
    if (!preset->empty()) {
      out = describe(find_preset(*preset).model, "preset " + *preset);
    } else {
      const std::string dir = resolve_checkpoint_dir(*model_dir);
      const CheckpointInfo info = read_checkpoint_info(dir);
      out = describe(info.config, dir);
      out["preset"] = info.preset;
      out["muse_version"] = info.muse_version;
      out["tokenizer"] = load_tokenizer(dir + "/tokenizer")->kind();
      std::ifstream trainer(dir + "/trainer.json");
      if (trainer) out["training"] = nlohmann::json::parse(trainer, nullptr, false);
    }
    if (*as_json) {
      std::printf("%s\n", out.dump(2).c_str());
      return;
    }
    std::printf("%s\n", out["source"].get<std::string>().c_str());
    for (auto& [k, v] : out["config"].items()) std::printf("  %-16s %s\n", k.c_str(), v.dump().c_str());
    std::printf("parameters per module:\n");
    for (auto& [k, v] : out["parameters"]["per_module"].items())
      std::printf("  %-16s %12lld\n", k.c_str(), (long long)v.get<int64_t>());
    std::printf("  %-16s %12lld\n", "total", (long long)out["parameters"]["total"].get<int64_t>());
    if (out.contains("tokenizer")) std::printf("tokenizer: %s\n", out["tokenizer"].get<std::string>().c_str());
    if (out.contains("training") && out["training"].is_object())
      std::printf("training: step %lld, %lld tokens seen\n", (long long)out["training"].value("step", 0LL),
                  (long long)out["training"].value("tokens_seen", 0LL));
  });
}

}  // namespace muse::cli
