#include "tokenizer/gpt2_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <queue>
#include <stdexcept>

namespace muse {

namespace {

constexpr std::string_view kEndOfText = "<|endoftext|>";

// GPT-2's pre-tokeniser. \s and \S are spelled out as Unicode's White_Space set, which is what the
// Python `regex` module (used by GPT-2's encoder.py) and tiktoken match; PCRE2's own \s differs from it
// (it adds U+180E), and JavaScript's adds U+FEFF and drops U+0085.
#define MUSE_WHITE_SPACE "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
constexpr const char* kPreTokenPattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" MUSE_WHITE_SPACE "\\p{L}\\p{N}]+"
    "|[" MUSE_WHITE_SPACE "]+(?![^" MUSE_WHITE_SPACE "])|[" MUSE_WHITE_SPACE "]+";
#undef MUSE_WHITE_SPACE

// GPT-2's byte-to-symbol map: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
// space, DEL, NBSP, soft hyphen) for code points 256, 257, ... in byte order, so every token is a string
// of visible characters in encoder.json and vocab.bpe. Returns code point -> byte (-1 where none).
std::vector<int> symbol_to_byte() {
  std::vector<int> table(256 + 68, -1);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    table[printable ? b : next++] = b;
  }
  return table;
}

// Length of the valid UTF-8 sequence starting at s[0] (Unicode Table 3-7: no overlong forms, no
// surrogates, nothing above U+10FFFF), or 0 when the bytes there do not start one.
size_t utf8_sequence_length(const unsigned char* s, size_t available) {
  const unsigned char c = s[0];
  if (c < 0x80) return 1;
  size_t length;
  unsigned char lo = 0x80, hi = 0xBF;  // the range allowed for the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    length = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    length = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    length = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (available < length || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < length; ++i)
    if (s[i] < 0x80 || s[i] > 0xBF) return 0;
  return length;
}

// Decodes a vocabulary symbol string (UTF-8 of GPT-2's byte symbols) to the bytes it stands for.
std::string symbols_to_bytes(const std::string& symbols, const std::vector<int>& to_byte, const std::string& where) {
  std::string bytes;
  const auto* s = reinterpret_cast<const unsigned char*>(symbols.data());
  for (size_t i = 0; i < symbols.size();) {
    const size_t n = utf8_sequence_length(s + i, symbols.size() - i);
    uint32_t cp = 0;
    if (n == 1) cp = s[i];
    if (n == 2) cp = (s[i] & 0x1Fu) << 6 | (s[i + 1] & 0x3Fu);
    if (n == 0 || n > 2 || cp >= to_byte.size() || to_byte[cp] < 0)
      throw std::runtime_error(where + ": '" + symbols + "' is not made of GPT-2 byte symbols");
    bytes += char(to_byte[cp]);
    i += n;
  }
  return bytes;
}

}  // namespace

struct Gpt2Tokenizer::Pattern {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Pattern() { pcre2_code_free(code); }
};

