// CUDA kernels of the SAE ops.
//
// Routing is selection on order-preserving integer keys of the values, never a sort of the row:
//   * column cutoff (feature choice, m <= kMaxColumnM): one block per 32 features, the same
//     read-once candidate buffers per feature, read from the row-major matrix;
//   * row select (one block a row): TopK's k best entries of each row, or feature choice's cutoff
//     of each feature for larger m (on the transposed pre-activations, positive entries only). The
//     read-once kernel streams the row once into a shared candidate buffer behind a running
//     threshold (radix select inside shared memory when the buffer fills); the multi-pass radix
//     select over the row (8 bits a pass) remains for ranks above kMaxTopK and rows of >= 2^31;
//   * global select (mutual choice): histogram passes over the whole matrix, with the running
//     prefix and rank kept on the device (no host sync between passes), then the tie at the cutoff
//     located by per-row tie counts and one ordered scan of the row that holds it.
// Ties are ranked by index with ordered block scans (ballot + popc), so results are deterministic
// and equal to the CPU kernels'. Kept-entry extraction is one block a row with the same scans.
//
// Reads of the B x F pre-activations per routing, bf16/fp16 (radix passes over the matrix: 2 in
// bf16/fp16, 4 in fp32, 8 in fp64):
//   * TopK: 1 (read-once row select; then k gathered values a row, and the CSR is built from the
//     (B, k) result without touching pre again).
//   * feature choice: 3: the read-once column cutoff straight from the row-major matrix (1), then
//     count + ordered fill of the kept entries (2). m >= B reads nothing for the cutoff. With
//     kMaxColumnM < m the cutoff takes a transposed copy (1 read, 1 write, a B x F temporary) and
//     the read-once row kernel over it (1 read); above kMaxTopK the multi-pass row select (count,
//     radix passes, ordered scan: 4 reads of the copy in bf16).
//   * mutual choice: 5: 2 global histogram passes, 1 tie count (the tie locate scans one row),
//     count + fill (2).
//   * threshold: 2 (count + fill).
// Decode and the backward products: one block a token (gather-accumulate, fp32 accumulation), one
// warp per stored entry for the sampled dot products, one block a feature for the per-feature sums.
#include "sae.h"

#include "../common/backend.h"

#include "../common/checks.h"
#include "../common/cuda/launch.cuh"
#include "../common/cuda/reduce.cuh"
#include "../common/cuda/sort.cuh"
#include "../common/dispatch.h"

#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace fusedtrain {
namespace sae {
namespace {

using cuda::kThreads;
using cuda::kWarps;
using cuda::block_exclusive_count;
using cuda::block_exclusive_sum;
using cuda::block_sum;
using cuda::key_t;
using cuda::key_value;
using cuda::ordered_key;
using cuda::sort_best_first;
constexpr int64_t kMaxTopK = 1024;  // TopK entries sorted in shared memory per row

// ---------------------------------------------------------------------------------------------
// Row select. Mode TopK: all entries eligible, write the k best (value desc, index asc).
// Mode cutoff: positive entries only, write the k-th best as (value, index), (0, -1) when there
// are at most k positive entries.
template <typename scalar_t, bool kTopK>
__global__ void __launch_bounds__(kThreads) row_select_kernel(
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, int64_t k, scalar_t* __restrict__ out_v,
    int64_t* __restrict__ out_i, acc_t<scalar_t>* __restrict__ cut_v, int64_t* __restrict__ cut_i) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  constexpr int kBits = sizeof(Key) * 8;
  __shared__ unsigned int hist[256];
  __shared__ Key s_prefix;
  __shared__ int64_t s_need;
  __shared__ int scan_scratch[kWarps + 1];
  __shared__ int64_t sum_scratch[kWarps];
  __shared__ Key top_key[kTopK ? kMaxTopK : 1];
  __shared__ int64_t top_index[kTopK ? kMaxTopK : 1];

  const int64_t row = blockIdx.x;
  const scalar_t* r = pre + row * stride;
  auto eligible = [](acc v) { return kTopK || v > acc(0); };

  if (!kTopK) {
    int64_t n = 0;
    for (int64_t f = threadIdx.x; f < F; f += kThreads) n += eligible(static_cast<acc>(r[f]));
    const int64_t total = block_sum(n, sum_scratch);
    if (total <= k) {  // every positive entry is kept
      if (threadIdx.x == 0) {
        cut_v[row] = acc(0);
        cut_i[row] = -1;
      }
      return;
    }
  }

  // Radix select of the k-th best key: prefix = its leading bits found so far, need = its rank
  // among the entries sharing that prefix.
  Key prefix = 0, mask = 0;
  int64_t need = k;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t f = threadIdx.x; f < F; f += kThreads) {
      const acc v = static_cast<acc>(r[f]);
      if (!eligible(v)) continue;
      const Key key = ordered_key(r[f]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int bin = 255;
      for (; bin > 0; --bin) {
        if (above + hist[bin] >= need) break;
        above += hist[bin];
      }
      s_prefix = prefix | (Key(bin) << shift);
      s_need = need - above;
    }
    __syncthreads();
    prefix = s_prefix;
    need = s_need;
    mask |= Key(255) << shift;
    __syncthreads();
  }
  // prefix is now the k-th best key; `need` entries equal to it are taken, smallest index first.

