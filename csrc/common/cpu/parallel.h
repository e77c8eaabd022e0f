// Row-parallel loops of the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fusedtrain {
namespace cpu {

// at::parallel_for over `rows` rows of `width` elements, fn(begin, end) on ranges of rows. A range
// holds at least ~4096 elements (one row when rows are longer): shorter rows are not worth a task.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t width, const Fn& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1)), fn);
}

}  // namespace cpu
}  // namespace fusedtrain