Gpt2Tokenizer::Gpt2Tokenizer(const std::string& dir) : pattern_(std::make_unique<Pattern>()) {
  const std::string encoder_path = dir + "/encoder.json", merges_path = dir + "/vocab.bpe";
  encoder_json_ = read_file_bytes(encoder_path);
  vocab_bpe_ = read_file_bytes(merges_path);
  const std::vector<int> to_byte = symbol_to_byte();

  const nlohmann::json encoder = nlohmann::json::parse(encoder_json_, nullptr, false);
  if (encoder.is_discarded() || !encoder.is_object() || encoder.empty())
    throw std::runtime_error(encoder_path + ": not a JSON object of token -> id");
  token_bytes_.assign(encoder.size(), std::string());
  std::vector<bool> seen(encoder.size(), false);
  for (const auto& [symbols, id_json] : encoder.items()) {
    if (!id_json.is_number_integer() || id_json.get<int64_t>() < 0 || id_json.get<int64_t>() >= int64_t(encoder.size()))
      throw std::runtime_error(encoder_path + ": token '" + symbols + "' has id " + id_json.dump() + ", expected 0.." +
                               std::to_string(encoder.size() - 1));
    const int32_t id = id_json.get<int32_t>();
    if (seen[id]) throw std::runtime_error(encoder_path + ": id " + std::to_string(id) + " is used twice");
    seen[id] = true;
    token_bytes_[id] = symbols_to_bytes(symbols, to_byte, encoder_path);
    if (!id_of_bytes_.emplace(token_bytes_[id], id).second)
      throw std::runtime_error(encoder_path + ": two tokens stand for the bytes of '" + symbols + "'");
  }
  for (int b = 0; b < 256; ++b) {
    const int32_t id = token_id(std::string(1, char(b)));
    if (id < 0) throw std::runtime_error(encoder_path + ": no token for byte " + std::to_string(b));
    byte_token_[b] = id;
  }
  end_of_text_id_ = token_id(kEndOfText);
  if (end_of_text_id_ < 0) throw std::runtime_error(encoder_path + ": no <|endoftext|> token");

  // vocab.bpe: a "#version" line, then one merge "left right" per line, lowest rank first. The merge
  // loop in merge() relies on each merged token being new and being made before any merge that uses
  // it, as BPE training guarantees; a file that breaks this is refused rather than encoded differently.
  std::vector<int32_t> made_at(token_bytes_.size(), -1);
  size_t line_start = 0;
  int line_no = 0;
  int32_t rank = 0;
  while (line_start < vocab_bpe_.size()) {
    size_t line_end = vocab_bpe_.find('\n', line_start);
    if (line_end == std::string::npos) line_end = vocab_bpe_.size();
    const std::string line = vocab_bpe_.substr(line_start, line_end - line_start);
    line_start = line_end + 1;
    ++line_no;
    if (line_no == 1 && line.rfind("#version", 0) == 0) continue;
    if (line.empty()) continue;
    const std::string where = merges_path + ":" + std::to_string(line_no);
    const size_t space = line.find(' ');
    if (space == std::string::npos || space == 0 || space + 1 >= line.size() || line.find(' ', space + 1) != std::string::npos)
      throw std::runtime_error(where + ": expected two symbols separated by one space");
    const std::string left = symbols_to_bytes(line.substr(0, space), to_byte, where);
    const std::string right = symbols_to_bytes(line.substr(space + 1), to_byte, where);
    const int32_t l = token_id(left), r = token_id(right), m = token_id(left + right);
    if (l < 0 || r < 0 || m < 0) throw std::runtime_error(where + ": '" + line + "' uses or makes a token not in encoder.json");
    if (made_at[m] >= 0 || m == l || m == r)
      throw std::runtime_error(where + ": '" + line + "' makes a token an earlier merge already made");
    for (int32_t used : {l, r})
      if (token_bytes_[used].size() > 1 && made_at[used] < 0)
        throw std::runtime_error(where + ": '" + line + "' uses a token that only a later merge (or none) makes");
    made_at[m] = rank;
    if (!merges_.emplace(uint64_t(uint32_t(l)) << 32 | uint32_t(r), std::make_pair(rank, m)).second)
      throw std::runtime_error(where + ": the merge '" + line + "' appears twice");
    ++rank;
  }

  // The fingerprint covers what decides the output (token bytes by id, merges by rank) rather than the
  // files' formatting, plus a version of the pre-tokenisation rules.
  uint64_t h = fnv1a64("muse-tokenizer:gpt2:v1");
  for (const std::string& bytes : token_bytes_) h = fnv1a64(std::to_string(bytes.size()) + ":" + bytes, h);
  std::vector<uint64_t> by_rank(merges_.size());
  for (const auto& [pair, rank_and_token] : merges_) by_rank[rank_and_token.first] = pair;
  for (uint64_t pair : by_rank) h = fnv1a64(std::to_string(pair) + ";", h);
  fingerprint_ = h;

  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pattern_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPreTokenPattern), PCRE2_ZERO_TERMINATED,
                                 PCRE2_UTF | PCRE2_ANCHORED, &error, &error_offset, nullptr);
  if (!pattern_->code) throw std::logic_error("GPT-2 pre-tokeniser pattern does not compile, error " + std::to_string(error));
  pattern_->jit = pcre2_jit_compile(pattern_->code, PCRE2_JIT_COMPLETE) == 0;
}

Gpt2Tokenizer::~Gpt2Tokenizer() = default;

int32_t Gpt2Tokenizer::token_id(std::string_view bytes) const {
  const auto it = id_of_bytes_.find(std::string(bytes));
  return it == id_of_bytes_.end() ? -1 : it->second;
}

std::pair<int32_t, int32_t> Gpt2Tokenizer::merge_of(int32_t left, int32_t right) const {
  const auto it = merges_.find(uint64_t(uint32_t(left)) << 32 | uint32_t(right));
  return it == merges_.end() ? std::make_pair(-1, -1) : it->second;
}

std::vector<std::string_view> Gpt2Tokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string_view> pieces;
  const std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> match_data(pcre2_match_data_create(1, nullptr),
                                                                               pcre2_match_data_free);
  pcre2_match_data* match = match_data.get();
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  size_t i = 0;
  while (i < text.size()) {
    // A maximal run of bytes that start no valid UTF-8 sequence is one pre-token.
    size_t end = i;
    while (end < text.size() && utf8_sequence_length(s + end, text.size() - end) == 0) ++end;
    if (end > i) {
      pieces.push_back(text.substr(i, end - i));
      i = end;
      continue;
    }
    // A maximal run of valid UTF-8, pre-tokenised as a text of its own.
    while (end < text.size()) {
      const size_t n = s[end] < 0x80 ? 1 : utf8_sequence_length(s + end, text.size() - end);
      if (n == 0) break;
      end += n;
    }
    const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data() + i);
    const PCRE2_SIZE length = end - i;
    for (PCRE2_SIZE offset = 0; offset < length;) {
      // The pattern's alternatives cover every character, so an anchored match always succeeds.
      const int rc = pattern_->jit ? pcre2_jit_match(pattern_->code, subject, length, offset, 0, match, nullptr)
                                   : pcre2_match(pattern_->code, subject, length, offset, PCRE2_NO_UTF_CHECK, match, nullptr);
      if (rc <= 0)
        throw std::runtime_error("GPT-2 pre-tokeniser failed at byte " + std::to_string(i + offset) + " (PCRE2 error " +
                                 std::to_string(rc) + ")");
      const PCRE2_SIZE match_end = pcre2_get_ovector_pointer(match)[1];
      pieces.push_back(text.substr(i + offset, match_end - offset));
      offset = match_end;
    }
    i = end;
  }
  return pieces;
}