  int64_t ties_before = 0, taken_before = 0;
  for (int64_t base = 0; base < F; base += kThreads) {
    const int64_t f = base + threadIdx.x;
    bool tie = false, take = false;
    Key key = 0;
    if (f < F) {
      const acc v = static_cast<acc>(r[f]);
      if (eligible(v)) {
        key = ordered_key(r[f]);
        tie = key == prefix;
        take = key > prefix;
      }
    }
    int tile_ties;
    const int64_t tie_rank = ties_before + block_exclusive_count(tie, scan_scratch, tile_ties);
    ties_before += tile_ties;
    if (kTopK) {
      take = take || (tie && tie_rank < need);
      int tile_taken;
      const int64_t pos = taken_before + block_exclusive_count(take, scan_scratch, tile_taken);
      taken_before += tile_taken;
      if (take && pos < k) {
        top_key[pos] = key;
        top_index[pos] = f;
      }
    } else if (tie && tie_rank == need - 1) {
      cut_v[row] = key_value<scalar_t>(prefix);
      cut_i[row] = f;
    }
  }
  if (!kTopK) return;

  sort_best_first(top_key, top_index, static_cast<int>(k));
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const int64_t f = top_index[j];
    out_i[row * k + j] = f;
    out_v[row * k + j] = r[f];
  }
}

// ---------------------------------------------------------------------------------------------
// Read-once row select (same modes and results as row_select_kernel, which stays the fallback for
// rows of 2^31 entries or more and for cutoff ranks above kMaxTopK).
//
// One block streams its row once, in tiles of kThreads·kVec entries (one 16-byte vector a thread
// when the row is 16-byte aligned, scalar loads otherwise and at the tail). Candidates (ordered
// key, index) are appended to a shared buffer in index order: each thread holds kVec consecutive
// entries and the append offsets come from an ordered block scan, so buffer order = index order.
// Once the buffer cannot take another tile it is compacted to its k best (radix select over the
// buffer, then a stable ordered compaction) and the k-th best key T becomes the threshold: later
// entries are accepted only when key > T. That is exact under the tie rule (larger value first,
// then smaller index): every later entry has a larger index than everything buffered, so one
// whose key equals T ranks below the k-th best already held and can never enter the k best.
// The buffer therefore always holds a superset of the k best entries read so far; the end is one
// more select + compaction, then the bitonic sort (TopK) or the k-th entry (cutoff).
template <typename scalar_t>
struct StreamSelect {
  using Key = key_t<scalar_t>;
  static constexpr int kVec = 16 / sizeof(scalar_t);  // entries per 16-byte load
  static constexpr int kTile = kThreads * kVec;
  // k + one tile must fit after a compaction; the second tile of room makes compactions rare
  // (at most one per kTile accepted entries). bf16/fp16: 30 KiB, fp32: 24 KiB, fp64: 24 KiB.
  static constexpr int kCapacity = static_cast<int>(kMaxTopK) + 2 * kTile;
};

// The k-th best key among keys[0, n) (1 <= k <= n), by 8-bit radix passes over the shared buffer.
// Returns it; `need` gets how many entries equal to it belong to the k best (the first ones in
// buffer order, i.e. the smallest indices). Every thread of the block must call it.
template <typename Key>
__device__ Key buffer_kth_key(const Key* keys, int n, int k, unsigned int* hist, Key* s_prefix, int* s_need,
                              int& need) {
  constexpr int kBits = sizeof(Key) * 8;
  Key prefix = 0, mask = 0;
  need = k;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const Key key = keys[i];
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0, bin = 255;
      for (; bin > 0; --bin) {
        if (above + static_cast<int>(hist[bin]) >= need) break;
        above += hist[bin];
      }
      *s_prefix = prefix | static_cast<Key>(Key(bin) << shift);
      *s_need = need - above;
    }
    __syncthreads();
    prefix = *s_prefix;
    need = *s_need;
    mask |= static_cast<Key>(Key(255) << shift);
    __syncthreads();
  }
  return prefix;
}

