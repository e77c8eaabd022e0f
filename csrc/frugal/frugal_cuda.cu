// CUDA kernel of the fused FRUGAL step: one launch for every tensor of the call (a multi-tensor
// apply). The host writes a table of tensors and a list of block tasks (a tensor and a range of its
// rows or elements) into one pinned buffer, copies it to the device on the current stream, and each
// block runs one task. p and g are read and p written once; the moments only for the selected part.
//   dense / free / residual: element ranges; each thread keeps kUnroll elements in flight.
//   rows:    per row, a binary search of the sorted selected rows picks AdamW or the free update.
//   columns: the block marks the selected columns in a shared-memory bitmask once, then per row
//            the free update skips marked columns while AdamW walks the selected ones (disjoint
//            elements: no barrier between them).
// Index values are not validated (that would cost a sync per step): the kernel reads any index list
// as the set frugal_math.h defines, as the CPU does. Each block first checks (one pass over the list,
// no host sync) whether its list is strictly increasing within range, what FRUGAL passes: then the
// paths above. Otherwise the slow, exact paths: a row's slot is the first entry equal to it (a
// block-wide search), a column entry is active iff in range and no earlier entry equals it; no
// element is updated twice and no index leaves its tensor.
#include "frugal.h"

#include "../common/backend.h"

#include "../common/checks.h"
#include "../common/cuda/launch.cuh"
#include "../common/dispatch.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fusedtrain {
namespace frugal {
namespace {

using cuda::kThreads;
constexpr int64_t kTaskElements = 1 << 14;  // elements per block task (whole rows for rows/columns)
constexpr int64_t kMaxBitmaskBytes = 48 * 1024;  // default dynamic shared memory limit
constexpr int64_t kMaxMaskedColumns = kMaxBitmaskBytes * 8;

template <typename scalar_t>
using TensorMeta = TensorPtrs<scalar_t>;  // one entry of the device-side tensor table

struct Task {
  int64_t begin, end;  // rows (rows/columns kinds) or elements (the others)
  int32_t tensor;
  int32_t pad;
};

constexpr int kUnroll = 4;  // elements per thread in flight

// Runs load(i) then store(i, values) for i in [begin, end) over the block's threads, kUnroll
// elements per thread at a time with every load of a round issued before its first store: the
// tensors' pointers may alias as far as the compiler knows, so it would not hoist them itself.
// Coalesced: a round's u-th elements of consecutive threads are consecutive.
template <typename Load, typename Store>
__device__ __forceinline__ void unrolled_range(int64_t begin, int64_t end, Load load, Store store) {
  using Values = decltype(load(int64_t(0)));
  for (int64_t first = begin + threadIdx.x; first < end; first += int64_t(kUnroll) * kThreads) {
    Values values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = first + int64_t(u) * kThreads;
      if (i < end) values[u] = load(i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = first + int64_t(u) * kThreads;
      if (i < end) store(i, values[u]);
    }
  }
}

template <typename acc>
struct Pair { acc w, g; };
template <typename acc>
struct Quad { acc w, g, a, b; };  // (m, v) for AdamW, (base, update) for the residual

// AdamW on elements [begin, end) of the tensor, whose moments sit at `state_offset` + the same
// relative position (a selected row's moments are row j of the (k, cols) state).
template <typename scalar_t>
__device__ __forceinline__ void adam_range(const TensorMeta<scalar_t>& T, int64_t begin, int64_t end,
                                           int64_t state_shift) {
  using acc = acc_t<scalar_t>;
  unrolled_range(
      begin, end,
      [&](int64_t e) {
        return Quad<acc>{static_cast<acc>(T.w[e]), static_cast<acc>(T.g[e]),
                         static_cast<acc>(T.m[e + state_shift]), static_cast<acc>(T.v[e + state_shift])};
      },
      [&](int64_t e, Quad<acc> q) {
        T.w[e] = static_cast<scalar_t>(adam_coordinate<acc>(q.w, q.g, q.a, q.b, T.s));
        T.m[e + state_shift] = static_cast<scalar_t>(q.a);
        T.v[e + state_shift] = static_cast<scalar_t>(q.b);
      });
}

template <typename scalar_t>
__device__ __forceinline__ void free_range(const TensorMeta<scalar_t>& T, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  unrolled_range(
      begin, end, [&](int64_t e) { return Pair<acc>{static_cast<acc>(T.w[e]), static_cast<acc>(T.g[e])}; },
      [&](int64_t e, Pair<acc> p) { T.w[e] = static_cast<scalar_t>(free_coordinate<acc>(p.w, p.g, T.s)); });
}

// Whether idx[0, k) is strictly increasing within [0, limit) (frugal_math.h: every entry active).
// Every thread of the block must call it.
__device__ __forceinline__ bool block_list_canonical(const int32_t* idx, int64_t k, int64_t limit) {
  bool ok = true;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const int32_t c = idx[j];
    ok = ok && c >= 0 && c < limit && (j == 0 || idx[j - 1] < c);
  }
  return __syncthreads_and(ok) != 0;
}

// The first entry of idx[0, k) equal to `value`, or -1: a block-wide search (every thread of the
// block must call it; all get the same answer).
__device__ __forceinline__ int64_t block_first_entry(const int32_t* idx, int64_t k, int64_t value,
                                                     unsigned long long* s_first) {
  if (threadIdx.x == 0) *s_first = ~0ull;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    if (idx[j] == value) {
      atomicMin(s_first, static_cast<unsigned long long>(j));
      break;  // this thread's later entries come after j
    }
  }
  __syncthreads();
  const unsigned long long first = *s_first;
  __syncthreads();  // read by all before the next call resets it
  return first == ~0ull ? -1 : static_cast<int64_t>(first);
}

