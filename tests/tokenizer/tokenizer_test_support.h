// Shared by the tokenizer tests: scratch directories, the varied test corpus, the GPT-2 tokenizer when
// its files are present.
#pragma once
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/rng.h"
#include "support/temp_dir.h"
#include "tokenizer/gpt2_tokenizer.h"
#include "tokenizer/spm_tokenizer.h"

namespace muse::test {

// A scratch directory removed at the end of the test, with a helper to write files into it.
struct ScratchDir : TempDir {
  explicit ScratchDir(const std::string& name) : TempDir("tok_" + name) {}
  void write(const std::string& sub, const std::string& content) const {
    std::ofstream(str(sub), std::ios::binary) << content;
  }
};

// Why the GPT-2 tests cannot run here, or "" when they can.
inline std::string gpt2_missing_reason() {
  const std::string dir = gpt2_files_dir();
  if (!std::filesystem::exists(dir + "/encoder.json") || !std::filesystem::exists(dir + "/vocab.bpe"))
    return "GPT-2 files not found in " + dir + " (run scripts/setup-debian.sh or set MUSE_GPT2_DIR)";
  return "";
}

// The GPT-2 tokenizer, loaded once for the whole test run (nullptr when its files are missing).
inline const Gpt2Tokenizer* shared_gpt2() {
  static const std::unique_ptr<Gpt2Tokenizer> tokenizer =
      gpt2_missing_reason().empty() ? std::make_unique<Gpt2Tokenizer>(gpt2_files_dir()) : nullptr;
  return tokenizer.get();
}

// Documents covering what GPT-2's pre-tokeniser distinguishes: English prose with contractions, code,
// numbers, whitespace runs (spaces, tabs, newlines, NBSP, ideographic space, line separator), emoji
// (with skin tones and ZWJ sequences), CJK, Hangul, combining marks, other scripts and symbols. It
// leaves out U+FEFF, U+0085 and U+001C..U+001F (JavaScript and Python GPT-2 disagree on those, see
// docs/TOKENIZERS.md), "<|endoftext|>", and characters newer than Unicode 14 (PCRE2's tables).
inline std::vector<std::string> varied_corpus() {
  std::vector<std::string> docs = {
      "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
      "darkness was upon the face of the deep.",
      "It's what they'll say: we're here, you've seen it, I'm sure he'd agree. Don't SHOUT; it'S fine, "
      "isn't it? 'tis the season ' s  ' t 'll've",
      "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n        return self.proj(x) * 0.5  # halve\n\n"
      "int main(int argc, char** argv) {\n\tfor (int i = 0; i < 10; ++i) printf(\"%d\\n\", i);\n}\n",
      "Numbers: 0 1 12 123 1234 12345 3.14159 -42 +7 1,000,000 2024-06-01 0x1F 1e-9 ¼ ½ ² ³ Ⅻ ٣ ४ 𝟙 ①",
      "whitespace:  two   three    four\t\ttabs\n\n\nnewlines \r\n crlf   \n  trailing   ",
      "   leading spaces and a final run      ",
      "\u00a0nbsp\u00a0\u00a0twice\u3000ideographic\u3000\u3000space\u2028line\u2029para\u2003em\u200athin",
      "emoji: 😀😃 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ 🔥🔥🔥 ok👌done",
      "日本語の文章です。東京は日本の首都であり、人口は約1400万人です。カタカナとひらがなも混ざる。",
      "中文句子：我爱自然语言处理！韩国어 한국어 문장입니다.",
      "combining: e\u0301 a\u0300 n\u0303 o\u0308\u0304 Z\u0335\u0321a\u0336l\u0334g\u0337o\u0338 and "
      "précomposé é, Å, ﬁ ligature",
      "Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी, ไทย, ქართული",
      "symbols: ©®™ §¶ †‡ •… ‰ ′″ ←→↑↓ ∀∃∈∉ ≤≥≠ ∑∏√∞ €£¥₹ ♠♣♥♦ ★☆ ✓✗ 「」『』【】",
      "punctuation runs!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) ''' \"\"\" ;;; ::: ,,, ~~~",
      "mixed123abc 456def,789 a1b2c3 x_y-z.w/v\\u |pipes| <angle> [square] {curly}",
      "a", " ", "\n", "  \n  ", "'", "''s", "😀", "é",
  };
  // Random mixtures of fragments from the pools above, so the pre-tokeniser meets many transitions.
  const std::vector<std::string> pool = {
      "the", "The", " quick", "brown", "fox", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x",
      " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u2009",
      "0", "7", "42", "2024", "3.5", "1,000", "²", "Ⅻ", "٣",
      ".", ",", "!", "?", "...", "-", "_", "(", ")", "\"", "#", "$", "%", "&", "*", "+", "/", ":", ";", "<", "=",
      ">", "@", "[", "\\", "]", "^", "`", "{", "|", "}", "~", "→", "€", "©",
      "é", "e\u0301", "\u0301", "ß", "Ω", "ж", "ש", "ع", "क", "ि",
      "日本", "語", "の", "です", "カタカナ", "中文", "한국어", "😀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "🔥",
  };
  Rng rng(20240601);
  for (int d = 0; d < 300; ++d) {
    std::string doc;
    const int pieces = 1 + int(rng.below(40));
    for (int p = 0; p < pieces; ++p) doc += pool[rng.below(pool.size())];
    docs.push_back(doc);
  }
  return docs;
}

// ~40 KB of sentences, one per line: English words and made-up words of two or three syllables, with
// some Japanese, so that a 400-piece model has enough distinct substrings to learn.
inline std::string training_text() {
  const std::vector<std::string> words = {"the", "model", "reads", "a", "long", "text", "and", "learns", "its",
                                          "words", "quickly", "tokens", "are", "pieces", "of", "language", "we",
                                          "train", "small", "models", "日本語", "の", "文章", "です", "東京"};
  const std::vector<std::string> syllables = {"ka", "ri", "mon", "tel", "sa", "vo", "dur", "pel", "qui", "ness",
                                              "tion", "ing", "ex", "pro", "lu", "ba", "zo", "gre", "fan", "wit"};
  Rng rng(4);
  std::string text;
  for (int line = 0; line < 800; ++line) {
    const int n = 3 + int(rng.below(10));
    for (int w = 0; w < n; ++w) {
      if (w) text += " ";
      if (rng.below(2)) {
        text += words[rng.below(words.size())];
      } else {
        for (int s = 0, k = 2 + int(rng.below(2)); s < k; ++s) text += syllables[rng.below(syllables.size())];
      }
    }
    text += rng.below(3) ? ".\n" : "!\n";
  }
  return text;
}

// Models trained once for the whole run (training takes a fraction of a second each).
inline const std::string& trained_spm_model(const std::string& type) {
  static ScratchDir dir("spm_models");
  static std::map<std::string, std::string> models;
  if (!models.count(type)) {
    if (!std::filesystem::exists(dir.str("corpus.txt"))) dir.write("corpus.txt", training_text());
    SpmTrainOptions o;
    o.inputs = {dir.str("corpus.txt")};
    o.vocab_size = 400;
    o.model_type = type;
    o.out_dir = dir.str(type);
    models[type] = train_sentencepiece(o);
  }
  return models[type];
}

}  // namespace muse::test
