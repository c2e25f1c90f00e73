#include "model/params.h"

#include <stdexcept>

namespace muse {

std::string param_module(const std::string& name) {
  if (name.rfind("blocks.", 0) == 0) {
    const size_t a = name.find('.', 7), b = name.find('.', a + 1);
    return name.substr(a + 1, b - a - 1);
  }
  return name.substr(0, name.find('.'));
}

size_t ParamTable::add(const std::string& name, std::vector<int64_t> shape, bool decay) {
  size_t size = 1;
  for (int64_t d : shape) size *= size_t(d);
  const size_t offset = (total_ + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
  entries_.push_back({name, std::move(shape), offset, size, decay});
  total_ = offset + size;
  count_ += size;
  return offset;
}

const ParamInfo& ParamTable::find(const std::string& name) const {
  for (const ParamInfo& p : entries_)
    if (p.name == name) return p;
  throw std::out_of_range("no parameter named '" + name + "'");
}

}  // namespace muse
