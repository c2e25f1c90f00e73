#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "model/config.h"

namespace muse::test {

TEST(config_presets, all_validate_and_round_trip_through_json) {
  for (const Preset& p : presets()) {
    SCOPED_TRACE(p.name);
    EXPECT_NO_THROW(validate(p.model));
    const ModelConfig back = model_config_from_json(to_json(p.model));
    EXPECT_EQ(to_json(back), to_json(p.model));
  }
}

TEST(config_presets, match_spec_table) {
  const ModelConfig& s8 = find_preset("phase8-small").model;
  EXPECT_EQ(s8.d_model, 512);
  EXPECT_EQ(s8.n_layers, 8);
  EXPECT_EQ(s8.attn_mode, AttnMode::sliding);
  EXPECT_EQ(s8.pos_embedding, PosEmbedding::alibi);
  EXPECT_EQ(s8.padded_vocab(), 50304);
  const ModelConfig& m7 = find_preset("phase7-medium").model;
  EXPECT_EQ(m7.arch, Arch::phase7);
  EXPECT_EQ(m7.attn_mode, AttnMode::block);
  EXPECT_EQ(m7.ffn, FfnKind::none);
  EXPECT_EQ(find_preset("demo").model.embedding, EmbeddingKind::dense);
  EXPECT_THROW(find_preset("phase9"), std::invalid_argument);
}

TEST(config_overrides, set_typed_values_and_name_bad_fields) {
  ModelConfig c = find_preset("tiny").model;
  apply_override(c, "window=32");
  apply_override(c, "rank_mask=false");
  apply_override(c, "attn_mode=block");
  apply_override(c, "j_max=0.5");
  EXPECT_EQ(c.window, 32);
  EXPECT_FALSE(c.rank_mask);
  EXPECT_EQ(c.attn_mode, AttnMode::block);
  EXPECT_DOUBLE_EQ(c.j_max, 0.5);
  auto message = [&](const std::string& assignment) {
    try {
      apply_override(c, assignment);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message("windw=3").find("unknown field 'windw'"), std::string::npos);
  EXPECT_NE(message("window=abc").find("window: expected an integer"), std::string::npos);
  EXPECT_NE(message("attn_mode=diagonal").find("attn_mode: 'diagonal' is not one of block, sliding"),
            std::string::npos);
  EXPECT_NE(message("window").find("expected key=value"), std::string::npos);
}

TEST(config_validate, names_the_bad_field) {
  auto message = [](ModelConfig c) {
    try {
      validate(c);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("valid");
  };
  ModelConfig c = find_preset("tiny").model;
  EXPECT_EQ(message(c), "valid");
  ModelConfig bad = c;
  bad.n_heads = 3;
  EXPECT_NE(message(bad).find("n_heads"), std::string::npos);
  bad = c;
  bad.window = 0;
  EXPECT_NE(message(bad).find("window"), std::string::npos);
  bad = c;
  bad.arch = Arch::gpt;
  EXPECT_NE(message(bad).find("ffn"), std::string::npos);
  bad = c;
  bad.ssm_rank = 3;
  EXPECT_NE(message(bad).find("ssm_rank"), std::string::npos);
}

TEST(config_json, refuses_unknown_keys_and_wrong_types) {
  EXPECT_THROW(model_config_from_json(nlohmann::json{{"d_modle", 64}}), std::invalid_argument);
  EXPECT_THROW(model_config_from_json(nlohmann::json{{"d_model", "64"}}), std::invalid_argument);
  EXPECT_THROW(model_config_from_json(nlohmann::json::array()), std::invalid_argument);
}

}  // namespace muse::test
