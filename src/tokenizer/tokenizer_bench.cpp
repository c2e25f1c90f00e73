#include "tokenizer/tokenizer_bench.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <vector>

namespace muse {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

}  // namespace

TokenizerBenchRecord bench_tokenizer(const Tokenizer& tokenizer, const std::string& text, int warmup, int iters) {
  if (text.empty()) throw std::invalid_argument("bench: the text to tokenize is empty");
  if (iters < 1 || warmup < 0) throw std::invalid_argument("bench: --iters must be positive and --warmup not negative");
  using clock = std::chrono::steady_clock;
  std::vector<double> encode_s, decode_s;
  std::vector<int32_t> ids;
  std::string decoded;
  for (int i = 0; i < warmup + iters; ++i) {
    const auto t0 = clock::now();
    ids = tokenizer.encode(text);
    const auto t1 = clock::now();
    decoded = tokenizer.decode(ids);
    const auto t2 = clock::now();
    if (i < warmup) continue;
    encode_s.push_back(std::chrono::duration<double>(t1 - t0).count());
    decode_s.push_back(std::chrono::duration<double>(t2 - t1).count());
  }
  if (tokenizer.kind() != "spm" && decoded != text)
    throw std::runtime_error("bench: " + tokenizer.kind() + " tokenizer does not round-trip the text");
  TokenizerBenchRecord r;
  r.tokenizer = tokenizer.kind();
  r.bytes = int64_t(text.size());
  r.tokens = int64_t(ids.size());
  r.iters = iters;
  r.encode_mb_per_s = double(text.size()) / 1e6 / median(encode_s);
  r.decode_mb_per_s = double(text.size()) / 1e6 / median(decode_s);
  return r;
}

}  // namespace muse
