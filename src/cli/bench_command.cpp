#include <nlohmann/json.hpp>

#include <cstdio>
#include <memory>

#include "bench/bench.h"
#include "cli/commands.h"
#include "cli/device_flags.h"
#include "data/prepare.h"
#include "tokenizer/tokenizer_bench.h"

namespace muse::cli {

void add_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  auto as_json = std::make_shared<bool>(false);
  auto tokenizer_spec = std::make_shared<std::string>();
  auto text_file = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "bench",
      "Throughput (median tokens/s) and peak memory of forward passes, train steps or decode steps, or a\n"
      "tokenizer's encoding speed (--tokenizer). --mode decode prefills --batch streams with --context random\n"
      "tokens each, then times single recurrent decode steps of all streams together: tokens/s in total and\n"
      "per stream (on the GPU: one CUDA graph per step, fp32, logits left on the device).");
  cmd->add_option("--preset,-p", o->preset, "Preset to benchmark (required unless --tokenizer is given)");
  cmd->add_option("--tokenizer", *tokenizer_spec,
                  "Benchmark this tokenizer instead (byte, gpt2, spm:PATH): single-thread encode/decode MB/s on --text");
  cmd->add_option("--text", *text_file, "Text file for --tokenizer (e.g. the KJV: bible -f Gen1:1-Rev22:21 > kjv.txt)")
      ->check(CLI::ExistingFile);
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
  add_device_flag(cmd, o->device,
                  "the GPU when one is visible; decode of arch = gpt, whose KV cache only the CPU decoder keeps,\n"
                  "runs on the CPU");
  add_gpu_math_flag(cmd, o->gpu_math);
  cmd->add_flag("--json", *as_json, "Print one JSON record");
  cmd->add_flag("--profile", o->profile,
                "GPU: also time each group of kernels (LayerNorm, BK core, attention, AR-SSM, head, ...) over the\n"
                "iterations, in a separate pass, and report ms per iteration for each. With --mode decode: the\n"
                "step's timeline, µs from the last block's start at which each kernel reached each phase (needs a\n"
                "build configured with -DMUSE_DECODE_TIMELINE=ON)");
  cmd->callback([o, as_json, tokenizer_spec, text_file] {
    if (!tokenizer_spec->empty()) {
      if (text_file->empty()) throw std::invalid_argument("--tokenizer needs --text FILE to encode");
      const TokenizerBenchRecord t =
          bench_tokenizer(*make_tokenizer(*tokenizer_spec), read_corpus_file(*text_file), o->warmup, o->iters);
      if (*as_json)
        std::printf("%s\n", nlohmann::json{{"tokenizer", t.tokenizer}, {"text", *text_file}, {"bytes", t.bytes},
                                           {"tokens", t.tokens}, {"threads", 1}, {"iters", t.iters},
                                           {"encode_mb_per_s", t.encode_mb_per_s}, {"decode_mb_per_s", t.decode_mb_per_s}}
                                 .dump()
                                 .c_str());
      else
        std::printf("%s tokenizer on %s (%lld bytes -> %lld tokens, %.2f bytes/token), 1 thread: encode %.2f MB/s, "
                    "decode %.1f MB/s (median of %d)\n",
                    t.tokenizer.c_str(), text_file->c_str(), (long long)t.bytes, (long long)t.tokens,
                    double(t.bytes) / double(t.tokens), t.encode_mb_per_s, t.decode_mb_per_s, t.iters);
      return;
    }
    if (o->preset.empty()) throw std::invalid_argument("--preset is required (or --tokenizer to benchmark a tokenizer)");
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
      if (!r.gpu_math.empty()) j["gpu_math"] = r.gpu_math;
      if (!o->overrides.empty()) j["overrides"] = o->overrides;
      if (!r.profile.empty()) {
        nlohmann::json groups = nlohmann::json::array();
        for (const auto& [group, ms] : r.profile) groups.push_back({{"group", group}, {"ms", ms}});
        j["profile"] = groups;
      }
      if (!r.timeline.empty()) {
        nlohmann::json marks = nlohmann::json::array();
        for (const auto& [mark, us] : r.timeline) marks.push_back({{"mark", mark}, {"us", us}});
        j["timeline"] = marks;
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
    if (!r.profile.empty() && !*as_json) {
      double total = 0;
      for (const auto& entry : r.profile) total += entry.second;
      std::printf("per group of kernels (ms per iteration, separate pass with events):\n");
      for (const auto& [group, ms] : r.profile)
        std::printf("  %-24s %9.3f ms  %5.1f %%\n", group.c_str(), ms, 100 * ms / total);
      std::printf("  %-24s %9.3f ms\n", "total", total);
    }
    if (!r.timeline.empty() && !*as_json) {
      std::printf("step timeline: the last block of the last step and the head, µs after block_input started\n"
                  "(stamps of thread 0 of the first row's block 0, the SSM block for 'mixer SSM', or of the last\n"
                  "block to finish):\n");
      for (const auto& [mark, us] : r.timeline) std::printf("  %-34s %8.2f\n", mark.c_str(), us);
    }
  });
}

}  // namespace muse::cli
