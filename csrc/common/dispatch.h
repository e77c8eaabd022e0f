// dtype dispatch for the floating types every kernel supports (float32, float64, bfloat16,
// float16), and the accumulate dtype their kernels compute in.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

#define FUSEDTRAIN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace fusedtrain {

// The dtype of acc_t<scalar_t> (math.h): float64 for float64, float32 for the others.
inline at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fusedtrain
