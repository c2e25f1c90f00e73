#include <nlohmann/json.hpp>

#include <cstdio>
#include <memory>

#include "bench/bench.h"
#include "cli/commands.h"

namespace muse::cli {

void add_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  auto as_json = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Throughput (median tokens/s) and peak memory of forward passes, train steps or decode steps.\n"
      "--mode decode prefills --batch streams with --context random tokens each, then times single recurrent\n"
      "decode steps of all streams together: tokens/s in total and per stream.");
  cmd->add_option("--preset,-p", o->preset, "Preset to benchmark")->required();
  cmd->add_option("--set", o->overrides, "Override a config field (repeatable), e.g. --set arch=gpt --set ffn=dense");
  cmd->add_option("--mode", o->mode, "forward, train or decode")
      ->capture_default_str()
      ->check(CLI::IsMember({"forward", "train", "decode"}));
  cmd->add_option("--batch,-b", o->batch, "Batch size (decode: streams decoded together)")->capture_default_str();
  cmd->add_option("--seq,-n", o->seq, "Sequence length (forward, train)")->capture_default_str();
  cmd->add_option("--context", o->context, "Decode: prompt tokens per stream before the timed steps")
      ->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "Untimed iterations first")->capture_default_str();
  cmd->add_option("--iters", o->iters, "Timed iterations (the median is reported)")->capture_default_str();
  cmd->add_option("--device", o->device, "cpu")->capture_default_str()->check(CLI::IsMember({"cpu"}));
  cmd->add_flag("--json", *as_json, "Print one JSON record");
  cmd->callback([o, as_json] {
    const BenchRecord r = run_bench(*o);
    if (*as_json) {
      nlohmann::json j = {{"preset", r.preset},       {"mode", r.mode},         {"batch", r.batch},
                          {"seq", r.seq},             {"device", r.device},     {"threads", r.threads},
                          {"tokens_per_s", r.tokens_per_s}, {"median_ms", r.median_ms}, {"peak_mem_mb", r.peak_mem_mb},
                          {"gflop_per_iter", r.gflop_per_iter}, {"gflop_per_s", r.gflop_per_iter / (r.median_ms / 1e3)},
                          {"parameters", r.parameters}, {"iters", r.iters}};
      if (r.mode == "decode") {
        j["tokens_per_s_per_stream"] = r.tokens_per_s_per_stream;
        j["context"] = r.context;
      }
      std::printf("%s\n", j.dump().c_str());
    } else if (r.mode == "decode") {
      std::printf("%s decode B=%d context=%d on %s (%d threads): %.1f tokens/s total, %.1f tokens/s per stream, "
                  "%.2f ms/step (median of %d), peak %.0f MiB, %.2f GFLOP/s\n",
                  r.preset.c_str(), r.batch, r.context, r.device.c_str(), r.threads, r.tokens_per_s,
                  r.tokens_per_s_per_stream, r.median_ms, r.iters, r.peak_mem_mb,
                  r.gflop_per_iter / (r.median_ms / 1e3));
    } else {
      std::printf("%s %s B=%d N=%d on %s (%d threads): %.0f tokens/s, %.2f ms/iter (median of %d), peak %.0f MiB, "
                  "%.2f GFLOP/s\n",
                  r.preset.c_str(), r.mode.c_str(), r.batch, r.seq, r.device.c_str(), r.threads, r.tokens_per_s,
                  r.median_ms, r.iters, r.peak_mem_mb, r.gflop_per_iter / (r.median_ms / 1e3));
    }
  });
}

}  // namespace muse::cli
