// SHA-256 (FIPS 180-4), self-contained: fingerprints of token tables and checksums of artifacts.
//
//     ctalign::Sha256 h;
//     h.update(data, n);          // any number of calls, any sizes
//     std::string hex = h.hex();  // 64 lowercase hex digits; finishes the hash
//
// Cost: one pass, about 200-400 MB/s on one core (no SHA extensions used). Not constant time; not
// meant for secrets, only for identifying data.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace ctalign {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t n);
  // Appends `value` as 8 little-endian bytes (the fingerprint's length fields).
  void update_u64_le(std::uint64_t value);
  // Finishes the hash. The object must not be updated afterwards.
  std::array<std::uint8_t, 32> digest();
  std::string hex();

 private:
  void compress(const std::uint8_t* block);
  std::array<std::uint32_t, 8> state_;
  std::array<std::uint8_t, 64> buffer_;
  std::size_t buffered_ = 0;
  std::uint64_t total_bytes_ = 0;
  bool finished_ = false;
};

// Hex sha256 of one buffer.
std::string sha256_hex(const void* data, std::size_t n);

}  // namespace ctalign
