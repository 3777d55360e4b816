// CPU projection kernels: teacher logits rows -> log probability mass of token groups and of ranges
// of a sorted token order, with the softmax fused in (docs/ARCHITECTURE.md, "Kernel contract";
// definitions in shared/notes/design.md). No Python or torch here; ctalign/_cpu_backend.py wraps it.
// Implementation: cpp/kernels/, one file per kernel family (grouped, range, trie, topk, sparse_rows)
// over per-ISA row primitives written once (kernels/row_primitives.h over kernels/simd_traits.h).
//
// Logits: n_rows rows of `vocab_size` used columns (row_stride >= vocab_size elements apart), fp32,
// bf16, fp16 or fp64, softmax of x / temperature. Outputs are log probabilities, -inf for zero mass,
// never NaN for finite input. Output element type `Out` is float for fp32/bf16/fp16 logits and double
// for fp64 logits (the fp64 path computes in double throughout, for gradcheck and high precision).
//
// Non-finite input (NaN or +inf anywhere in a row's used columns, or no finite entry) is reported, not
// thrown: that row's lse and outputs are NaN; -inf entries are zero mass (masked tokens). Callers
// check lse (O(n_rows)) and raise; no second pass is needed.
//
// Numerics (fp32/bf16/fp16): e^(x/T - shift) 2^90 in float (fast_math.h), summed in double; d = x/T -
// shift is formed with one rounding (fused multiply-subtract), so the top tokens (|d| <= 24) keep
// ~1e-7 relative precision whatever the logits' magnitude. Rows with |x/T| >= 2^22 (where a float
// shift would be off by more than the top tokens' spread, #21) split the shift: d = (x - m) / T - lead
// with m a raw logit (kernels/common.h, Shift), so any finite spread stays finite; rows whose x/T
// overflows float are refused like +inf. Tokens below ~e^-140 of a row's top token
// count as zero mass. Group outputs take a float log of the group probability (a double log below
// 2^-120). Range sums come from double prefix sums over the sorted order; a range whose mass is below
// 2^-23 of its prefix is summed directly instead, so small masses keep full relative precision
// (cost: the length of such ranges; ranges of up to 2 positions are summed either way, which costs
// less than the branch that would choose).
//
// Costs, per row of V columns (threads over rows, instruction set chosen at run time):
//   grouped_logmass: one read of the row. SIMD paths take eight rows at once: per 512-column chunk a
//     max pass (L1), then an 8x8 transpose so each token adds its eight rows' e^x to one cache line of
//     a [G][8] double accumulator (G x 64 bytes per thread); the next chunk is prefetched meanwhile,
//     and so, when the table outgrows L2 (G > 4096), are the accumulator lines 64 tokens ahead. The
//     rows' totals are summed in the same loop for such tables, and as the accumulator's column sums
//     after it for tables in cache (G <= 4096: one add less per token); the finish (log of G x 8
//     masses) runs 16 lanes wide on AVX-512.
//     Leftover rows (and the scalar ISA) scatter-add one row at a time. O(V + G).
//   grouped backward: same layout (a [G][8] table of per-group constants), one e^x per element.
//   range_logmass: rows some query reads; a max pass, e^x into a buffer, a scatter into sorted order,
//     8-chain prefix sums (M + 1 doubles), then O(C) per query; rows no query reads cost nothing.
//   range backward: the same plus a compensated running sum of a difference array over the order.
// Memory: per thread O(G) or O(V + M) scratch; outputs are the caller's.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace ctalign::kernels {

enum class ElemType : int { f32 = 0, bf16 = 1, f16 = 2, f64 = 3 };

struct Logits {
  const void* data = nullptr;  // element 0 of row 0
  ElemType type = ElemType::f32;
  std::int64_t n_rows = 0;
  std::int64_t row_stride = 0;  // elements between row starts, >= vocab_size
  std::int64_t vocab_size = 0;  // V: columns [0, V) are tokens, the rest padding (ignored)
  double temperature = 1.0;     // > 0
};