// Keeps, in place and in buffer order, the entries of [0, n) with key > kth and the first `need`
// equal to it. Returns the number kept. In-place is safe: an entry moves to a position <= its own,
// and every read of a chunk precedes (barrier in the scan) every write of that chunk.
template <typename Key>
__device__ int buffer_keep_best(Key* keys, int* idx, int n, Key kth, int need, int* scratch) {
  int ties_before = 0, taken_before = 0;
  for (int base = 0; base < n; base += kThreads) {
    const int p = base + threadIdx.x;
    Key key = 0;
    int id = 0;
    bool tie = false, take = false;
    if (p < n) {
      key = keys[p];
      id = idx[p];
      tie = key == kth;
      take = key > kth;
    }
    int chunk_ties, chunk_taken;
    const int tie_rank = ties_before + block_exclusive_count(tie, scratch, chunk_ties);
    ties_before += chunk_ties;
    take = take || (tie && tie_rank < need);
    const int pos = taken_before + block_exclusive_count(take, scratch, chunk_taken);
    taken_before += chunk_taken;
    if (take) {
      keys[pos] = key;
      idx[pos] = id;
    }
  }
  __syncthreads();
  return taken_before;
}

template <typename scalar_t, bool kTopK>
__global__ void __launch_bounds__(kThreads) row_stream_select_kernel(
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, int k, scalar_t* __restrict__ out_v,
    int64_t* __restrict__ out_i, acc_t<scalar_t>* __restrict__ cut_v, int64_t* __restrict__ cut_i) {
  using acc = acc_t<scalar_t>;
  using S = StreamSelect<scalar_t>;
  using Key = typename S::Key;
  constexpr int kVec = S::kVec;
  __shared__ Key buf_key[S::kCapacity];
  __shared__ int buf_idx[S::kCapacity];
  __shared__ unsigned int hist[256];
  __shared__ Key s_prefix;
  __shared__ int s_need;
  __shared__ int scan_scratch[kWarps + 1];
  __shared__ int64_t sum_scratch[kWarps];

  const int64_t row = blockIdx.x;
  const scalar_t* r = pre + row * stride;
  const bool aligned = reinterpret_cast<uintptr_t>(r) % 16 == 0;  // uniform over the block

  int count = 0;            // entries in the buffer (uniform over the block)
  bool have_thr = false;    // whether `thr` holds the k-th best key of the entries read so far
  Key thr = 0;
  int64_t eligible_n = 0;   // cutoff mode: positive entries seen by this thread

  // This thread's kVec entries from f0 on (zeros past F); the next tile's are loaded before the
  // current one is processed, so two 16-byte loads a thread are in flight.
  auto load = [&](int64_t f0, scalar_t (&v)[kVec]) {
    if (aligned && f0 + kVec <= F) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(r + f0));
      memcpy(v, &raw, sizeof(raw));
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[j] = f0 + j < F ? r[f0 + j] : static_cast<scalar_t>(0.0f);
    }
  };
  scalar_t v[kVec], next[kVec];
  load(static_cast<int64_t>(threadIdx.x) * kVec, next);
  for (int64_t base = 0; base < F; base += S::kTile) {
    const int64_t f0 = base + static_cast<int64_t>(threadIdx.x) * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = next[j];
    if (base + S::kTile < F) load(f0 + S::kTile, next);  // uniform
    if (count > S::kCapacity - S::kTile) {  // uniform: this tile might not fit
      int need;
      thr = buffer_kth_key(buf_key, count, k, hist, &s_prefix, &s_need, need);
      count = buffer_keep_best(buf_key, buf_idx, count, thr, need, scan_scratch);
      have_thr = true;
    }
    Key keys[kVec];
    unsigned accept = 0;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      keys[j] = ordered_key(v[j]);
      bool ok = f0 + j < F;
      if (!kTopK) {
        ok = ok && static_cast<acc>(v[j]) > acc(0);
        eligible_n += ok;
      }
      if (ok && (!have_thr || keys[j] > thr)) accept |= 1u << j;
    }
    if (__syncthreads_or(accept != 0)) {
      int tile_total;
      int pos = count + block_exclusive_sum(__popc(accept), scan_scratch, tile_total);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (accept & (1u << j)) {
          buf_key[pos] = keys[j];
          buf_idx[pos] = static_cast<int>(f0 + j);
          ++pos;
        }
      }
      count += tile_total;
      __syncthreads();
    }
  }

  if (!kTopK) {
    const int64_t total = block_sum(eligible_n, sum_scratch);
    if (total <= k) {  // every positive entry is kept
      if (threadIdx.x == 0) {
        cut_v[row] = acc(0);
        cut_i[row] = -1;
      }
      return;
    }
    // total > k positive entries, and the buffer holds a superset of the k best: count >= k.
    int need;
    const Key kth = buffer_kth_key(buf_key, count, k, hist, &s_prefix, &s_need, need);
    int ties_before = 0;
    for (int base = 0; base < count; base += kThreads) {
      const int p = base + threadIdx.x;
      const bool tie = p < count && buf_key[p] == kth;
      int chunk_ties;
      const int tie_rank = ties_before + block_exclusive_count(tie, scan_scratch, chunk_ties);
      ties_before += chunk_ties;
      if (tie && tie_rank == need - 1) {
        cut_v[row] = key_value<scalar_t>(kth);
        cut_i[row] = buf_idx[p];
      }
    }
    return;
  }

  // TopK: every entry is eligible and k <= F, so count >= k here.
  if (count > k) {
    int need;
    const Key kth = buffer_kth_key(buf_key, count, k, hist, &s_prefix, &s_need, need);
    count = buffer_keep_best(buf_key, buf_idx, count, kth, need, scan_scratch);
  }
  sort_best_first(buf_key, buf_idx, static_cast<int>(k));
  for (int j = threadIdx.x; j < k; j += kThreads) {
    const int64_t f = buf_idx[j];
    out_i[row * k + j] = f;
    out_v[row * k + j] = r[f];
  }
}

