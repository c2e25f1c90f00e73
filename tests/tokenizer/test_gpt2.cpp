#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>

#include "tokenizer/tokenizer_test_support.h"

namespace muse::test {

namespace {

namespace fs = std::filesystem;

#define REQUIRE_GPT2()                                                   \
  if (shared_gpt2() == nullptr) GTEST_SKIP() << gpt2_missing_reason(); \
  const Gpt2Tokenizer& gpt2 = *shared_gpt2()

std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

// GPT-2's merge loop as encoder.py writes it (lowest-rank pair, all occurrences left to right, again),
// on token ids: the reference for the heap-based Gpt2Tokenizer::merge.
std::vector<int32_t> reference_merge(const Gpt2Tokenizer& gpt2, const std::string& piece) {
  std::vector<int32_t> word;
  for (unsigned char c : piece) word.push_back(gpt2.token_id(std::string(1, char(c))));
  while (word.size() > 1) {
    int32_t best_rank = -1, best_left = -1, best_right = -1, best_merged = -1;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      const auto [rank, merged] = gpt2.merge_of(word[i], word[i + 1]);
      if (rank >= 0 && (best_rank < 0 || rank < best_rank)) {
        best_rank = rank;
        best_left = word[i];
        best_right = word[i + 1];
        best_merged = merged;
      }
    }
    if (best_rank < 0) break;
    std::vector<int32_t> next;
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == best_left && word[i + 1] == best_right) {
        next.push_back(best_merged);
        i += 2;
      } else {
        next.push_back(word[i++]);
      }
    }
    word = next;
  }
  return word;
}

}  // namespace

TEST(gpt2_node, matches_the_gpt3_encoder_package_on_a_varied_corpus) {
  REQUIRE_GPT2();
  const std::string encoder_js = gpt2_files_dir() + "/gpt-3-encoder/Encoder.js";
  if (!fs::exists(encoder_js)) GTEST_SKIP() << encoder_js << " not found (run scripts/setup-debian.sh)";
  if (std::system("node --version > /dev/null 2>&1") != 0) GTEST_SKIP() << "node is not installed";

  ScratchDir dir("node");
  const std::vector<std::string> docs = varied_corpus();
  dir.write("docs.json", nlohmann::json(docs).dump());
  dir.write("encode.js",
            "const { encode } = require(process.argv[2]);\n"
            "const docs = JSON.parse(require('fs').readFileSync(process.argv[3], 'utf8'));\n"
            "process.stdout.write(JSON.stringify(docs.map(encode)));\n");
  const std::string command = "node " + dir.str("encode.js") + " '" + encoder_js + "' " + dir.str("docs.json") + " > " +
                              dir.str("ids.json") + " 2> " + dir.str("node.err");
  ASSERT_EQ(std::system(command.c_str()), 0) << "node failed: " << read_file_bytes(dir.str("node.err"));
  const nlohmann::json expected = nlohmann::json::parse(read_file_bytes(dir.str("ids.json")));
  ASSERT_EQ(expected.size(), docs.size());
  size_t tokens = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    const std::vector<int32_t> ids = gpt2.encode(docs[d]);
    EXPECT_EQ(ids, expected[d].get<std::vector<int32_t>>()) << "document " << d << ": " << docs[d];
    EXPECT_EQ(gpt2.decode(ids), docs[d]) << "document " << d;
    tokens += ids.size();
  }
  EXPECT_GT(tokens, 5000u);  // the comparison covered a real amount of text
}

TEST(gpt2_python, follows_python_gpt2_where_javascript_differs) {
  REQUIRE_GPT2();
  // Expected ids from GPT-2's encoder.py with the Python `regex` module (\s = White_Space).
  // U+FEFF is not whitespace: " \ufeff" is one "other" pre-token (JavaScript: " " then "\ufeff").
  EXPECT_EQ(gpt2.encode("a \xEF\xBB\xBF" "b"), (std::vector<int32_t>{64, 27332, 119, 123, 65}));
  // U+0085 is whitespace: " \u0085" is one whitespace pre-token (JavaScript: " \u0085" as "other").
  EXPECT_EQ(gpt2.encode("x \xC2\x85y"), (std::vector<int32_t>{87, 220, 126, 227, 88}));
  // U+001C..U+001F are not whitespace in either (Python's `re` module, unlike `regex`, would say they are).
  EXPECT_EQ(gpt2.encode("a\x1c\x1d\x1e\x1f b"), (std::vector<int32_t>{64, 216, 217, 218, 219, 275}));
  EXPECT_EQ(gpt2.encode("Hello world"), (std::vector<int32_t>{15496, 995}));
}

