// dtype dispatch for the floating types every kernel supports: float32, float64, bfloat16, float16.
#pragma once

#include <ATen/Dispatch.h>

#define FUSEDTRAIN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