// Range queries: out[q, c] = log sum over i in [lo[q,c], hi[q,c]) of p_{row q}(order[i]).
struct RangeQueries {
  const std::int32_t* order = nullptr;  // [M] token ids in [0, V)
  std::int64_t order_size = 0;          // M
  const std::int64_t* rows = nullptr;   // [Q] rows in [0, n_rows); nullptr: query q reads row q
  std::int64_t n_queries = 0;           // Q (== n_rows when rows is nullptr)
  const std::int32_t* lo = nullptr;     // [Q, C], or [1, C] when shared
  const std::int32_t* hi = nullptr;
  std::int64_t n_cols = 0;              // C
  bool shared = false;                  // one row of ranges used by every query
};

// out[r, g] = log sum_{t < V, group[t] = g} p_r(t) (out: [n_rows, n_groups]); lse[r] = log-normaliser
// of x_r / T over [0, V). group: int32[V] in [0, n_groups).
template <class Out>
void grouped_logmass(const Logits& x, const std::int32_t* group, std::int32_t n_groups, Out* out, Out* lse,
                     int n_threads);

// grad[r, t] = d(sum_g grad_out[r, g] out[r, g]) / d x[r, t] for t < V, 0 for t in [V, grad_width).
// grad: [n_rows, grad_width] contiguous. Groups with out = -inf carry no gradient.
template <class Out>
void grouped_logmass_backward(const Logits& x, const std::int32_t* group, std::int32_t n_groups, const Out* out,
                              const Out* lse, const Out* grad_out, Out* grad, std::int64_t grad_width,
                              int n_threads);

// out: [Q, C]; lse: [n_rows] (rows no query reads get 0: they are not read at all).
template <class Out>
void range_logmass(const Logits& x, const RangeQueries& q, Out* out, Out* lse, int n_threads);

// grad: [n_rows, grad_width] contiguous; rows no query reads get 0. Outputs equal to -inf carry no
// gradient. `lse` is accepted for the contract's symmetry; the kernel recomputes the row's normaliser.
template <class Out>
void range_logmass_backward(const Logits& x, const RangeQueries& q, const Out* out, const Out* lse,
                            const Out* grad_out, Out* grad, std::int64_t grad_width, int n_threads);

// The k largest columns of logits rows with the softmax fused: the sparse rows below, made from dense
// logits (e.g. a teacher's outputs before caching them). Output i reads row rows[i] (rows: [n_out],
// repeats allowed), or row i when rows is nullptr (n_out = n_rows); other rows are not read.
// ids[i, j]: the j-th largest x over [0, V) (ties: the smaller id first, so the result is
// deterministic); out[i, j] = log p(ids[i, j]) = x / T - lse (computed in double); lse[i].
// 1 <= k <= V, rows in range, else InputError. -inf columns are allowed (zero mass; kept at -inf when
// a row has fewer than k finite ones); rows holding NaN or +inf (also after / T), or only -inf: lse
// and outputs NaN, ids 0..k-1.
// Cost per output: one streaming read of its row (per 2048 columns, in L1: a max pass and e^x
// summed), then a second read (from L2 or L3) that visits the 2048-column chunks by decreasing max,
// stopping at the first chunk whose max is below the k-th value so far; the chunks visited get a
// vector scan for the columns ranking above it. Those go to a buffer of max(2k, 128) candidates,
// cut back to k by nth_element when full. The first chunks visited hold the row's largest values,
// so few columns are pushed: about k ln(V / k) for rows in random order, about max(k, 2048) for
// rows sorted either way (a single pass in id order pushed every column of a rising row: 650 ms
// instead of 10 ms for 256 x 152k). O(V + k log k). ids, out: [n_out, k].
template <class Out>
void topk_logprobs(const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t k, std::int64_t* ids,
                   Out* out, Out* lse, int n_threads);
// Its gradient for every logits row: grad[r, c] = sum over outputs i reading r of (grad_out[i, j]
// [c = ids[i, j]] - p_r(c) sum_j grad_out[i, j]) / T for c < V; 0 in [V, grad_width) and in rows no
// output reads. ids and lse as topk_logprobs gave them (ids out of range throw). One e^x per element
// of the rows read. grad: [n_rows, grad_width] contiguous.
template <class Out>
void topk_logprobs_backward(const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t k,
                            const std::int64_t* ids, const Out* lse, const Out* grad_out, Out* grad,
                            std::int64_t grad_width, int n_threads);

