// Row top-k and per-feature (column) cutoffs of the SAE routings on CUDA (sae_cuda.cuh).
#include "sae_cuda.cuh"

#include <limits>

namespace fusedtrain {
namespace sae {
namespace {

constexpr int64_t kMaxTopK = 1024;  // TopK entries sorted in shared memory per row

// Thread 0's step of a radix select over a 256-bin histogram: the highest bin whose entries, with
// those of the bins above it, reach `need` (bin 0 when none does); `above` gets the bins above it.
template <typename Count>
__device__ __forceinline__ int radix_pick_bin(const unsigned int* hist, Count need, Count& above) {
  above = 0;
  int bin = 255;
  for (; bin > 0; --bin) {
    if (above + static_cast<Count>(hist[bin]) >= need) break;
    above += hist[bin];
  }
  return bin;
}

// The k-th best of the keys a block visits (1 <= k <= their number), by 8-bit radix passes:
// for_each_key(count) calls count(key) for each of this thread's keys, the same keys every pass.
// Returns it (prefix: its leading bits found so far); `need` gets its rank among the keys equal to
// it, i.e. how many of those belong to the k best. Every thread of the block must call it.
template <typename Key, typename Count, typename ForEachKey>
__device__ Key radix_select_kth(const ForEachKey& for_each_key, Count k, unsigned int* hist, Key* s_prefix,
                                Count* s_need, Count& need) {
  constexpr int kBits = sizeof(Key) * 8;
  Key prefix = 0, mask = 0;
  need = k;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for_each_key([&](Key key) {
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      Count above;
      const int bin = radix_pick_bin(hist, need, above);
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

// Cutoff mode: whether a row has fewer than k positive entries (`positives`: this thread's count),
// so that it has no k-th best: its cutoff is then (0, -1) (sae.h: the rank k is m + 1, so every
// positive entry is kept). Every thread of the block must call it.
template <typename acc>
__device__ __forceinline__ bool has_no_kth_positive(int64_t positives, int64_t k, int64_t row, acc* cut_v,
                                                     int64_t* cut_i, int64_t* sum_scratch) {
  if (block_sum(positives, sum_scratch) >= k) return false;
  if (threadIdx.x == 0) {
    cut_v[row] = acc(0);
    cut_i[row] = -1;
  }
  return true;
}

// Where a row select writes: TopK the k best of row b at values/indices[b·k, (b + 1)·k), the
// cutoff mode the row's cutoff at cut_value/cut_index[b]; the other pair is null.
template <typename scalar_t>
struct RowSelectOutputs {
  scalar_t* values;
  int64_t* indices;
  acc_t<scalar_t>* cut_value;
  int64_t* cut_index;
};

// ---------------------------------------------------------------------------------------------
// Row select. Mode TopK: all entries eligible, write the k best (value desc, index asc).
// Mode cutoff: positive entries only, write the k-th best as (value, index), (0, -1) when there
// are fewer than k positive entries.
template <typename scalar_t, bool kTopK>
__global__ void __launch_bounds__(kThreads) row_select_kernel(
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, int64_t k, const RowSelectOutputs<scalar_t> out) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
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
    if (has_no_kth_positive(n, k, row, out.cut_value, out.cut_index, sum_scratch)) return;
  }

  // The k-th best key (prefix), and how many entries equal to it are taken (need), smallest
  // index first.
  int64_t need;
  const Key prefix = radix_select_kth<Key>(
      [&](const auto& count) {
        for (int64_t f = threadIdx.x; f < F; f += kThreads) {
          const acc v = static_cast<acc>(r[f]);
          if (!eligible(v)) continue;
          count(ordered_key(r[f]));
        }
      },
      k, hist, &s_prefix, &s_need, need);

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
      out.cut_value[row] = key_value<scalar_t>(prefix);
      out.cut_index[row] = f;
    }
  }
  if (!kTopK) return;

  sort_best_first(top_key, top_index, static_cast<int>(k));
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const int64_t f = top_index[j];
    out.indices[row * k + j] = f;
    out.values[row * k + j] = r[f];
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
  return radix_select_kth<Key>(
      [&](const auto& count) {
        for (int i = threadIdx.x; i < n; i += kThreads) count(keys[i]);
      },
      k, hist, s_prefix, s_need, need);
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
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, int k, const RowSelectOutputs<scalar_t> out) {
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
    if (has_no_kth_positive(eligible_n, static_cast<int64_t>(k), row, out.cut_value, out.cut_index, sum_scratch)) return;
    // total >= k positive entries, and the buffer holds a superset of the k best: count >= k.
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
        out.cut_value[row] = key_value<scalar_t>(kth);
        out.cut_index[row] = buf_idx[p];
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
    out.indices[row * k + j] = f;
    out.values[row * k + j] = r[f];
  }
}

// Whether a row select of rank k over rows of length n can take the read-once kernel: its buffer
// holds k + two tiles and its indices are 32-bit.
bool stream_select_fits(int64_t n, int64_t k) {
  return k <= kMaxTopK && n <= std::numeric_limits<int>::max();
}

// The row select of rank k over `rows` rows of F entries, `stride` apart: the read-once kernel
// where it fits, else the multi-pass one.
template <typename scalar_t, bool kTopK>
void launch_row_select(const scalar_t* pre, int64_t rows, int64_t F, int64_t stride, int64_t k,
                       const RowSelectOutputs<scalar_t>& out, cudaStream_t stream) {
  if (stream_select_fits(F, k)) {
    row_stream_select_kernel<scalar_t, kTopK><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        pre, F, stride, static_cast<int>(k), out);
  } else {
    row_select_kernel<scalar_t, kTopK><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(pre, F, stride, k, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    if (positives[c] < static_cast<unsigned long long>(m)) {  // no m-th best: (0, -1)
      if (lane == 0) {
        cut_v[fc] = acc(0);
        cut_i[fc] = -1;
      }
      continue;
    }
    // At least m positives: the buffer holds a superset of the m best, so count[c] >= m.
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

}  // namespace

void topk_cuda(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  FT_CHECK_VALUE(k <= kMaxTopK, "k must be <= ", kMaxTopK, " on CUDA, got ", k);
  const int64_t B = pre.size(0);
  check_grid(B, "the number of rows");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(pre.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_topk_cuda", [&] {
    launch_row_select<scalar_t, true>(pre.const_data_ptr<scalar_t>(), B, pre.size(1), pre.stride(0), k,
                                      {values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), nullptr, nullptr},
                                      stream);
  });
}

void column_cutoff_cuda(const at::Tensor& pre, int64_t m, const at::Tensor& value, const at::Tensor& index) {
  if (m == 0) {
    value.fill_(std::numeric_limits<double>::infinity());
    index.fill_(-1);
    return;
  }
  if (m > pre.size(0)) {  // fewer than m tokens in any column: no m-th best
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
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_column_cutoff_cuda", [&] {
    launch_row_select<scalar_t, false>(
        t.const_data_ptr<scalar_t>(), F, t.size(1), t.stride(0), m,
        {nullptr, nullptr, value.data_ptr<acc_t<scalar_t>>(), index.data_ptr<int64_t>()}, stream);
  });
}

}  // namespace sae
}  // namespace fusedtrain
