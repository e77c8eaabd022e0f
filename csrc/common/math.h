// Scalar math shared by CPU and CUDA kernels (__host__ __device__), so the CPU tests exercise the
// very formulas the GPU runs.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#if defined(__CUDACC__)
#define FT_HOST_DEVICE __host__ __device__
#else
#define FT_HOST_DEVICE
#endif

namespace fusedtrain {

// Accumulation type: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// log(1 + exp(x)) without overflow for large x or loss of precision for very negative x.
template <typename T>
FT_HOST_DEVICE inline T softplus(T x) {
  using std::exp; using std::log1p; using std::fabs;
  return (x > T(0) ? x : T(0)) + log1p(exp(-fabs(x)));
}

template <typename T>
FT_HOST_DEVICE inline T sigmoid(T x) {
  using std::exp;
  if (x >= T(0)) return T(1) / (T(1) + exp(-x));
  const T e = exp(x);
  return e / (T(1) + e);
}

}  // namespace fusedtrain
