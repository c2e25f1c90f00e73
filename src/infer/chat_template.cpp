#include "infer/chat_template.h"

#include <nlohmann/json.hpp>
#include <stdexcept>

namespace muse {

namespace {

constexpr const char* kSlot = "{message}";
constexpr size_t kSlotLength = 9;

void check_slot(const std::string& key, const std::string& text) {
  const size_t first = text.find(kSlot);
  if (first == std::string::npos || text.find(kSlot, first + 1) != std::string::npos)
    throw std::invalid_argument("chat_template: \"" + key + "\" must contain {message} exactly once, got \"" + text +
                                "\"");
}

}  // namespace

std::string ChatTemplate::user_turn(const std::string& message) const {
  std::string text = user;
  return text.replace(text.find(kSlot), kSlotLength, message);
}

std::string ChatTemplate::assistant_prefix() const { return assistant.substr(0, assistant.find(kSlot)); }

std::string ChatTemplate::assistant_suffix() const { return assistant.substr(assistant.find(kSlot) + kSlotLength); }

ChatTemplate default_chat_template() { return {"", "User: {message}\n", "Assistant: {message}\n"}; }

nlohmann::json to_json(const ChatTemplate& t) {
  return {{"system", t.system}, {"user", t.user}, {"assistant", t.assistant}};
}

ChatTemplate chat_template_from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw std::invalid_argument("chat_template: expected an object, got " + j.dump());
  ChatTemplate t = default_chat_template();
  t.system.clear();
  bool has_user = false, has_assistant = false;
  for (const auto& [key, value] : j.items()) {
    if (!value.is_string())
      throw std::invalid_argument("chat_template: \"" + key + "\" must be a string, got " + value.dump());
    if (key == "system") {
      t.system = value.get<std::string>();
    } else if (key == "user") {
      t.user = value.get<std::string>();
      has_user = true;
    } else if (key == "assistant") {
      t.assistant = value.get<std::string>();
      has_assistant = true;
    } else {
      throw std::invalid_argument("chat_template: unknown key \"" + key + "\" (expected system, user, assistant)");
    }
  }
  if (!has_user) throw std::invalid_argument("chat_template: \"user\" is missing");
  if (!has_assistant) throw std::invalid_argument("chat_template: \"assistant\" is missing");
  check_slot("user", t.user);
  check_slot("assistant", t.assistant);
  return t;
}

}  // namespace muse