TEST(gpt2_roundtrip, any_bytes_decode_to_themselves) {
  REQUIRE_GPT2();
  for (const std::string& doc : varied_corpus()) EXPECT_EQ(gpt2.decode(gpt2.encode(doc)), doc);
  Rng rng(7);
  for (int t = 0; t < 200; ++t) {
    std::string bytes(rng.below(200), '\0');
    for (char& c : bytes) c = char(rng.below(256));
    EXPECT_EQ(gpt2.decode(gpt2.encode(bytes)), bytes) << "random bytes, case " << t;
  }
  EXPECT_TRUE(gpt2.encode("").empty());
  EXPECT_EQ(gpt2.decode({}), "");
}

TEST(gpt2_invalid_utf8, invalid_runs_are_pre_tokens_of_their_own) {
  REQUIRE_GPT2();
  using Views = std::vector<std::string_view>;
  EXPECT_EQ(gpt2.pre_tokenize("abc\xff\xfe" "def"), (Views{"abc", "\xff\xfe", "def"}));
  // The valid text on each side is pre-tokenised as a text of its own: the spaces before the invalid
  // byte end their segment, so they stay one pre-token instead of lending one to the next word.
  EXPECT_EQ(gpt2.pre_tokenize("a  \x80 b"), (Views{"a", "  ", "\x80", " b"}));
  // Truncated, surrogate, overlong, beyond U+10FFFF and lone continuation bytes are all invalid.
  for (const std::string bad : {"\xE3\x81", "\xED\xA0\x80", "\xC0\xAF", "\xF4\x90\x80\x80", "\xBF"}) {
    const std::string text = "x " + bad + "y";
    EXPECT_EQ(gpt2.pre_tokenize(text), (Views{"x", " ", bad, "y"})) << "bytes of length " << bad.size();
    EXPECT_EQ(gpt2.encode(text), concat(concat(gpt2.encode("x "), gpt2.merge(bad)), gpt2.encode("y")));
    EXPECT_EQ(gpt2.decode(gpt2.encode(text)), text);
  }
}

TEST(gpt2_decode, is_exact_for_ids_that_split_a_character) {
  REQUIRE_GPT2();
  const std::string text = "語😀";
  const std::vector<int32_t> ids = gpt2.encode(text);
  std::string joined;
  bool split = false;
  for (int32_t id : ids) {
    const std::string piece = gpt2.decode({id});
    EXPECT_EQ(piece, gpt2.token_bytes(id));
    split |= piece.size() < 3;  // both characters are 3 or 4 bytes long
    joined += piece;
  }
  EXPECT_TRUE(split) << "expected a token holding part of a character";
  EXPECT_EQ(joined, text);
  EXPECT_EQ(gpt2.decode({gpt2.token_id("\xE8")}), "\xE8");
  EXPECT_NE(error_of([&] { gpt2.decode({1, 50257}); }).find("50257"), std::string::npos);
  EXPECT_THROW(gpt2.token_bytes(-1), std::out_of_range);
}

TEST(gpt2_special, end_of_text_literal_is_the_special_token) {
  REQUIRE_GPT2();
  EXPECT_EQ(gpt2.vocab_size(), 50257);
  EXPECT_EQ(gpt2.end_of_text_id(), 50256);
  const std::string text = "first<|endoftext|>second <|endoftext|><|endoftext|>";
  const std::vector<int32_t> expected =
      concat(concat(concat(gpt2.encode("first"), {50256}), gpt2.encode("second ")), {50256, 50256});
  EXPECT_EQ(gpt2.encode(text), expected);
  EXPECT_EQ(gpt2.decode(expected), text);
  EXPECT_EQ(gpt2.token_bytes(50256), "<|endoftext|>");
  // A partial marker is ordinary text.
  EXPECT_EQ(gpt2.decode(gpt2.encode("<|endoftext")), "<|endoftext");
}

TEST(gpt2_merge, heap_order_equals_gpt2s_merge_loop) {
  REQUIRE_GPT2();
  std::vector<std::string> pieces;
  for (const std::string& doc : varied_corpus())
    for (std::string_view p : gpt2.pre_tokenize(doc)) pieces.emplace_back(p);
  Rng rng(99);
  const std::string alphabet = "etaoinshrdlu ETAOIN'.,0123456789";
  for (int t = 0; t < 300; ++t) {
    std::string s(1 + rng.below(60), ' ');
    for (char& c : s) c = alphabet[rng.below(alphabet.size())];
    pieces.push_back(s);
  }
  pieces.push_back(std::string(500, 'a'));
  pieces.push_back(std::string(301, ' '));
  std::string repeated;
  for (int i = 0; i < 100; ++i) repeated += "abra";
  pieces.push_back(repeated);
  for (const std::string& p : pieces) EXPECT_EQ(gpt2.merge(p), reference_merge(gpt2, p)) << "pre-token '" << p << "'";
}