// Sparse rows: the k kept (token id, log-probability) entries of each row, used as given (the missing
// tail is not renormalised). A temperature T reshapes the kept entries keeping their total mass:
// lp_T = lp / T - logsumexp(lp / T) + logsumexp(lp). Entries with lp = -inf have no mass; NaN, +inf,
// ids outside [0, vocab_size) and an id listed twice in a row throw InputError naming the row.
// Cost per row: O(k log k) (validation sort) + O(n_groups) output fill. (Dense-output range and
// trie queries on sparse rows run in torch ops, ctalign/ops.py; their sparse outputs are the
// topk_*_sparse kernels below, which take probabilities in double.) Numerics: float outputs use float e^x and log (mass below ~1e-38 counts as 0),
// double outputs (fp64 log-probabilities) use libm in double.
struct TopKRows {
  const std::int64_t* indices = nullptr;  // [n_rows, k]
  const void* logprobs = nullptr;         // [n_rows, k], ElemType
  ElemType type = ElemType::f32;
  std::int64_t n_rows = 0;
  std::int64_t k = 0;
  std::int64_t vocab_size = 0;
  double temperature = 1.0;
};

// out[r, g] = log sum_{j: group[indices[r, j]] = g} p_rj; out: [n_rows, n_groups].
template <class Out>
void topk_grouped_logmass(const TopKRows& x, const std::int32_t* group, std::int32_t n_groups, Out* out, int n_threads);

// The same masses, sparse: ids[r, i] and out[r, i] for i < width = min(k, n_groups). A row's groups
// (those of its k entries, -inf entries included) come first in increasing id order, then the
// smallest ids outside them with out = -inf, so ids stay distinct. O(k log k) per row, no O(n_groups)
// term. ids, out: [n_rows, width].
template <class Out>
void topk_grouped_sparse(const TopKRows& x, const std::int32_t* group, std::int32_t n_groups, std::int64_t* ids,
                         Out* out, int n_threads);


// Range queries for trie nodes, compact: for each node, its children's ranges in symbol order
// (k = the most children any of `nodes` has; missing ones are the empty range [0, 0) with symbol
// `filler`), then [lo, end) (tokens equal to the prefix), [lo, hi) (the node), [end, hi)
// (tokens continuing past it). lo, hi: [q, k + 3]; symbol: [q, k]. Node arrays as in
// sequence_trie.h. Returns k. Cost O(q (k + 3)); nodes out of range throw InputError.
struct TrieNodes {
  const std::int32_t* child_start = nullptr;  // [n_nodes + 1]
  const std::int32_t* child_node = nullptr;   // [n_nodes - 1]
  const std::int32_t* node_lo = nullptr;      // [n_nodes]
  const std::int32_t* node_hi = nullptr;
  const std::int32_t* node_end = nullptr;
  const std::int32_t* node_symbol = nullptr;
  std::int64_t n_nodes = 0;
};
std::int64_t max_children(const TrieNodes& t, const std::int64_t* nodes, std::int64_t q);
void compact_child_ranges(const TrieNodes& t, const std::int64_t* nodes, std::int64_t q, std::int64_t k,
                          std::int64_t filler, std::int32_t* lo, std::int32_t* hi, std::int64_t* symbol);

// Trie-node conditionals from dense rows, without the [Q, children] range tables: query q reads
// row rows[q] and node nodes[q], whose children's ranges tile [end, hi) of `order`; out[q, symbol(c)]
// = log mass(c) - log mass(den) for each child c, out[q, width - 1] = log mass([lo, end)) - log
// mass(den) (the end column, absent with drop_end), -inf elsewhere; den = [lo, hi), or [end, hi)
// with drop_end; a node without mass gives a row of -inf. Masses are direct double sums of the row's
// e^(x/T - max) over the order positions (no prefix differences), so a ratio keeps its relative
// precision however small it is, within float e^x's range (tokens ~140 nats below the row's top
// count as zero, as in the other float kernels).
// Cost: one e^x pass per row some query reads, then O(node range + width) per query. Invalid rows,
// nodes, order ids or child symbols (>= width - 1, or >= width with drop_end) throw InputError.
// out: [Q, width]; lse: [n_rows] (0 for rows no query reads). Backward: grad [n_rows, grad_width]
// (zero for rows no query reads and padding columns); outputs without mass carry no gradient.
struct TrieQueries {
  const std::int32_t* order = nullptr;  // [M] token ids in trie order
  std::int64_t order_size = 0;
  TrieNodes trie;
  const std::int64_t* rows = nullptr;   // [Q]
  const std::int64_t* nodes = nullptr;  // [Q]
  std::int64_t n_queries = 0;
  std::int64_t width = 0;
  bool drop_end = false;
};
template <class Out>
void trie_conditional_logprobs(const Logits& x, const TrieQueries& q, Out* out, Out* lse, int n_threads);
template <class Out>
void trie_conditional_logprobs_backward(const Logits& x, const TrieQueries& q, const Out* grad_out, Out* grad,
                                        std::int64_t grad_width, int n_threads);
