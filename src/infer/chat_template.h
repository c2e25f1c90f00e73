// The chat template (SPEC §4): how `muse chat` lays a conversation out as text for the model. It is
// stored in a checkpoint's config.json under "chat_template" (training writes the default), so the model
// is prompted the way its training data was formatted; `muse chat --template FILE` overrides it.
//
//   {"system": "", "user": "User: {message}\n", "assistant": "Assistant: {message}\n"}   (the default)
//
// A conversation is `system`, then for each turn the user template with the message in place of
// {message}, then the assistant template up to {message}; the model writes the reply, which ends where
// the text after {message} in the assistant template appears (the default: at the end of the line).
#pragma once
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace muse {

struct ChatTemplate {
  std::string system;
  std::string user;
  std::string assistant;

  std::string user_turn(const std::string& message) const;
  std::string assistant_prefix() const;  // the text before {message}: opens a reply
  std::string assistant_suffix() const;  // the text after {message}: ends a reply (may be empty)
};

ChatTemplate default_chat_template();

nlohmann::json to_json(const ChatTemplate& t);
// Refuses (std::invalid_argument naming the key) a template that is not an object of strings, has unknown
// keys, or whose user/assistant text does not hold {message} exactly once.
ChatTemplate chat_template_from_json(const nlohmann::json& j);

}  // namespace muse
