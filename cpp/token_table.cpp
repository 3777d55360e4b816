#include "token_table.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "errors.h"
#include "sha256.h"

namespace ctalign {

// 64-bit hash of a short byte string: 8 bytes at a time, multiply-xorshift mixing. Deterministic
// (no seed): the index is rebuilt from data, never stored.
std::uint64_t BytesIndex::hash(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  std::size_t n = s.size();
  std::uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
  while (n >= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    p += 8;
    n -= 8;
  }
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t(p[i]) << (8 * i);
  h = (h ^ v) * 0x94d049bb133111ebull;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 32;
  return h;
}

BytesIndex::BytesIndex(std::size_t capacity_hint) {
  std::size_t n = 16;
  while (n < 2 * capacity_hint) n *= 2;
  slots_.assign(n, -1);
  tags_.assign(n, 0);
  mask_ = n - 1;
}

std::string bytes_repr(std::string_view bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string out = "b'";
  std::size_t n = std::min<std::size_t>(bytes.size(), 64);
  for (std::size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(bytes[i]);
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 15];
    }
  }
  out += '\'';
  if (bytes.size() > n) out += "...(" + std::to_string(bytes.size()) + " bytes)";
  return out;
}

void TokenTable::check_id(std::int64_t id, const char* what) const {
  if (id < 0 || id >= size()) {
    throw InputError(std::string(what) + ": id " + std::to_string(id) + " out of range [0, " +
                     std::to_string(size()) + ")");
  }
}

TokenTable::TokenTable(std::vector<std::int64_t> offsets, std::vector<std::uint8_t> data,
                       std::vector<std::uint8_t> has_bytes)
    : offsets_(std::move(offsets)), data_(std::move(data)), has_bytes_(std::move(has_bytes)) {
  const std::size_t V = has_bytes_.size();
  if (V > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max() - 1)) {
    throw InputError("TokenTable: has_bytes has " + std::to_string(V) + " ids, more than int32 allows");
  }
  if (offsets_.size() != V + 1) {
    throw InputError("TokenTable: offsets has " + std::to_string(offsets_.size()) +
                     " entries, expected len(has_bytes) + 1 = " + std::to_string(V + 1));
  }
  if (offsets_[0] != 0) throw InputError("TokenTable: offsets[0] must be 0, got " + std::to_string(offsets_[0]));
  for (std::size_t i = 0; i < V; ++i) {
    std::int64_t len = offsets_[i + 1] - offsets_[i];
    if (len < 0) {
      throw InputError("TokenTable: offsets decrease at id " + std::to_string(i) + " (" +
                       std::to_string(offsets_[i]) + " > " + std::to_string(offsets_[i + 1]) + ")");
    }
    if (has_bytes_[i] > 1) {
      throw InputError("TokenTable: has_bytes[" + std::to_string(i) + "] = " +
                       std::to_string(has_bytes_[i]) + ", expected 0 or 1");
    }
    if (has_bytes_[i] && len == 0) {
      throw InputError("TokenTable: id " + std::to_string(i) + " has has_bytes = 1 but no bytes");
    }
    if (!has_bytes_[i] && len != 0) {
      throw InputError("TokenTable: id " + std::to_string(i) + " has has_bytes = 0 (special) but " +
                       std::to_string(len) + " bytes");
    }
    if (len > max_length_) max_length_ = len;
  }
  if (static_cast<std::uint64_t>(offsets_[V]) != data_.size()) {
    throw InputError("TokenTable: offsets[V] = " + std::to_string(offsets_[V]) +
                     " but data has " + std::to_string(data_.size()) + " bytes");
  }

  Sha256 h;
  h.update_u64_le(V);
  for (std::size_t i = 0; i < V; ++i) {
    h.update(&has_bytes_[i], 1);
    h.update_u64_le(static_cast<std::uint64_t>(offsets_[i + 1] - offsets_[i]));
    h.update(data_.data() + offsets_[i], static_cast<std::size_t>(offsets_[i + 1] - offsets_[i]));
  }
  fingerprint_ = h.hex();

  // Hash index keyed by the smallest id of each distinct byte string; later duplicates are chained.
  index_ = BytesIndex(V);
  next_same_.assign(V, -1);
  std::vector<std::int32_t> last_same(V, -1);  // for a representative: last id of its chain
  auto bytes_of = [this](std::int32_t k) { return token_bytes(k); };
  for (std::int32_t i = 0; i < static_cast<std::int32_t>(V); ++i) {
    if (!has_bytes_[i]) continue;
    std::int32_t rep = index_.insert(i, token_bytes(i), bytes_of);
    if (rep != i) {
      next_same_[last_same[rep]] = i;
      last_same[rep] = i;
    } else {
      last_same[i] = i;
    }
  }
}

std::int32_t TokenTable::lookup_first(std::string_view bytes) const {
  if (bytes.empty()) return -1;
  return index_.find(bytes, [this](std::int32_t k) { return token_bytes(k); });
}

std::vector<std::int32_t> TokenTable::lookup(std::string_view bytes) const {
  std::vector<std::int32_t> ids;
  for (std::int32_t i = lookup_first(bytes); i >= 0; i = next_same_[i]) ids.push_back(i);
  return ids;
}

}  // namespace ctalign