// Whether a row select of rank k over rows of length n can take the read-once kernel: its buffer
// holds k + two tiles and its indices are 32-bit.
bool stream_select_fits(int64_t n, int64_t k) {
  return k <= kMaxTopK && n <= std::numeric_limits<int>::max();
}

// ---------------------------------------------------------------------------------------------
// Read-once column cutoff (feature choice, m <= kMaxColumnM): the same strict-threshold candidate
// buffers as row_stream_select_kernel, one per column, read straight from the row-major matrix
// (no transposed copy: 1 read instead of 1 read + 1 write + 1 read, and no B x F temporary).
// A block owns kColumns adjacent features; lane = feature, warp w reads rows w, w + 8, ... of each
// tile of kTileRows tokens (kColumns consecutive entries of a row a warp: whole sectors).
// Candidates are appended in any order (shared atomics): ranks are counted with the full order
// (value desc, token asc), so the buffer order does not matter. The threshold argument is the
// row kernel's: tiles go in token order and the threshold only changes between tiles, so a later
// token whose key equals the m-th best key held ranks below it and is rightly rejected.
constexpr int kColumns = 32;
constexpr int kTileRows = 32;  // 4 rows a warp in flight
constexpr int kMaxColumnM = 32;
constexpr int kColumnCapacity = kMaxColumnM + 2 * kTileRows;  // m + one tile after a compaction
constexpr int kColumnStride = kColumnCapacity + 1;            // padding: appends of 32 lanes spread banks

// Rank, in (key desc, index asc) order among keys/idx[0, n), of each of this lane's entries
// i = lane, lane + 32, lane + 64 (n <= kColumnCapacity = 96). Called by a whole warp.
template <typename Key>
__device__ __forceinline__ void column_ranks(const Key* keys, const int* idx, int n, Key (&my_key)[3],
                                            int (&my_idx)[3], int (&rank)[3]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const int i = lane + 32 * s;
    my_key[s] = i < n ? keys[i] : Key(0);
    my_idx[s] = i < n ? idx[i] : -1;
    rank[s] = 0;
  }
  for (int j = 0; j < n; ++j) {
    const Key kj = keys[j];
    const int ij = idx[j];
#pragma unroll
    for (int s = 0; s < 3; ++s) rank[s] += kj > my_key[s] || (kj == my_key[s] && ij < my_idx[s]);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) column_stream_cutoff_kernel(
    const scalar_t* __restrict__ pre, int64_t B, int64_t F, int64_t stride, int m, acc_t<scalar_t>* __restrict__ cut_v,
    int64_t* __restrict__ cut_i) {
  static_assert(kThreads == kColumns * 8 && kColumnCapacity <= 96, "layout of the column cutoff");
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  __shared__ Key buf_key[kColumns * kColumnStride];
  __shared__ int buf_idx[kColumns * kColumnStride];
  __shared__ int count[kColumns];
  __shared__ Key thr[kColumns];
  __shared__ int have_thr[kColumns];
  __shared__ unsigned long long positives[kColumns];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kColumns + lane;
  const bool column_ok = f < F;
  if (threadIdx.x < kColumns) {
    count[threadIdx.x] = 0;
    have_thr[threadIdx.x] = 0;
    thr[threadIdx.x] = 0;
    positives[threadIdx.x] = 0;
  }
  __syncthreads();

  // Keeps a column's m best at positions [0, m), best first (positions = ranks), and makes the
  // m-th best key its threshold. Called by a whole warp.
  auto compact = [&](int c) {
    Key* keys = buf_key + c * kColumnStride;
    int* idx = buf_idx + c * kColumnStride;
    Key k3[3];
    int i3[3], r3[3];
    column_ranks(keys, idx, count[c], k3, i3, r3);
    __syncwarp();  // every rank is counted before any entry moves
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      if (i3[s] >= 0 && r3[s] < m) {
        keys[r3[s]] = k3[s];
        idx[r3[s]] = i3[s];
      }
    }
    __syncwarp();
    if (lane == 0) {
      count[c] = m;
      thr[c] = keys[m - 1];
      have_thr[c] = 1;
    }
    __syncwarp();
  };

  uint64_t my_positives = 0;
  for (int64_t base = 0; base < B; base += kTileRows) {
    for (int c = warp; c < kColumns; c += kWarps)  // warp-uniform: count[c] is read by all lanes
      if (count[c] > kColumnCapacity - kTileRows) compact(c);
    __syncthreads();
    scalar_t v[kTileRows / kWarps];
#pragma unroll
    for (int u = 0; u < kTileRows / kWarps; ++u) {
      const int64_t b = base + u * kWarps + warp;
      v[u] = column_ok && b < B ? pre[b * stride + f] : static_cast<scalar_t>(0.0f);
    }
    const bool has_thr = have_thr[lane] != 0;
    const Key t = thr[lane];
#pragma unroll
    for (int u = 0; u < kTileRows / kWarps; ++u) {
      const int64_t b = base + u * kWarps + warp;
      if (!(column_ok && b < B && static_cast<acc>(v[u]) > acc(0))) continue;
      ++my_positives;
      const Key key = ordered_key(v[u]);
      if (has_thr && !(key > t)) continue;
      const int pos = atomicAdd(&count[lane], 1);  // < kColumnCapacity: <= capacity - tile before it
      buf_key[lane * kColumnStride + pos] = key;
      buf_idx[lane * kColumnStride + pos] = static_cast<int>(b);
    }
    __syncthreads();
  }
  atomicAdd(&positives[lane], static_cast<unsigned long long>(my_positives));
  __syncthreads();

  for (int c = warp; c < kColumns; c += kWarps) {
    const int64_t fc = static_cast<int64_t>(blockIdx.x) * kColumns + c;
    if (fc >= F) continue;  // warp-uniform
    if (positives[c] <= static_cast<unsigned long long>(m)) {  // every positive token is kept
      if (lane == 0) {
        cut_v[fc] = acc(0);
        cut_i[fc] = -1;
      }
      continue;
    }
    // More than m positives: the buffer holds a superset of the m best, so count[c] >= m.
    Key k3[3];
    int i3[3], r3[3];
    column_ranks(buf_key + c * kColumnStride, buf_idx + c * kColumnStride, count[c], k3, i3, r3);
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      if (i3[s] >= 0 && r3[s] == m - 1) {
        cut_v[fc] = key_value<scalar_t>(k3[s]);
        cut_i[fc] = i3[s];
      }
    }
  }
}

