// Alignment of two tokenizations of the same texts (see token_alignment.h).
#include "token_alignment.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <tuple>

#include "errors.h"

namespace ctalign {
namespace {

std::string row_token(int64_t b, int64_t j) {
  return "row " + std::to_string(b) + ", token " + std::to_string(j);
}

struct Side {
  const TokenSpans& s;
  int64_t b;
  int64_t n;
  int64_t at(int64_t j) const { return b * s.width + j; }
  int64_t start(int64_t j) const { return s.start[at(j)]; }
  int64_t end(int64_t j) const { return s.end[at(j)]; }
  int32_t lead(int64_t j) const { return s.lead ? s.lead[at(j)] : 0; }
  int32_t role(int64_t j) const { return s.role[at(j)]; }
  int32_t id(int64_t j) const { return s.ids[at(j)]; }
  bool covering(int64_t j) const { return end(j) > start(j); }
  bool zero_width_special(int64_t j) const { return role(j) != kRoleBytes && end(j) == start(j); }
};

// Checks one row of one side and returns the indices of its tokens that cover text bytes.
std::vector<int64_t> covering_tokens(const Side& side, const char* name) {
  std::vector<int64_t> cov;
  int64_t prev_end = 0;
  for (int64_t j = 0; j < side.n; ++j) {
    const int64_t s = side.start(j), e = side.end(j);
    const int32_t r = side.role(j);
    if (r < kRoleBytes || r > kRoleOther)
      throw InputError(std::string(name) + " " + row_token(side.b, j) + ": role code " + std::to_string(r) +
                       " is not one of 0..5");
    if (s < 0 || e < s)
      throw InputError(std::string(name) + " " + row_token(side.b, j) + ": byte span [" + std::to_string(s) + ", " +
                       std::to_string(e) + ") is not a span");
    if (s < prev_end)
      throw InputError(std::string(name) + " " + row_token(side.b, j) + ": byte span starts at " + std::to_string(s) +
                       ", before the previous token ends (" + std::to_string(prev_end) +
                       "): spans must be in text order and must not overlap");
    if (side.lead(j) < 0) throw InputError(std::string(name) + " " + row_token(side.b, j) + ": negative lead");
    if (e > s) {
      cov.push_back(j);
      prev_end = e;
    }
  }
  return cov;
}

// First covering token (index into cov) whose end is > p, or cov.size().
size_t first_ending_after(const Side& side, const std::vector<int64_t>& cov, int64_t p) {
  size_t lo = 0, hi = cov.size();
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (side.end(cov[mid]) > p) hi = mid; else lo = mid + 1;
  }
  return lo;
}

bool interior(const Side& side, const std::vector<int64_t>& cov, int64_t p) {
  size_t k = first_ending_after(side, cov, p);
  return k < cov.size() && side.start(cov[k]) < p;
}

int32_t ancestor_at_depth(const TrieArrays& trie, int32_t node, int64_t depth) {
  if (node < 0) return -1;
  if (trie.node_depth[node] < depth) return -1;
  while (trie.node_depth[node] > depth) node = trie.node_parent[node];
  return node;
}

int32_t child_with_symbol(const TrieArrays& trie, int32_t node, int32_t symbol) {
  if (node < 0) return -1;
  int32_t lo = trie.child_start[node], hi = trie.child_start[node + 1];
  while (lo < hi) {
    int32_t mid = lo + (hi - lo) / 2;
    int32_t sym = trie.node_symbol[trie.child_node[mid]];
    if (sym == symbol) return trie.child_node[mid];
    if (sym < symbol) lo = mid + 1; else hi = mid;
  }
  return -1;
}

struct RowChunks {
  std::vector<int64_t> start, end;
  std::vector<int32_t> special, t_count, s_count;
};

// Where the teacher predicts text byte offset p: covering teacher token and depth inside it.
struct TeacherSpot {
  int64_t token = -1;  // index in the teacher row, -1: none
  int64_t depth = 0;   // bytes of the token before p (lead included)
};

TeacherSpot teacher_spot(const Side& t, const std::vector<int64_t>& tcov, int64_t p) {
  TeacherSpot spot;
  size_t k = first_ending_after(t, tcov, p);
  if (k >= tcov.size()) return spot;
  spot.token = tcov[k];
  const int64_t s = t.start(spot.token);
  spot.depth = s <= p ? p - s + t.lead(spot.token) : 0;  // p in a teacher gap: treated as a boundary
  return spot;
}

int32_t byte_prefix_node(const Side& t, const TrieArrays& trie, int64_t token, int64_t depth) {
  if (depth == 0) return 0;
  const int32_t id = t.id(token);
  if (t.role(token) != kRoleBytes || id < 0 || id >= trie.n_members) return -1;
  return ancestor_at_depth(trie, trie.member_node[id], depth);
}

void align_row(int64_t b, const TokenSpans& teacher, const TokenSpans& student, const TrieArrays& byte_trie,
               const TrieArrays* dec_trie, int K, TokenAlignment& out, RowChunks& chunks) {
  Side t{teacher, b, teacher.length[b]};
  Side s{student, b, student.length[b]};
  std::vector<int64_t> tcov = covering_tokens(t, "teacher");
  std::vector<int64_t> scov = covering_tokens(s, "student");
  for (int64_t j = 0; j < t.n; ++j) {
    const int32_t id = t.id(j);
    if (t.role(j) == kRoleBytes && (id < 0 || id >= byte_trie.n_members))
      throw InputError("teacher " + row_token(b, j) + ": id " + std::to_string(id) +
                       " is outside the teacher byte trie (" + std::to_string(byte_trie.n_members) + " ids)");
  }

  // ---- common boundaries and byte chunks --------------------------------------------------------
  // Each side's edges s0 <= e0 <= s1 <= e1 ... are already sorted (spans ordered, disjoint): merge.
  std::vector<int64_t> t_edges, s_edges, cand;
  t_edges.reserve(2 * tcov.size());
  s_edges.reserve(2 * scov.size());
  for (int64_t j : tcov) { t_edges.push_back(t.start(j)); t_edges.push_back(t.end(j)); }
  for (int64_t j : scov) { s_edges.push_back(s.start(j)); s_edges.push_back(s.end(j)); }
  cand.resize(t_edges.size() + s_edges.size());
  std::merge(t_edges.begin(), t_edges.end(), s_edges.begin(), s_edges.end(), cand.begin());
  cand.erase(std::unique(cand.begin(), cand.end()), cand.end());
  std::vector<int64_t> common;
  common.reserve(cand.size());
  {
    size_t it = 0, is = 0;
    for (int64_t p : cand) {
      while (it < tcov.size() && t.end(tcov[it]) <= p) ++it;
      while (is < scov.size() && s.end(scov[is]) <= p) ++is;
      bool in_t = it < tcov.size() && t.start(tcov[it]) < p;
      bool in_s = is < scov.size() && s.start(scov[is]) < p;
      if (!in_t && !in_s) common.push_back(p);
    }
  }
  // Segment i is [common[i], common[i+1]); count the covering tokens of each side in it.
  const size_t n_seg = common.empty() ? 0 : common.size() - 1;
  std::vector<int32_t> seg_t(n_seg, 0), seg_s(n_seg, 0);
  std::vector<int64_t> t_seg(t.n, -1), s_seg(s.n, -1);
  auto segment_of = [&](int64_t p) -> int64_t {  // segment with common[i] <= p < common[i+1]
    auto u = std::upper_bound(common.begin(), common.end(), p);
    if (u == common.begin() || u == common.end()) return -1;
    return int64_t(u - common.begin()) - 1;
  };
  for (int64_t j : tcov) { int64_t g = segment_of(t.start(j)); t_seg[j] = g; if (g >= 0) ++seg_t[g]; }
  for (int64_t j : scov) { int64_t g = segment_of(s.start(j)); s_seg[j] = g; if (g >= 0) ++seg_s[g]; }

  // ---- matched specials ------------------------------------------------------------------------
  // key: (position, role, occurrence of that (position, role) in the row) -> teacher token index
  std::vector<std::tuple<int64_t, int32_t, int32_t, int64_t>> tspec;
  {
    int64_t last_pos = -1; std::vector<int32_t> occ(kRoleOther + 1, 0);
    for (int64_t j = 0; j < t.n; ++j) {
      if (!t.zero_width_special(j)) continue;
      if (t.start(j) != last_pos) { std::fill(occ.begin(), occ.end(), 0); last_pos = t.start(j); }
      tspec.emplace_back(t.start(j), t.role(j), occ[t.role(j)]++, j);
    }
    std::sort(tspec.begin(), tspec.end());
  }
  std::vector<int64_t> s_match(s.n, -1);  // student special -> teacher special index
  {
    int64_t last_pos = -1; std::vector<int32_t> occ(kRoleOther + 1, 0);
    for (int64_t j = 0; j < s.n; ++j) {
      if (!s.zero_width_special(j)) continue;
      const int64_t p = s.start(j);
      if (p != last_pos) { std::fill(occ.begin(), occ.end(), 0); last_pos = p; }
      auto key = std::make_tuple(p, s.role(j), occ[s.role(j)]++, int64_t(-1));
      auto it = std::upper_bound(tspec.begin(), tspec.end(), key);
      if (it != tspec.end() && std::get<0>(*it) == p && std::get<1>(*it) == s.role(j) &&
          std::get<2>(*it) == std::get<2>(key) && !interior(t, tcov, p) && !interior(s, scov, p))
        s_match[j] = std::get<3>(*it);
    }
  }

  // ---- ordered chunk list: byte segments holding tokens, and matched special pairs -------------
  // sort key (position, kind 0 = special / 1 = bytes, order)
  struct Item { int64_t pos; int kind; int64_t order; int64_t seg; int64_t sj; };
  std::vector<Item> items;
  for (size_t g = 0; g < n_seg; ++g)
    if (seg_t[g] + seg_s[g] > 0) items.push_back({common[g], 1, int64_t(g), int64_t(g), -1});
  for (int64_t j = 0; j < s.n; ++j)
    if (s_match[j] >= 0) items.push_back({s.start(j), 0, j, -1, j});
  std::sort(items.begin(), items.end(), [](const Item& x, const Item& y) {
    return std::tie(x.pos, x.kind, x.order) < std::tie(y.pos, y.kind, y.order);
  });
  std::vector<int64_t> seg_chunk(n_seg, -1);
  int64_t* t_chunk = out.t_chunk.data() + b * teacher.width;
  int64_t* s_chunk = out.s_chunk.data() + b * student.width;
  for (size_t c = 0; c < items.size(); ++c) {
    const Item& it = items[c];
    if (it.kind == 1) {
      seg_chunk[it.seg] = int64_t(c);
      chunks.start.push_back(common[it.seg]);
      chunks.end.push_back(common[it.seg + 1]);
      chunks.special.push_back(0);
      chunks.t_count.push_back(seg_t[it.seg]);
      chunks.s_count.push_back(seg_s[it.seg]);
    } else {
      chunks.start.push_back(it.pos);
      chunks.end.push_back(it.pos);
      chunks.special.push_back(1);
      chunks.t_count.push_back(1);
      chunks.s_count.push_back(1);
      s_chunk[it.sj] = int64_t(c);
      t_chunk[s_match[it.sj]] = int64_t(c);
    }
  }
  // Zero-width byte tokens (a dummy-prefix space alone) join the chunk that holds their position,
  // else the chunk starting there, else the one ending there.
  auto chunk_at = [&](int64_t p) -> int64_t {
    auto u = std::upper_bound(common.begin(), common.end(), p);
    if (u != common.begin()) {
      size_t g = size_t(u - common.begin()) - 1;
      if (g < n_seg && seg_chunk[g] >= 0) return seg_chunk[g];
      if (g > 0 && common[g] == p && seg_chunk[g - 1] >= 0) return seg_chunk[g - 1];
    }
    return -1;
  };
  for (int64_t j = 0; j < t.n; ++j) {
    if (t.covering(j)) t_chunk[j] = t_seg[j] >= 0 ? seg_chunk[t_seg[j]] : -1;
    else if (t.role(j) == kRoleBytes) t_chunk[j] = chunk_at(t.start(j));
  }
  for (int64_t j = 0; j < s.n; ++j) {
    if (s.covering(j)) s_chunk[j] = s_seg[j] >= 0 ? seg_chunk[s_seg[j]] : -1;
    else if (s.role(j) == kRoleBytes) s_chunk[j] = chunk_at(s.start(j));
  }

  // ---- student tokens: predicting teacher row, byte prefix, consumed dec pieces ------------------
  const int64_t o = b * student.width;
  int64_t state_token = -1, state_pos = -1, last_end = -1;
  int32_t state_node = -1;
  for (int64_t j = 0; j < s.n; ++j) {
    if (s.zero_width_special(j)) {
      const int64_t k = s_match[j];
      out.s_teacher_token[o + j] = k;
      out.s_teacher_row[o + j] = k >= 0 ? k - 1 : -1;
      out.s_prefix[o + j] = k >= 0 ? 0 : -1;
      out.s_consumed[o + j] = (k >= 0 && dec_trie) ? 0 : -1;
      out.s_at_boundary[o + j] = k >= 0;
      out.s_ends_teacher[o + j] = k >= 0;
      state_token = -1;
      continue;
    }
    const int64_t p = s.start(j);
    TeacherSpot spot = teacher_spot(t, tcov, p);
    if (spot.token < 0) { state_token = -1; last_end = s.end(j); continue; }
    const int64_t k = spot.token;
    out.s_teacher_token[o + j] = k;
    out.s_teacher_row[o + j] = k - 1;
    out.s_prefix[o + j] = byte_prefix_node(t, byte_trie, k, spot.depth);
    out.s_at_boundary[o + j] = spot.depth == 0;
    int32_t consumed = -1;
    if (dec_trie) {
      if (spot.depth == 0) consumed = 0;
      else if (state_token == k && state_pos == p) consumed = state_node;
      // No student token covers any byte of k before p (WordPiece dropped the whitespace, or a
      // dummy-prefix space): nothing was consumed yet.
      else if (state_token != k && last_end <= t.start(k)) consumed = 0;
    }
    out.s_consumed[o + j] = consumed;
    const int64_t e = s.end(j);
    const int64_t t_end = t.end(k);
    int32_t after = -1;
    if (dec_trie && consumed >= 0 && e <= t_end && s.role(j) == kRoleBytes && t.role(k) == kRoleBytes)
      after = child_with_symbol(*dec_trie, consumed, s.id(j));
    out.s_consumed_after[o + j] = after;
    out.s_ends_teacher[o + j] = (e == t_end && t.start(k) < t_end) ? 1 : 0;
    state_token = k;
    state_pos = e;
    state_node = after;
    last_end = e;
  }

  // ---- byte queries (BLD) -------------------------------------------------------------------------
  if (K > 0) {
    for (int64_t j = 0; j < s.n; ++j) {
      if (s.role(j) != kRoleBytes || !s.covering(j)) continue;
      const int64_t lead = s.lead(j);
      for (int64_t i = lead; i < K; ++i) {
        const int64_t pos = s.start(j) - lead + i;
        if (pos >= s.end(j)) break;
        TeacherSpot spot = teacher_spot(t, tcov, pos);
        if (spot.token <= 0) continue;
        int32_t node = byte_prefix_node(t, byte_trie, spot.token, spot.depth);
        if (node < 0) continue;
        const int64_t q = (o + j) * K + i;
        out.byte_row[q] = spot.token - 1;
        out.byte_prefix[q] = node;
      }
    }
  }
}

void check_spans(const TokenSpans& x, const char* name) {
  if (x.batch < 0 || x.width < 0) throw InputError(std::string(name) + ": negative batch or width");
  if ((x.batch * x.width > 0) && (!x.ids || !x.start || !x.end || !x.role))
    throw InputError(std::string(name) + ": missing arrays");
  for (int64_t b = 0; b < x.batch; ++b)
    if (x.length[b] < 0 || x.length[b] > x.width)
      throw InputError(std::string(name) + " row " + std::to_string(b) + ": length " + std::to_string(x.length[b]) +
                       " is outside [0, " + std::to_string(x.width) + "]");
}

void check_trie(const TrieArrays& trie, const char* name) {
  if (trie.n_nodes < 1) throw InputError(std::string(name) + ": a trie has at least its root node");
  for (int64_t m = 0; m < trie.n_members; ++m)
    if (trie.member_node[m] < -1 || trie.member_node[m] >= trie.n_nodes)
      throw InputError(std::string(name) + ": member_node out of range");
}

template <class F>
void parallel_rows(int64_t n, int threads, F&& fn) {
  threads = std::max(1, std::min<int>(threads, int(n)));
  if (threads == 1) {
    for (int64_t b = 0; b < n; ++b) fn(b);
    return;
  }
  std::exception_ptr error;
  std::mutex mu;
  auto stride = [&](int w) {
    for (int64_t b = w; b < n; b += threads) {
      try {
        fn(b);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  int started = 0;
  try {
    for (; started < threads; ++started) pool.emplace_back(stride, started);
  } catch (const std::system_error&) {
    // No more threads (a process or system limit): this thread runs the strides left over; leaving
    // a started thread unjoined would std::terminate the process.
  }
  for (int w = started; w < threads; ++w) stride(w);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

bool is_space(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

}  // namespace

TokenAlignment align_tokens(const TokenSpans& teacher, const TokenSpans& student, const TrieArrays& byte_trie,
                            const TrieArrays* dec_trie, int byte_queries, int threads) {
  check_spans(teacher, "teacher");
  check_spans(student, "student");
  if (teacher.batch != student.batch)
    throw InputError("teacher and student batches differ: " + std::to_string(teacher.batch) + " vs " +
                     std::to_string(student.batch) + " rows");
  if (byte_queries < 0 || byte_queries > 4096) throw InputError("byte_queries must be in [0, 4096]");
  check_trie(byte_trie, "teacher byte trie");
  if (dec_trie) check_trie(*dec_trie, "dec trie");
  const int64_t B = teacher.batch, Lt = teacher.width, Ls = student.width, K = byte_queries;
  TokenAlignment out;
  out.batch = B; out.t_width = Lt; out.s_width = Ls; out.byte_queries = K;
  out.t_chunk.assign(B * Lt, -1);
  out.s_chunk.assign(B * Ls, -1);
  out.s_teacher_token.assign(B * Ls, -1);
  out.s_teacher_row.assign(B * Ls, -1);
  out.s_prefix.assign(B * Ls, -1);
  out.s_consumed.assign(B * Ls, -1);
  out.s_consumed_after.assign(B * Ls, -1);
  out.s_at_boundary.assign(B * Ls, 0);
  out.s_ends_teacher.assign(B * Ls, 0);
  out.byte_row.assign(B * Ls * K, -1);
  out.byte_prefix.assign(B * Ls * K, -1);
  std::vector<RowChunks> rows(B);
  parallel_rows(B, threads, [&](int64_t b) { align_row(b, teacher, student, byte_trie, dec_trie, int(K), out, rows[b]); });
  int64_t C = 0;
  for (auto& r : rows) C = std::max<int64_t>(C, int64_t(r.start.size()));
  out.chunk_width = C;
  out.n_chunks.assign(B, 0);
  out.chunk_start.assign(B * C, -1);
  out.chunk_end.assign(B * C, -1);
  out.chunk_special.assign(B * C, 0);
  out.chunk_t_count.assign(B * C, 0);
  out.chunk_s_count.assign(B * C, 0);
  for (int64_t b = 0; b < B; ++b) {
    const RowChunks& r = rows[b];
    const int64_t n = int64_t(r.start.size());
    out.n_chunks[b] = n;
    std::copy(r.start.begin(), r.start.end(), out.chunk_start.begin() + b * C);
    std::copy(r.end.begin(), r.end.end(), out.chunk_end.begin() + b * C);
    std::copy(r.special.begin(), r.special.end(), out.chunk_special.begin() + b * C);
    std::copy(r.t_count.begin(), r.t_count.end(), out.chunk_t_count.begin() + b * C);
    std::copy(r.s_count.begin(), r.s_count.end(), out.chunk_s_count.begin() + b * C);
  }
  return out;
}

void locate_tokens(const int32_t* ids, int64_t batch, int64_t width, const int64_t* length, const int64_t* tok_offsets,
                   const uint8_t* tok_data, const int32_t* role_of_id, int64_t vocab_size, const uint8_t* texts,
                   const int64_t* text_offsets, bool lead_space, bool skip_space, int64_t* start, int64_t* end,
                   int32_t* lead) {
  for (int64_t b = 0; b < batch; ++b) {
    if (length[b] < 0 || length[b] > width)
      throw InputError("row " + std::to_string(b) + ": length " + std::to_string(length[b]) + " is outside [0, " +
                       std::to_string(width) + "]");
    if (text_offsets[b + 1] < text_offsets[b]) throw InputError("text offsets must not decrease");
  }
  auto describe = [](const uint8_t* p, int64_t n) {
    std::string s;
    for (int64_t i = 0; i < std::min<int64_t>(n, 24); ++i) {
      uint8_t c = p[i];
      if (c >= 0x20 && c < 0x7f && c != '\\') s += char(c);
      else { char buf[8]; std::snprintf(buf, sizeof buf, "\\x%02x", c); s += buf; }
    }
    if (n > 24) s += "...";
    return s;
  };
  for (int64_t b = 0; b < batch; ++b) {
    const uint8_t* text = texts + text_offsets[b];
    const int64_t n_text = text_offsets[b + 1] - text_offsets[b];
    const int64_t n = length[b];
    const int32_t* row = ids + b * width;
    for (int64_t j = 0; j < n; ++j)
      if (row[j] < 0 || row[j] >= vocab_size)
        throw InputError(row_token(b, j) + ": id " + std::to_string(row[j]) + " is outside the vocabulary (" +
                         std::to_string(vocab_size) + " ids)");
    auto bytes_of = [&](int64_t j, const uint8_t*& p, int64_t& len) {
      p = tok_data + tok_offsets[row[j]];
      len = tok_offsets[row[j] + 1] - tok_offsets[row[j]];
    };
    // Match token j at cursor c: returns false or sets (s, e, ld).
    auto match = [&](int64_t j, int64_t c, int64_t& s, int64_t& e, int32_t& ld) {
      const uint8_t* p; int64_t len;
      bytes_of(j, p, len);
      for (int64_t c2 = c;; ++c2) {
        if (c2 + len <= n_text && std::memcmp(text + c2, p, size_t(len)) == 0) {
          s = c2; e = c2 + len; ld = 0;
          return true;
        }
        if (lead_space && len >= 1 && p[0] == ' ' && c2 + len - 1 <= n_text &&
            std::memcmp(text + c2, p + 1, size_t(len - 1)) == 0) {
          s = c2; e = c2 + len - 1; ld = 1;
          return true;
        }
        if (!(skip_space && c2 < n_text && is_space(text[c2]))) return false;
      }
    };
    int64_t c = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t q = b * width + j;
      const uint8_t* p; int64_t len;
      bytes_of(j, p, len);
      lead[q] = 0;
      if (len == 0) {
        if (role_of_id[row[j]] == kRoleUnk) {
          int64_t next = j + 1;
          while (next < n) { const uint8_t* p2; int64_t l2; bytes_of(next, p2, l2); if (l2 > 0) break; ++next; }
          int64_t stop = -1;
          if (next >= n) {
            stop = n_text;
            if (skip_space) while (stop > c && is_space(text[stop - 1])) --stop;
          } else {
            int64_t s2, e2; int32_t l2;
            // The first character boundary after c where the next token matches its own bytes (a
            // lone dummy-prefix space would match anywhere: it needs a space there).
            for (int64_t x = c + 1; x <= n_text && stop < 0; ++x) {
              if (x < n_text && (text[x] & 0xC0) == 0x80) continue;
              if (match(next, x, s2, e2, l2) && !(l2 == 1 && e2 == s2)) stop = x;
            }
            if (stop < 0)
              throw InputError(row_token(b, j) + ": an unk token, and the next token (id " + std::to_string(row[next]) +
                               ") is not found in the text after byte offset " + std::to_string(c));
          }
          if (skip_space) while (c < stop && is_space(text[c])) ++c;
          start[q] = c; end[q] = stop; c = stop;
        } else {
          start[q] = c; end[q] = c;
        }
        continue;
      }
      int64_t s, e; int32_t ld;
      if (!match(j, c, s, e, ld))
        throw InputError(row_token(b, j) + " (id " + std::to_string(row[j]) + ", bytes '" + describe(p, len) +
                         "') does not match the text at byte offset " + std::to_string(c) + " ('" +
                         describe(text + c, n_text - c) + "'): the text does not tokenize to these ids");
      start[q] = s; end[q] = e; lead[q] = ld; c = e;
    }
    if (skip_space) while (c < n_text && is_space(text[c])) ++c;
    if (c != n_text)
      throw InputError("row " + std::to_string(b) + ": the ids cover " + std::to_string(c) + " of the " +
                       std::to_string(n_text) + " bytes of the text (left: '" + describe(text + c, n_text - c) +
                       "'): the text does not tokenize to these ids");
  }
}

}  // namespace ctalign
