// Checks that hold for every recurrent decoder (the CPU one, infer/decoder.h, and the GPU one,
// infer/cuda_decoder.h), shared by their tests.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/rng.h"
#include "model/model.h"

namespace muse::test {

// Initialised, then moved off the special init values (zero gate weights, zero biases), so every path
// of the block — hopping, key gate, rank mask, hybrid gate — carries a generic signal.
template <typename T>
Model<T> make_model(const ModelConfig& c, uint64_t seed) {
  Model<T> m(c);
  m.init(seed);
  Rng rng(seed + 1);
  for (auto& p : m.params()) p += T(0.05 * rng.normal());
  if (c.embedding == EmbeddingKind::dense) {  // padded vocabulary rows stay zero, as in a trained model
    const ParamInfo& e = m.table().find("embed.weight");
    std::fill(m.params().begin() + e.offset + size_t(c.vocab_size) * c.d_model, m.params().begin() + e.offset + e.size,
              T(0));
  }
  return m;
}

// A model with learned positions and max_seq = 8: a prompt past the table and a step past it are refused
// with a message naming max_seq, and the refused step changes nothing.
template <class AnyDecoder>
void expect_decoding_stops_at_max_seq_8(AnyDecoder& decoder) {
  std::vector<int32_t> ids(9, 3);
  try {
    decoder.prefill(0, ids.data(), 9);
    FAIL() << "a 9-token prompt was accepted with max_seq = 8";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("max_seq = 8"), std::string::npos) << e.what();
  }
  decoder.prefill(0, ids.data(), 7);
  decoder.step(0, 1);  // position 7: the last one
  try {
    decoder.step(0, 1);
    FAIL() << "decoding past max_seq was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("max_seq = 8"), std::string::npos) << e.what();
  }
  EXPECT_EQ(decoder.position(0), 8);  // the refused step changed nothing
}

// A decoder of 2 streams for a model of `vocab` tokens refuses a token outside the vocabulary, a stream that
// does not exist, a stream given twice in one step, an empty prompt and a state of the wrong shape.
template <class AnyDecoder, class State>
void expect_bad_input_refused(AnyDecoder& decoder, int vocab, const State& wrong_state) {
  const int32_t bad = vocab;
  EXPECT_THROW(decoder.prefill(0, &bad, 1), std::invalid_argument);
  EXPECT_THROW(decoder.step(0, -1), std::invalid_argument);
  EXPECT_THROW(decoder.step(2, 1), std::out_of_range);
  const int twice[2] = {1, 1};
  const int32_t tokens[2] = {1, 2};
  EXPECT_THROW(decoder.step(twice, tokens, 2), std::invalid_argument);
  EXPECT_THROW(decoder.prefill(0, tokens, 0), std::invalid_argument);
  EXPECT_THROW(decoder.restore(0, wrong_state), std::invalid_argument);
}

}  // namespace muse::test