// Sparse rows, sparse outputs of the trie and cover ops (ids, out: [Q or n_rows, width], a row's
// reached columns in increasing order, then the smallest unused columns at -inf; the same ids as the
// torch paths in ctalign/ops.py). rank: int32[vocab_size], each token's position in the trie order
// (-1 outside). topk_trie_sparse: the conditionals of `q` (q.order is not read), width =
// min(k, q.width); first_symbol (int32[vocab_size], may be null): each token's first symbol, the
// child of the root (node 0) that holds it, which spares a search among the root's children.
// O(k log k) per query. topk_cover_sparse: an entry at position p reaches students[ptr[p] :
// ptr[p + 1]] (ptr: [order_size + 1]); fills `result` (each row's merged (student, mass) pairs and
// the widest row's width), which write_sparse_rows then writes as [n_rows, width] log masses (as
// given, not renormalised). O(kL log kL) per row for tokens of L prefixes.
template <class Out>
void topk_trie_sparse(const TopKRows& x, const std::int32_t* rank, const std::int32_t* first_symbol,
                      const TrieQueries& q, std::int64_t* ids, Out* out, int n_threads);
struct SparseCover {
  std::vector<std::vector<std::pair<std::int64_t, double>>> rows;
  std::int64_t width = 0;
};
template <class Out>
void topk_cover_sparse(const TopKRows& x, const std::int32_t* rank, std::int64_t order_size, const std::int64_t* ptr,
                       const std::int64_t* students, std::int64_t n_entries, std::int64_t n_students,
                       SparseCover& result, int n_threads);
template <class Out>
void write_sparse_rows(SparseCover& rows, std::int64_t* ids, Out* out);
// Contract 8, ULD's exact distance (kernels/sorted_l1.cpp): for each of n_rows rows, student [vs] and
// teacher [vt] probabilities (finite, >= 0) each sorted in decreasing order, the shorter padded with
// zeros: distance[r] = sum_i |s_(i) - t_(i)| (double), and sign[r, j] = sign(s_j - t_(rank of s_j)), the
// distance's gradient in student entry j. Stable radix sorts: ties rank by column id.
void sorted_l1_distance(const float* student, std::int64_t n_rows, std::int64_t vs, const float* teacher,
                        std::int64_t vt, double* distance, float* sign, int n_threads);
// The same from logits, the softmax at each side's temperature fused: pair q takes student row
// s_rows[q] and teacher row t_rows[q] (their first vocab_size columns); writes distance[q] and
// grad[q, :vs] = p_j (sign_j - sum_i p_i sign_i), the distance's gradient in the student's logits times
// its temperature, or bad[q] = 1 (student) / 2 (teacher) for a row with NaN, +inf or only -inf
// (distance NaN, grad 0).
void sorted_l1_logits(const Logits& student, const std::int64_t* s_rows, const Logits& teacher,
                      const std::int64_t* t_rows, std::int64_t n_pairs, double* distance, float* grad,
                      std::uint8_t* bad, int n_threads);

// Instruction set of the float kernels, picked once from cpuid (the best the CPU runs); tests and
// benchmarks may force a lower one. Throws InputError for one this CPU cannot run.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };
Isa best_isa();
Isa active_isa();
void set_isa(Isa isa);
const char* isa_name(Isa isa);

}  // namespace ctalign::kernels