void check_grid(int64_t blocks, const char* what) {
  FT_CHECK_VALUE(blocks < (int64_t(1) << 31), what, " must be < 2^31 on CUDA, got ", blocks);
}

void topk_cuda(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  FT_CHECK_VALUE(k <= kMaxTopK, "k must be <= ", kMaxTopK, " on CUDA, got ", k);
  const int64_t B = pre.size(0);
  check_grid(B, "the number of rows");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pre.get_device());
  const bool read_once = stream_select_fits(pre.size(1), k);
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_topk_cuda", [&] {
    if (read_once) {
      row_stream_select_kernel<scalar_t, true><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          pre.const_data_ptr<scalar_t>(), pre.size(1), pre.stride(0), static_cast<int>(k),
          values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), nullptr, nullptr);
    } else {
      row_select_kernel<scalar_t, true><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          pre.const_data_ptr<scalar_t>(), pre.size(1), pre.stride(0), k, values.data_ptr<scalar_t>(),
          indices.data_ptr<int64_t>(), nullptr, nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void column_cutoff_cuda(const at::Tensor& pre, int64_t m, const at::Tensor& value, const at::Tensor& index) {
  if (m == 0) {
    value.fill_(std::numeric_limits<double>::infinity());
    index.fill_(-1);
    return;
  }
  if (m >= pre.size(0)) {  // at most m positive tokens in any column: every one is kept
    value.fill_(0);
    index.fill_(-1);
    return;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pre.get_device());
  if (m <= kMaxColumnM && pre.size(0) <= std::numeric_limits<int>::max()) {  // the usual m = ceil(k·B/F)
    const int64_t B = pre.size(0), F = pre.size(1);
    const int64_t blocks = (F + kColumns - 1) / kColumns;
    check_grid(blocks, "the number of feature groups");
    FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_column_cutoff_cuda", [&] {
      column_stream_cutoff_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          pre.const_data_ptr<scalar_t>(), B, F, pre.stride(0), static_cast<int>(m), value.data_ptr<acc_t<scalar_t>>(),
          index.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  // Larger m: columns become rows (one transposed copy), then every feature's selection reads its
  // tokens contiguously with the row kernels.
  const at::Tensor t = pre.t().contiguous();
  const int64_t F = t.size(0);
  check_grid(F, "the number of features");
  const bool read_once = stream_select_fits(t.size(1), m);
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_column_cutoff_cuda", [&] {
    if (read_once) {
      row_stream_select_kernel<scalar_t, false><<<static_cast<unsigned>(F), kThreads, 0, stream>>>(
          t.const_data_ptr<scalar_t>(), t.size(1), t.stride(0), static_cast<int>(m), nullptr, nullptr,
          value.data_ptr<acc_t<scalar_t>>(), index.data_ptr<int64_t>());
    } else {
      row_select_kernel<scalar_t, false><<<static_cast<unsigned>(F), kThreads, 0, stream>>>(
          t.const_data_ptr<scalar_t>(), t.size(1), t.stride(0), m, nullptr, nullptr,
          value.data_ptr<acc_t<scalar_t>>(), index.data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Global select (mutual choice). state: [prefix, need, all_kept] as 64-bit words.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) global_hist_kernel(
    const scalar_t* __restrict__ pre, int64_t B, int64_t F, int64_t stride, const uint64_t* __restrict__ state,
    int shift, uint64_t mask, unsigned long long* __restrict__ hist) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  __shared__ unsigned int local[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) local[i] = 0;
  __syncthreads();
  const Key prefix = static_cast<Key>(state[0]);
  const bool done = state[2] != 0;
  if (!done) {
    for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
      const scalar_t* r = pre + b * stride;
      for (int64_t f = threadIdx.x; f < F; f += kThreads) {
        const acc v = static_cast<acc>(r[f]);
        if (!(v > acc(0))) continue;
        const Key key = ordered_key(r[f]);
        if ((key & static_cast<Key>(mask)) == prefix) atomicAdd(&local[(key >> shift) & 255], 1u);
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += kThreads)
    if (local[i]) atomicAdd(&hist[i], static_cast<unsigned long long>(local[i]));
}

template <typename scalar_t>
__global__ void global_pick_kernel(uint64_t* __restrict__ state, unsigned long long* __restrict__ hist, int shift,
                                   bool first, acc_t<scalar_t>* __restrict__ cut_v, int64_t* __restrict__ cut_i) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  if (state[2] == 0) {
    const uint64_t need = state[1];
    uint64_t above = 0, total = 0;
    for (int i = 0; i < 256; ++i) total += hist[i];
    if (first && total <= need) {  // at most `budget` positive entries: keep them all
      state[2] = 1;
      cut_v[0] = acc(0);
      cut_i[0] = -1;
    } else {
      int bin = 255;
      for (; bin > 0; --bin) {
        if (above + hist[bin] >= need) break;
        above += hist[bin];
      }
      state[0] = static_cast<uint64_t>(static_cast<Key>(state[0]) | (Key(bin) << shift));
      state[1] = need - above;
    }
  }
  for (int i = 0; i < 256; ++i) hist[i] = 0;
}

// Ties (entries equal to the cutoff) per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) global_tie_count_kernel(
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, const uint64_t* __restrict__ state,
    int64_t* __restrict__ ties) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  __shared__ int64_t scratch[kWarps];
  const int64_t row = blockIdx.x;
  const Key prefix = static_cast<Key>(state[0]);
  const bool done = state[2] != 0;
  int64_t n = 0;
  if (!done) {
    const scalar_t* r = pre + row * stride;
    for (int64_t f = threadIdx.x; f < F; f += kThreads) {
      const acc v = static_cast<acc>(r[f]);
      n += v > acc(0) && ordered_key(r[f]) == prefix;
    }
  }
  const int64_t total = block_sum(n, scratch);
  if (threadIdx.x == 0) ties[row] = total;
}

// The row holding the need-th tie (flat order) finds it with an ordered scan.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) global_tie_locate_kernel(
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, const uint64_t* __restrict__ state,
    const int64_t* __restrict__ ties, const int64_t* __restrict__ ties_inclusive, acc_t<scalar_t>* __restrict__ cut_v,
    int64_t* __restrict__ cut_i) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  __shared__ int scan_scratch[kWarps + 1];
  const int64_t row = blockIdx.x;
  if (state[2] != 0) return;
  const int64_t need = static_cast<int64_t>(state[1]);
  const int64_t before = ties_inclusive[row] - ties[row];
  if (!(before < need && need <= ties_inclusive[row])) return;  // uniform over the block
  const Key prefix = static_cast<Key>(state[0]);
  const scalar_t* r = pre + row * stride;
  int64_t seen = before;
  for (int64_t base = 0; base < F; base += kThreads) {
    const int64_t f = base + threadIdx.x;
    bool tie = false;
    if (f < F) {
      const acc v = static_cast<acc>(r[f]);
      tie = v > acc(0) && ordered_key(r[f]) == prefix;
    }
    int tile;
    const int64_t rank = seen + block_exclusive_count(tie, scan_scratch, tile);
    seen += tile;
    if (tie && rank == need - 1) {
      cut_v[0] = key_value<scalar_t>(prefix);
      cut_i[0] = row * F + f;
    }
  }
}

