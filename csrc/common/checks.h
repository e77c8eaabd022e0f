// Argument checks shared by every op family. Each names the argument and says what was expected,
// so a bad call surfaces as a Python exception that points at the culprit, never as a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fusedtrain {

// Error messages are assembled here (std::to_string, snprintf) and handed to TORCH_CHECK as one
// string, so no number is formatted through c10::str's ostream inside this library (not reliable
// across torch builds; a plain string always is).
namespace detail {
inline void append(std::string& out, const char* v) { out += v; }
inline void append(std::string& out, const std::string& v) { out += v; }
inline void append(std::string& out, std::string_view v) { out.append(v.data(), v.size()); }
inline void append(std::string& out, at::ScalarType v) { out += c10::toString(v); }
inline void append(std::string& out, const c10::Device& v) { out += v.str(); }
inline void append(std::string& out, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  out += buf;
}
inline void append(std::string& out, c10::IntArrayRef v) {
  out += "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  out += "]";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& out, T v) { out += std::to_string(v); }
}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (detail::append(out, args), ...);
  return out;
}

}  // namespace fusedtrain

// TORCH_CHECK_VALUE / _TYPE / TORCH_CHECK (ValueError / TypeError / RuntimeError) with the
// message built by fusedtrain::message.
#define FT_CHECK_VALUE(cond, ...) \
  do { if (C10_UNLIKELY(!(cond))) TORCH_CHECK_VALUE(false, ::fusedtrain::message(__VA_ARGS__)); } while (0)
#define FT_CHECK_TYPE(cond, ...) \
  do { if (C10_UNLIKELY(!(cond))) TORCH_CHECK_TYPE(false, ::fusedtrain::message(__VA_ARGS__)); } while (0)
#define FT_CHECK(cond, ...) \
  do { if (C10_UNLIKELY(!(cond))) TORCH_CHECK(false, ::fusedtrain::message(__VA_ARGS__)); } while (0)

namespace fusedtrain {

inline void check_defined(const at::Tensor& t, const char* name) {
  FT_CHECK_VALUE(t.defined(), name, " must be a defined tensor");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  FT_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  FT_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  FT_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   name, " must be float32, float64, bfloat16 or float16, got ", dt);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  FT_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

inline void check_finite(double value, const char* name) {
  FT_CHECK_VALUE(std::isfinite(value), name, " must be a finite number, got ", value);
}

// A 2-D tensor whose rows the kernels can walk with unit stride: `t` itself when its rows already
// are (any row stride; a row of at most one element is unit-stride whatever its stride), else a
// contiguous copy.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

}  // namespace fusedtrain
