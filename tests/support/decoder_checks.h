// Checks that hold for every recurrent decoder (the CPU one, infer/decoder.h, and the GPU one,
// infer/cuda_decoder.h), shared by their tests.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace muse::test {

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

}  // namespace muse::test