TEST(gpt2_pretokenize, long_runs_need_no_backtracking_limits) {
  REQUIRE_GPT2();
  const std::string spaces(1 << 20, ' ');
  EXPECT_EQ(gpt2.pre_tokenize(spaces).size(), 1u);
  const std::string text = "a" + std::string(100000, ' ') + "b";
  const auto pieces = gpt2.pre_tokenize(text);
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_EQ(pieces[1].size(), 99999u);
  EXPECT_EQ(pieces[2], " b");
  std::string letters;
  for (int i = 0; i < 100000; ++i) letters += "日本";
  EXPECT_EQ(gpt2.pre_tokenize(letters).size(), 1u);
  EXPECT_EQ(gpt2.decode(gpt2.encode(letters)), letters);
}

TEST(gpt2_save, saved_folder_is_self_contained_and_fingerprinted) {
  REQUIRE_GPT2();
  ScratchDir dir("gpt2_save");
  fs::create_directories(dir.str("files"));
  fs::create_directories(dir.str("saved"));
  for (const char* name : {"encoder.json", "vocab.bpe"}) fs::copy_file(gpt2_files_dir() + "/" + name, dir.str("files/") + name);
  make_tokenizer("gpt2:" + dir.str("files"))->save(dir.str("saved"));
  fs::remove_all(dir.str("files"));
  const auto loaded = load_tokenizer(dir.str("saved"));
  EXPECT_EQ(loaded->kind(), "gpt2");
  EXPECT_EQ(loaded->fingerprint(), gpt2.fingerprint());
  const std::string text = varied_corpus()[1];
  EXPECT_EQ(loaded->encode(text), gpt2.encode(text));
  EXPECT_NE(gpt2.fingerprint(), make_tokenizer("byte")->fingerprint());

  // Dropping the last merge changes what the files encode: loading refuses them.
  std::string merges = read_file_bytes(dir.str("saved/vocab.bpe"));
  merges.erase(merges.rfind('\n', merges.size() - 2) + 1);
  dir.write("saved/vocab.bpe", merges);
  const std::string error = error_of([&] { load_tokenizer(dir.str("saved")); });
  EXPECT_NE(error.find("fingerprint"), std::string::npos) << error;
  EXPECT_NE(error.find("changed"), std::string::npos) << error;
}

TEST(gpt2_files, bad_or_missing_files_are_named) {
  ScratchDir dir("gpt2_files");
  std::string error = error_of([&] { make_tokenizer("gpt2:" + dir.str("nowhere")); });
  EXPECT_NE(error.find("setup-debian.sh"), std::string::npos) << error;
  EXPECT_NE(error.find("MUSE_GPT2_DIR"), std::string::npos) << error;

  // A tiny consistent vocabulary: the 256 bytes, "ab", "abc" and <|endoftext|>.
  std::vector<int> printable;
  nlohmann::json encoder = nlohmann::json::object();
  {
    int next = 256, id = 0;
    for (int b = 0; b < 256; ++b) {
      const bool own = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const int cp = own ? b : next++;
      std::string utf8 = cp < 0x80 ? std::string(1, char(cp))
                                   : std::string{char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
      encoder[utf8] = id++;
    }
    encoder["ab"] = 256;
    encoder["abc"] = 257;
    encoder["<|endoftext|>"] = 258;
  }
  dir.write("encoder.json", encoder.dump());
  dir.write("vocab.bpe", "#version: 0.2\na b\nab c\n");
  const Gpt2Tokenizer tiny(dir.str());
  EXPECT_EQ(tiny.vocab_size(), 259);
  EXPECT_EQ(tiny.encode("abcab"), (std::vector<int32_t>{257, 256}));

  dir.write("vocab.bpe", "#version: 0.2\na b\nab q\n");
  error = error_of([&] { Gpt2Tokenizer{dir.str()}; });
  EXPECT_NE(error.find("vocab.bpe:3"), std::string::npos) << error;
  dir.write("vocab.bpe", "#version: 0.2\nab c\na b\n");
  error = error_of([&] { Gpt2Tokenizer{dir.str()}; });
  EXPECT_NE(error.find("later merge"), std::string::npos) << error;
  dir.write("vocab.bpe", "#version: 0.2\na  b\n");
  error = error_of([&] { Gpt2Tokenizer{dir.str()}; });
  EXPECT_NE(error.find("vocab.bpe:2: expected two symbols"), std::string::npos) << error;
  dir.write("encoder.json", "{\"a\": 0, \"b\": 0}");
  error = error_of([&] { Gpt2Tokenizer{dir.str()}; });
  EXPECT_NE(error.find("encoder.json"), std::string::npos) << error;
  dir.write("encoder.json", "[1, 2]");
  error = error_of([&] { Gpt2Tokenizer{dir.str()}; });
  EXPECT_NE(error.find("encoder.json: not a JSON object"), std::string::npos) << error;
}

}  // namespace muse::test
