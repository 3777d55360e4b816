// Alignment of two tokenizations (teacher, student) of the same texts, in UTF-8 byte offsets.
//
// Every tokenization is a padded batch: B rows of at most L tokens, row-major [B, L] arrays, with
// the number of real tokens of each row in `length[B]` (tokens past it are padding and ignored).
// A token covers the text bytes [start, end). Special tokens (role > 0) carry no bytes: start == end
// is their position in the text. A SentencePiece token may start with a dummy-prefix space that the
// text does not have: `lead` = 1 then (its bytes are text[start - lead + 1 ...] shifted by that space).
//
// Outputs (see TokenAlignment):
//  - common boundaries: byte offsets that are token edges on one side and inside no token on either
//    side; a chunk is the span between two consecutive common boundaries holding at least one token.
//    Special tokens at the same offset with the same role on both sides (matched in order) form their
//    own zero-width chunks; an unmatched special has chunk -1.
//  - for every student token j: the teacher token k whose bytes contain the token's first text byte,
//    the teacher row k - 1 whose next-token distribution predicts it (-1 when k = 0), the teacher
//    byte-trie node of the bytes of k before it (0 = root: j starts at a teacher boundary), and the
//    dec-trie node of the student pieces consumed inside k before it (0 also when no student token
//    covers a byte of k before j; -1 when those pieces are not a prefix of any dec_S sequence, which
//    cannot happen in the subset regime).
//  - optionally, for the first K bytes of every student token: the teacher row and byte-trie node
//    whose conditional predicts that byte (BLD targets).
//
// Cost: O(B (Lt + Ls) + trie walks), each walk bounded by one token's length; rows are split over
// `threads` std::threads. No allocation inside the loops beyond the output vectors.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ctalign {

// Role codes of tokens (role arrays use them).
enum TokenRole : int32_t { kRoleBytes = 0, kRoleBos = 1, kRoleEos = 2, kRolePad = 3, kRoleUnk = 4, kRoleOther = 5 };

// One tokenization of B texts, padded to `width` tokens per row. Pointers are borrowed.
struct TokenSpans {
  int64_t batch = 0;
  int64_t width = 0;
  const int64_t* length = nullptr;  // [B]
  const int32_t* ids = nullptr;     // [B*L] token ids
  const int64_t* start = nullptr;   // [B*L]
  const int64_t* end = nullptr;     // [B*L]
  const int32_t* lead = nullptr;    // [B*L] or nullptr (all 0)
  const int32_t* role = nullptr;    // [B*L] TokenRole
};

// The node arrays of a SequenceTrie (layouts in docs/ARCHITECTURE.md). Pointers are borrowed.
struct TrieArrays {
  int64_t n_nodes = 0;
  int64_t n_members = 0;
  const int32_t* member_node = nullptr;  // [n_members], -1 for non-members
  const int32_t* node_parent = nullptr;  // [n_nodes]
  const int32_t* node_depth = nullptr;   // [n_nodes]
  const int32_t* node_symbol = nullptr;  // [n_nodes]
  const int32_t* child_start = nullptr;  // [n_nodes + 1]
  const int32_t* child_node = nullptr;   // [child_start[n_nodes]]
};

struct TokenAlignment {
  int64_t batch = 0, t_width = 0, s_width = 0, chunk_width = 0, byte_queries = 0;
  // Chunks, [B] and [B, chunk_width] (padding: start = end = -1, counts 0).
  std::vector<int64_t> n_chunks, chunk_start, chunk_end;
  std::vector<int32_t> chunk_special, chunk_t_count, chunk_s_count;
  // Per token chunk ids, [B, Lt] and [B, Ls]; -1 for padding and unmatched specials.
  std::vector<int64_t> t_chunk, s_chunk;
  // Per student token, [B, Ls].
  std::vector<int64_t> s_teacher_token, s_teacher_row;
  std::vector<int32_t> s_prefix, s_consumed, s_consumed_after;
  std::vector<uint8_t> s_at_boundary, s_ends_teacher;
  // Per student token and byte index i < K, [B, Ls, K]: -1 where there is no such byte / no target.
  std::vector<int64_t> byte_row;
  std::vector<int32_t> byte_prefix;
};

// Aligns teacher and student tokenizations of the same B texts. `byte_trie` is the teacher's byte
// trie (members = teacher ids); `dec_trie` (may be nullptr) is the map's dec trie (members = teacher
// ids, symbols = student ids). Throws InputError on inconsistent input (batch sizes, overlapping or
// unordered spans, ids out of range, texts of different lengths on the two sides).
TokenAlignment align_tokens(const TokenSpans& teacher, const TokenSpans& student, const TrieArrays& byte_trie,
                            const TrieArrays* dec_trie, int byte_queries, int threads);

// Where each token's bytes lie in its text: fills start/end/lead [B*L]. `texts` is the concatenated
// UTF-8 of the B texts with `text_offsets[B+1]`; the token table is the CSR id -> bytes of the vocab
// (`tok_offsets[V+1]`, `tok_data`), `role_of_id[V]` the role of each id. A token must match the text
// at the cursor; `lead_space` lets a token whose bytes start with a space match without it (dummy
// prefix), `skip_space` lets whitespace in the text be skipped before a token (WordPiece), an `unk`
// token covers the text up to where the next token matches. Throws InputError naming the row, the
// token and the byte offset where the ids and the text disagree, or when text is left uncovered.
void locate_tokens(const int32_t* ids, int64_t batch, int64_t width, const int64_t* length, const int64_t* tok_offsets,
                   const uint8_t* tok_data, const int32_t* role_of_id, int64_t vocab_size, const uint8_t* texts,
                   const int64_t* text_offsets, bool lead_space, bool skip_space, int64_t* start, int64_t* end,
                   int32_t* lead);

}  // namespace ctalign