void global_cutoff_cuda(const at::Tensor& pre, int64_t budget, const at::Tensor& value, const at::Tensor& index) {
  value.fill_(std::numeric_limits<double>::infinity());
  index.fill_(-1);
  if (budget == 0) return;
  const int64_t B = pre.size(0), F = pre.size(1);
  check_grid(B, "the number of rows");
  const int device = pre.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  auto state = at::zeros({3}, pre.options().dtype(at::kLong));
  state[1].fill_(budget);
  auto hist = at::zeros({256}, pre.options().dtype(at::kLong));
  auto ties = at::empty({B}, pre.options().dtype(at::kLong));
  const int64_t blocks = std::min<int64_t>(B, 4 * cuda::multiprocessor_count(device));
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_global_cutoff_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using Key = key_t<scalar_t>;
    constexpr int kBits = sizeof(Key) * 8;
    auto* st = reinterpret_cast<uint64_t*>(state.data_ptr<int64_t>());
    auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    uint64_t mask = 0;
    for (int shift = kBits - 8; shift >= 0; shift -= 8) {
      global_hist_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          pre.const_data_ptr<scalar_t>(), B, F, pre.stride(0), st, shift, mask, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      global_pick_kernel<scalar_t><<<1, 1, 0, stream>>>(st, h, shift, shift == kBits - 8, value.data_ptr<acc>(),
                                                  index.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mask |= uint64_t(255) << shift;
    }
    global_tie_count_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), F, pre.stride(0), st, ties.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor inclusive = at::cumsum(ties, 0);
    global_tie_locate_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), F, pre.stride(0), st, ties.const_data_ptr<int64_t>(),
        inclusive.const_data_ptr<int64_t>(), value.data_ptr<acc>(), index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Kept entries under per-feature cutoffs: count per row, then an ordered fill.