// Whether entry j of a list that is not canonical is active: in range, and no earlier entry equal.
__device__ __forceinline__ bool entry_active(const int32_t* idx, int64_t j, int64_t limit) {
  const int32_t c = idx[j];
  if (c < 0 || c >= limit) return false;
  for (int64_t i = 0; i < j; ++i)
    if (idx[i] == c) return false;
  return true;
}

template <typename acc>
struct ActiveQuad { acc w, g, a, b; bool on; };

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    frugal_step_kernel(const TensorMeta<scalar_t>* __restrict__ metas, const Task* __restrict__ tasks) {
  using acc = acc_t<scalar_t>;
  extern __shared__ uint32_t column_mask[];
  __shared__ unsigned long long s_first;  // block_first_entry's answer
  const Task task = tasks[blockIdx.x];
  const TensorMeta<scalar_t> T = metas[task.tensor];
  const int64_t n = T.cols;
  switch (T.kind) {
    case kDense:
      adam_range(T, task.begin, task.end, 0);
      break;
    case kFree:
      free_range(T, task.begin, task.end);
      break;
    case kResidual:
      unrolled_range(
          task.begin, task.end,
          [&](int64_t e) {
            return Quad<acc>{static_cast<acc>(T.w[e]), static_cast<acc>(T.g[e]), static_cast<acc>(T.base[e]),
                             static_cast<acc>(T.update[e])};
          },
          [&](int64_t e, Quad<acc> q) {
            T.w[e] = static_cast<scalar_t>(residual_coordinate<acc>(q.w, q.g, q.a, q.b, T.s));
          });
      break;
    case kRows: {
      const bool canonical = block_list_canonical(T.idx, T.k, T.rows);
      for (int64_t r = task.begin; r < task.end; ++r) {
        int64_t slot = -1;
        if (canonical) {
          int64_t lo = 0, hi = T.k;  // first selected row >= r
          while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (T.idx[mid] < r) lo = mid + 1; else hi = mid;
          }
          if (lo < T.k && T.idx[lo] == r) slot = lo;
        } else {
          slot = block_first_entry(T.idx, T.k, r, &s_first);
        }
        if (slot >= 0) adam_range(T, r * n, (r + 1) * n, (slot - r) * n);
        else free_range(T, r * n, (r + 1) * n);
      }
      break;
    }
    case kColumns: {
      const bool canonical = block_list_canonical(T.idx, T.k, n);
      const int words = static_cast<int>((n + 31) / 32);
      for (int i = threadIdx.x; i < words; i += kThreads) column_mask[i] = 0u;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < T.k; j += kThreads) {
        const int32_t c = T.idx[j];
        if (c >= 0 && c < n) atomicOr(&column_mask[c >> 5], 1u << (c & 31));
      }
      __syncthreads();
      // Per row: the free update on the unmarked columns and AdamW on the selected ones touch
      // disjoint elements, so the two loops need no barrier between them.
      for (int64_t r = task.begin; r < task.end; ++r) {
        const int64_t row = r * n;
        unrolled_range(
            int64_t(0), n,
            [&](int64_t c) {
              const bool selected = (column_mask[c >> 5] >> (c & 31)) & 1u;
              return selected ? Pair<acc>{acc(0), acc(0)}
                              : Pair<acc>{static_cast<acc>(T.w[row + c]), static_cast<acc>(T.g[row + c])};
            },
            [&](int64_t c, Pair<acc> p) {
              if (!((column_mask[c >> 5] >> (c & 31)) & 1u))
                T.w[row + c] = static_cast<scalar_t>(free_coordinate<acc>(p.w, p.g, T.s));
            });
        // Each selected column is written by exactly one entry, its active one (frugal_math.h).
        unrolled_range(
            int64_t(0), T.k,
            [&](int64_t j) {
              const int32_t c = T.idx[j];
              const bool on = canonical || entry_active(T.idx, j, n);
              const int64_t e = row + (on ? c : 0);
              return ActiveQuad<acc>{on ? static_cast<acc>(T.w[e]) : acc(0), on ? static_cast<acc>(T.g[e]) : acc(0),
                                     static_cast<acc>(T.m[r * T.k + j]), static_cast<acc>(T.v[r * T.k + j]), on};
            },
            [&](int64_t j, ActiveQuad<acc> q) {
              if (!q.on) return;  // out of range or a repeat: its slot is left as it is
              T.w[row + T.idx[j]] = static_cast<scalar_t>(adam_coordinate<acc>(q.w, q.g, q.a, q.b, T.s));
              T.m[r * T.k + j] = static_cast<scalar_t>(q.a);
              T.v[r * T.k + j] = static_cast<scalar_t>(q.b);
            });
      }
      break;
    }
    default:
      break;
  }
}