std::vector<int32_t> Gpt2Tokenizer::merge(std::string_view piece) const {
  const int32_t n = int32_t(piece.size());
  if (n == 1) return {byte_token_[static_cast<unsigned char>(piece[0])]};
  // The symbols form a linked list; a min-heap holds every adjacent pair that is a merge, ordered by
  // (rank, position). Because a merged token only takes part in merges of higher rank (checked when
  // vocab.bpe is read), popping in this order merges all occurrences of the lowest-rank pair left to
  // right before any higher rank, exactly as GPT-2's loop does, in O(n log n) instead of O(n²).
  struct Symbol {
    int32_t id, prev, next;
  };
  struct Candidate {
    int32_t rank, left, left_id, right_id, merged;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::vector<Symbol> symbols(n);
  for (int32_t k = 0; k < n; ++k) symbols[k] = {byte_token_[static_cast<unsigned char>(piece[k])], k - 1, k + 1 < n ? k + 1 : -1};
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto consider = [&](int32_t left) {
    if (left < 0 || symbols[left].next < 0) return;
    const int32_t l = symbols[left].id, r = symbols[symbols[left].next].id;
    const auto [rank, merged] = merge_of(l, r);
    if (rank >= 0) heap.push({rank, left, l, r, merged});
  };
  for (int32_t k = 0; k + 1 < n; ++k) consider(k);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& left = symbols[c.left];
    // Stale entries: a symbol that was absorbed (id -1) or changed since the pair was pushed.
    if (left.id != c.left_id || left.next < 0 || symbols[left.next].id != c.right_id) continue;
    Symbol& right = symbols[left.next];
    left.id = c.merged;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.left;
    right.id = -1;
    consider(left.prev);
    consider(c.left);
  }
  std::vector<int32_t> ids;
  for (int32_t k = 0; k >= 0; k = symbols[k].next) ids.push_back(symbols[k].id);
  return ids;
}

void Gpt2Tokenizer::encode_ordinary(std::string_view text, std::vector<int32_t>& out,
                                    std::unordered_map<std::string_view, std::pair<uint32_t, uint32_t>>& cache,
                                    std::vector<int32_t>& cached_ids) const {
  for (std::string_view piece : pre_tokenize(text)) {
    if (piece.size() == 1) {
      out.push_back(byte_token_[static_cast<unsigned char>(piece[0])]);
      continue;
    }
    // Most pre-tokens of a text repeat (words, spaces, punctuation); merging each distinct one once is
    // what makes encoding fast.
    auto [it, fresh] = cache.try_emplace(piece);
    if (fresh) {
      const std::vector<int32_t> ids = merge(piece);
      it->second = {uint32_t(cached_ids.size()), uint32_t(ids.size())};
      cached_ids.insert(cached_ids.end(), ids.begin(), ids.end());
    }
    out.insert(out.end(), cached_ids.begin() + it->second.first, cached_ids.begin() + it->second.first + it->second.second);
  }
}

std::vector<int32_t> Gpt2Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  // The cache lives for one call: its keys are views into `text`, and encode() stays thread-safe.
  std::unordered_map<std::string_view, std::pair<uint32_t, uint32_t>> cache;
  std::vector<int32_t> cached_ids;
  const std::string_view all(text);
  size_t start = 0;
  for (size_t special; (special = all.find(kEndOfText, start)) != std::string_view::npos; start = special + kEndOfText.size()) {
    encode_ordinary(all.substr(start, special - start), out, cache, cached_ids);
    out.push_back(end_of_text_id_);
  }
  encode_ordinary(all.substr(start), out, cache, cached_ids);
  return out;
}

std::string Gpt2Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    throw std::out_of_range("gpt2 tokenizer: token id " + std::to_string(id) + " is not in [0, " +
                            std::to_string(vocab_size()) + ")");
  return token_bytes_[id];
}

std::string Gpt2Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) token_bytes(id);  // throws, naming the id
    text += token_bytes_[id];
  }
  return text;
}

void Gpt2Tokenizer::save(const std::string& dir) const {
  for (const auto& [name, content] : {std::pair<std::string, const std::string*>{"encoder.json", &encoder_json_},
                                      {"vocab.bpe", &vocab_bpe_}}) {
    std::ofstream out(dir + "/" + name, std::ios::binary);
    out << *content;
    if (!out) throw std::runtime_error(dir + "/" + name + ": write failed");
  }
  write_tokenizer_json(dir, *this);
}

}  // namespace muse