template <typename scalar_t>
struct CutoffArgs {
  const scalar_t* pre;
  int64_t F, stride;
  const acc_t<scalar_t>* T;
  const int64_t* L;
  bool shared, flat;

  __device__ __forceinline__ bool at(int64_t b, int64_t f, acc_t<scalar_t> v) const {
    const int64_t j = shared ? 0 : f;
    return kept(v, T[j], flat ? b * F + f : b, L[j]);
  }
};

template <typename scalar_t>
CutoffArgs<scalar_t> cutoff_args(const Cutoffs& c) {
  return {c.pre.const_data_ptr<scalar_t>(), c.pre.size(1), c.pre.stride(0),
          c.value.const_data_ptr<acc_t<scalar_t>>(), c.index.const_data_ptr<int64_t>(),
          c.value.numel() == 1, c.flat};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) count_kept_kernel(const CutoffArgs<scalar_t> a, int64_t* __restrict__ counts) {
  __shared__ int64_t scratch[kWarps];
  const int64_t b = blockIdx.x;
  const scalar_t* r = a.pre + b * a.stride;
  int64_t n = 0;
  for (int64_t f = threadIdx.x; f < a.F; f += kThreads) n += a.at(b, f, static_cast<acc_t<scalar_t>>(r[f]));
  const int64_t total = block_sum(n, scratch);
  if (threadIdx.x == 0) counts[b] = total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fill_kept_kernel(const CutoffArgs<scalar_t> a, const int64_t* __restrict__ row_ptr,
                                                             int64_t* __restrict__ feature, scalar_t* __restrict__ value) {
  __shared__ int scan_scratch[kWarps + 1];
  const int64_t b = blockIdx.x;
  const scalar_t* r = a.pre + b * a.stride;
  const int64_t start = row_ptr[b], room = row_ptr[b + 1] - start;
  int64_t written = 0;
  for (int64_t base = 0; base < a.F; base += kThreads) {
    const int64_t f = base + threadIdx.x;
    const bool keep = f < a.F && a.at(b, f, static_cast<acc_t<scalar_t>>(r[f]));
    int tile;
    const int64_t pos = written + block_exclusive_count(keep, scan_scratch, tile);
    written += tile;
    if (keep && pos < room) {  // the count pass sized the row; never write past it
      feature[start + pos] = f;
      value[start + pos] = r[f];
    }
  }
}

void count_kept_cuda(const Cutoffs& c, const at::Tensor& counts) {
  const int64_t B = c.pre.size(0);
  check_grid(B, "the number of rows");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.pre.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(c.pre.scalar_type(), "sae_count_kept_cuda", [&] {
    count_kept_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(cutoff_args<scalar_t>(c),
                                                                                  counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fill_kept_cuda(const Cutoffs& c, const at::Tensor& row_ptr, const at::Tensor& feature, const at::Tensor& value) {
  const int64_t B = c.pre.size(0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.pre.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(c.pre.scalar_type(), "sae_fill_kept_cuda", [&] {
    fill_kept_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        cutoff_args<scalar_t>(c), row_ptr.const_data_ptr<int64_t>(), feature.data_ptr<int64_t>(),
        value.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Decode and the backward products.

__device__ __forceinline__ void clamped_range(const int64_t* rp, int64_t i, int64_t nnz, int64_t& lo, int64_t& hi) {
  const int64_t a = rp[i], b = rp[i + 1];
  lo = a < 0 ? 0 : (a > nnz ? nnz : a);
  hi = b < lo ? lo : (b > nnz ? nnz : b);
}

// out[b] = bias + Σ_j coef_j · table[col_j]: one block a token, threads across d (coalesced rows).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(
    const int64_t* __restrict__ rp, const int64_t* __restrict__ col, const scalar_t* __restrict__ coef,
    const scalar_t* __restrict__ table, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t d,
    int64_t R, int64_t nnz) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  int64_t lo, hi;
  clamped_range(rp, b, nnz, lo, hi);
  for (int64_t e = threadIdx.x; e < d; e += kThreads) {
    acc s = bias ? static_cast<acc>(bias[e]) : acc(0);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t r = col[j];
      if (r >= 0 && r < R) s += static_cast<acc>(coef[j]) * static_cast<acc>(table[r * d + e]);
    }
    out[b * d + e] = static_cast<scalar_t>(s);
  }
}

// out_j = grad[b] · table[col_j]: one block a token, one warp per stored entry.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sampled_dot_kernel(
    const int64_t* __restrict__ rp, const int64_t* __restrict__ col, const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ table, scalar_t* __restrict__ out, int64_t d, int64_t R, int64_t nnz) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t lo, hi;
  clamped_range(rp, b, nnz, lo, hi);
  const scalar_t* g = grad + b * d;
  for (int64_t j = lo + warp; j < hi; j += kWarps) {
    const int64_t r = col[j];
    acc s = 0;
    if (r >= 0 && r < R) {
      const scalar_t* t = table + r * d;
      for (int64_t e = lane; e < d; e += 32) s += static_cast<acc>(g[e]) * static_cast<acc>(t[e]);
    }
    s = cuda::warp_sum(s);
    if (lane == 0) out[j] = static_cast<scalar_t>(s);
  }
}

// out[f] = Σ_p coef[perm_p] · src[token_p] in CSC order: one block a feature, no atomics.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) segment_sum_kernel(
    const int64_t* __restrict__ cp, const int64_t* __restrict__ perm, const int64_t* __restrict__ token,
    const scalar_t* __restrict__ coef, const scalar_t* __restrict__ src, scalar_t* __restrict__ out,
    scalar_t* __restrict__ coef_sum, int64_t d, int64_t B, int64_t nnz) {
  using acc = acc_t<scalar_t>;
  const int64_t f = blockIdx.x;
  int64_t lo, hi;
  clamped_range(cp, f, nnz, lo, hi);
  for (int64_t e = threadIdx.x; e < d; e += kThreads) {
    acc s = 0;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t j = perm[p], b = token[p];
      if (j >= 0 && j < nnz && b >= 0 && b < B) s += static_cast<acc>(coef[j]) * static_cast<acc>(src[b * d + e]);
    }
    out[f * d + e] = static_cast<scalar_t>(s);
  }
  if (threadIdx.x == 0) {
    acc total = 0;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t j = perm[p];
      if (j >= 0 && j < nnz) total += static_cast<acc>(coef[j]);
    }
    coef_sum[f] = static_cast<scalar_t>(total);
  }
}

void gather_rows_cuda(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                      const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t B = out.size(0);
  check_grid(B, "the number of rows");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(table.scalar_type(), "sae_gather_rows_cuda", [&] {
    gather_rows_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        row_ptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), coef.const_data_ptr<scalar_t>(),
        table.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), out.size(1), table.size(0), col.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sampled_dot_cuda(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                      const at::Tensor& table, const at::Tensor& out) {
  const int64_t B = grad.size(0);
  if (B == 0) {
    out.zero_();
    return;
  }
  check_grid(B, "the number of rows");
  out.zero_();  // entries outside every row (malformed row_ptr) read 0, never stale memory
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(grad.scalar_type(), "sae_sampled_dot_cuda", [&] {
    sampled_dot_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        row_ptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), grad.const_data_ptr<scalar_t>(),
        table.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), grad.size(1), table.size(0), col.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void segment_sum_cuda(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                      const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                      const at::Tensor& coef_sum) {
  const int64_t F = out.size(0);
  check_grid(F, "the number of features");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(src.scalar_type(), "sae_segment_sum_cuda", [&] {
    segment_sum_kernel<scalar_t><<<static_cast<unsigned>(F), kThreads, 0, stream>>>(
        col_ptr.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), token.const_data_ptr<int64_t>(),
        coef.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        coef_sum.data_ptr<scalar_t>(), out.size(1), src.size(0), perm.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

constexpr Kernels kCudaKernels{
    topk_cuda, column_cutoff_cuda, global_cutoff_cuda, count_kept_cuda, fill_kept_cuda, gather_rows_cuda, sampled_dot_cuda, segment_sum_cuda, csc};

}  // namespace sae
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CUDA, fusedtrain::sae::kCudaKernels)
