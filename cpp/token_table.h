// TokenTable: the compiled id -> bytes table of one vocabulary (docs/ARCHITECTURE.md, "TokenTable").
//
// Layout (CSR, owned, immutable after construction):
//   offsets   : int64[V+1]        offsets[0] = 0, non-decreasing, offsets[V] = data.size()
//   data      : uint8[offsets[V]] bytes of id i are data[offsets[i] : offsets[i+1]]
//   has_bytes : uint8[V]          1 = a token of the byte space (at least one byte),
//                                 0 = special/control token (must have zero bytes)
// Several ids may carry the same bytes (SentencePiece `▁` and `<0x20>`): all are kept.
//
// Fingerprint: hex sha256 over V (8 bytes LE), then per id in order: has_bytes (1 byte),
// length (8 bytes LE), the bytes. Computed once at construction.
//
// Exact lookup: an open-addressing hash index over the distinct byte strings (BytesIndex below);
// `lookup(b)` returns every id whose bytes equal b, in increasing id order.
//
// Costs (V ids, B = total bytes): construction O(V + B) time and memory (validation, fingerprint,
// hash index: ~12 bytes per id on top of the CSR); token_bytes O(1); lookup O(|b|) expected.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ctalign {

// Open-addressing hash set over byte strings identified by an int32 key. The strings are not copied:
// `bytes_of(key)` must stay valid for the index's lifetime. Keys with equal bytes are inserted once
// (the caller chooses the representative). Load factor <= 1/2; linear probing.
class BytesIndex {
 public:
  static std::uint64_t hash(std::string_view s);
  // Slots for `capacity_hint` keys.
  explicit BytesIndex(std::size_t capacity_hint = 0);
  // Inserts key with bytes s unless a key with equal bytes exists; returns the key now stored.
  template <class BytesOf>
  std::int32_t insert(std::int32_t key, std::string_view s, const BytesOf& bytes_of);
  // The key whose bytes equal s, or -1.
  template <class BytesOf>
  std::int32_t find(std::string_view s, const BytesOf& bytes_of) const;

 private:
  std::vector<std::int32_t> slots_;  // -1 = empty
  std::vector<std::uint32_t> tags_;  // upper hash bits of the key in the slot (cheap reject)
  std::size_t mask_ = 0;
};

// Python-style repr of a byte string for error messages: b'ab\\x00', truncated after 64 bytes.
std::string bytes_repr(std::string_view bytes);

class TokenTable {
 public:
  // Validates and takes ownership. Throws InputError naming the inconsistent argument.
  TokenTable(std::vector<std::int64_t> offsets, std::vector<std::uint8_t> data,
             std::vector<std::uint8_t> has_bytes);

  std::int32_t size() const { return static_cast<std::int32_t>(has_bytes_.size()); }
  bool has_bytes(std::int32_t id) const { return has_bytes_[id] != 0; }
  // Bytes of `id` (empty for specials). No range check: see `check_id`.
  std::string_view token_bytes(std::int32_t id) const {
    return {reinterpret_cast<const char*>(data_.data()) + offsets_[id],
            static_cast<std::size_t>(offsets_[id + 1] - offsets_[id])};
  }
  std::int64_t token_length(std::int32_t id) const { return offsets_[id + 1] - offsets_[id]; }
  // Throws InputError("<what>: id X out of range [0, V)") unless 0 <= id < V.
  void check_id(std::int64_t id, const char* what) const;

  // Ids whose bytes equal `bytes`, increasing. Empty for b"" (specials are not in the index).
  std::vector<std::int32_t> lookup(std::string_view bytes) const;
  // Smallest id whose bytes equal `bytes`, or -1.
  std::int32_t lookup_first(std::string_view bytes) const;
  // Next id with the same bytes as `id` (increasing), or -1.
  std::int32_t next_same_bytes(std::int32_t id) const { return next_same_[id]; }

  const std::string& fingerprint() const { return fingerprint_; }
  const std::vector<std::int64_t>& offsets() const { return offsets_; }
  const std::vector<std::uint8_t>& data() const { return data_; }
  const std::vector<std::uint8_t>& has_bytes_flags() const { return has_bytes_; }
  std::int64_t max_token_length() const { return max_length_; }

 private:
  std::vector<std::int64_t> offsets_;
  std::vector<std::uint8_t> data_;
  std::vector<std::uint8_t> has_bytes_;
  std::vector<std::int32_t> next_same_;  // chains ids with equal bytes, increasing
  BytesIndex index_;                     // key = smallest id of each distinct byte string
  std::string fingerprint_;
  std::int64_t max_length_ = 0;
};

// ---- BytesIndex template members --------------------------------------------------------------
template <class BytesOf>
std::int32_t BytesIndex::insert(std::int32_t key, std::string_view s, const BytesOf& bytes_of) {
  std::uint64_t h = hash(s);
  std::uint32_t tag = static_cast<std::uint32_t>(h >> 32);
  for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
    std::int32_t k = slots_[i];
    if (k < 0) {
      slots_[i] = key;
      tags_[i] = tag;
      return key;
    }
    if (tags_[i] == tag && bytes_of(k) == s) return k;
  }
}

template <class BytesOf>
std::int32_t BytesIndex::find(std::string_view s, const BytesOf& bytes_of) const {
  if (slots_.empty()) return -1;
  std::uint64_t h = hash(s);
  std::uint32_t tag = static_cast<std::uint32_t>(h >> 32);
  for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
    std::int32_t k = slots_[i];
    if (k < 0) return -1;
    if (tags_[i] == tag && bytes_of(k) == s) return k;
  }
}

}  // namespace ctalign