template <typename scalar_t>
void step_cuda_typed(const StepArgs& a) {
  using acc = acc_t<scalar_t>;
  std::vector<TensorMeta<scalar_t>> metas;
  std::vector<Task> tasks;
  int64_t mask_bytes = 0;
  for (size_t i = 0; i < a.params.size(); ++i) {
    if (a.params[i].numel() == 0) continue;
    const TensorMeta<scalar_t> T = tensor_ptrs<scalar_t>(a, i);
    const int32_t id = static_cast<int32_t>(metas.size());
    if (T.kind == kRows || T.kind == kColumns) {
      if (T.kind == kColumns) {
        FT_CHECK_VALUE(T.cols <= kMaxMaskedColumns, "params[", i, "] has ", T.cols,
                       " columns; the CUDA column projection supports at most ", kMaxMaskedColumns,
                       " (use proj='rows' or 'block' for this tensor)");
        mask_bytes = std::max<int64_t>(mask_bytes, (T.cols + 31) / 32 * 4);
      }
      const int64_t per = std::max<int64_t>(1, kTaskElements / T.cols);
      for (int64_t r = 0; r < T.rows; r += per) tasks.push_back({r, std::min(T.rows, r + per), id, 0});
    } else {
      const int64_t numel = a.params[i].numel();
      for (int64_t e = 0; e < numel; e += kTaskElements)
        tasks.push_back({e, std::min(numel, e + kTaskElements), id, 0});
    }
    metas.push_back(T);
  }
  if (tasks.empty()) return;
  FT_CHECK_VALUE(tasks.size() < (size_t(1) << 31), "too many blocks for one launch: ", tasks.size());

  // One pinned buffer (tensor table, then tasks) and one asynchronous copy on the current stream;
  // the caching host allocator keeps the buffer until the copy has run.
  const size_t meta_bytes = (metas.size() * sizeof(TensorMeta<scalar_t>) + 15) / 16 * 16;
  const size_t total = meta_bytes + tasks.size() * sizeof(Task);
  at::Tensor host = at::empty({static_cast<int64_t>(total)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), metas.data(), metas.size() * sizeof(TensorMeta<scalar_t>));
  std::memcpy(host.data_ptr<uint8_t>() + meta_bytes, tasks.data(), tasks.size() * sizeof(Task));
  at::Tensor device_table = host.to(a.params[0].device(), /*non_blocking=*/true);
  const auto* d_metas = reinterpret_cast<const TensorMeta<scalar_t>*>(device_table.data_ptr<uint8_t>());
  const auto* d_tasks = reinterpret_cast<const Task*>(device_table.data_ptr<uint8_t>() + meta_bytes);

  auto stream = c10::cuda::getCurrentCUDAStream();
  frugal_step_kernel<scalar_t><<<static_cast<unsigned>(tasks.size()), kThreads, mask_bytes, stream>>>(
      d_metas, d_tasks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void step_cuda(const StepArgs& a) {
  // The step's scalars (lr, step counts, bias corrections) and its task table are host values copied
  // through a pinned buffer on every call: a captured graph would replay the first call's values and
  // read a buffer that is no longer its own. Refused, never captured.
  FT_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
           "frugal_step_ cannot be captured in a CUDA graph: its hyperparameters and task table are "
           "host values copied on each call (call it outside torch.cuda.graph)");
  FUSEDTRAIN_DISPATCH_FLOATING(a.params[0].scalar_type(), "frugal_step_cuda", [&] { step_cuda_typed<scalar_t>(a); });
}

}  // namespace

constexpr Kernels kCudaKernels{step_cuda};

}  // namespace frugal
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CUDA, fusedtrain::frugal::kCudaKernels)
