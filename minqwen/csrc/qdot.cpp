// Integer dot-product kernels for minqwen's int8 and int4 weights (the "why" is in minqwen/qdot.py).
//
// A decode step multiplies every weight matrix by one activation vector, so the speed is set by
// how fast the weights stream out of memory. Widening each weight to a float before multiplying
// costs more instructions per byte than two cores can issue at memory speed. Here, as in
// llama.cpp, the activation vector is quantised instead -- int8, one scale per block of 32 values
// -- and weights and activations are multiplied as integers, 4 byte pairs per 32-bit lane and
// instruction (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd`). Each block's integer
// sum is then scaled once, in float.
//
// Built twice from this one file: with -DQDOT_AVX512 (AVX-512 BW/VL/VNNI, 64-byte steps) or
// without (AVX2 + FMA, 32-byte steps). QDOT_NAMESPACE names the operator library of the build,
// so both can be loaded into one process (the tests compare them).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // activations: one scale per 32 values; int4 weights: one (scale, zero) per 32
#ifdef QDOT_AVX512
constexpr int64_t kStep = 64;  // bytes of weights per inner-loop step (one 512-bit register)
#else
constexpr int64_t kStep = 32;  // one 256-bit register
#endif
constexpr int64_t kLanes = kStep / 4;  // 32-bit lanes of a register: each sums 4 byte products

// ----------------------------------------------------------------------------- activations
// One activation row quantised per block of 32: q = round(x / d), d = max|x| / 127 (0 for a zero block).
// `values` are stored in the order the weight loop reads them; `lane_scales` holds, for every
// 32-bit lane of every step, the scale d of the block that lane's 4 products belong to.
struct Activations {
  std::vector<int8_t> values;      // (rows, in)
  std::vector<float> lane_scales;  // (rows, lanes per row)
  std::vector<float> group_terms;  // int4 only: (rows, 2 * in / 32) = [-8 * S, S] per group, S = d * sum(q)
  std::vector<float> offsets;      // int8 on AVX-512 only: (rows,) = 128 * sum over blocks of d * sum(q)
};

template <typename T>
void quantize_block(const T* x, int8_t* q, float* d, int32_t* sum) {
  float amax = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
  *d = amax / 127.f;
  *sum = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    float v = *d > 0.f ? std::nearbyint(static_cast<float>(x[i]) / *d) : 0.f;  // round half to even, as torch.round
    q[i] = static_cast<int8_t>(std::clamp(v, -127.f, 127.f));
    *sum += q[i];
  }
}

// int8 weights: activations in their natural order; a step of kStep bytes covers kStep / 32 blocks.
template <typename T>
Activations quantize_for_int8(const T* x, int64_t rows, int64_t in) {
  Activations a;
  a.values.resize(rows * in);
  a.lane_scales.resize(rows * in / 4);
  a.offsets.assign(rows, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < in / kBlock; ++b) {
      float d;
      int32_t sum;
      quantize_block(x + r * in + b * kBlock, a.values.data() + r * in + b * kBlock, &d, &sum);
      std::fill_n(a.lane_scales.data() + (r * in + b * kBlock) / 4, kBlock / 4, d);
      a.offsets[r] += 128.f * d * sum;
    }
  }
  return a;
}

// int4 weights: a byte holds input 2j in its low nibble and 2j+1 in its high one, so a step of
// kStep bytes yields a register of low nibbles (the even inputs of kStep / 16 groups) and one of
// high nibbles (their odd inputs). The activations are stored to match: per step, the even inputs
// of its groups, then the odd ones. Lane l of either register belongs to group l / 4 of the step.
template <typename T>
Activations quantize_for_int4(const T* x, int64_t rows, int64_t in) {
  constexpr int64_t groups_per_step = kStep / (kBlock / 2);
  Activations a;
  a.values.resize(rows * in);
  a.lane_scales.resize(rows * in / 8);
  a.group_terms.resize(rows * 2 * in / kBlock);
  int8_t q[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < in / kBlock; ++g) {
      float d;
      int32_t sum;
      quantize_block(x + r * in + g * kBlock, q, &d, &sum);
      int64_t step = g / groups_per_step, slot = g % groups_per_step;
      int8_t* even = a.values.data() + r * in + step * 2 * kStep + slot * (kBlock / 2);
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        even[j] = q[2 * j];
        even[kStep + j] = q[2 * j + 1];  // the odd inputs, one register further on
      }
      std::fill_n(a.lane_scales.data() + (r * in + g * kBlock) / 8, kBlock / 8, d);
      a.group_terms[r * 2 * in / kBlock + 2 * g] = -8.f * d * sum;
      a.group_terms[r * 2 * in / kBlock + 2 * g + 1] = d * sum;
    }
  }
  return a;
}

// ----------------------------------------------------------------------------- SIMD helpers
#ifdef QDOT_AVX512
using Floats = __m512;
inline Floats zero_floats() { return _mm512_setzero_ps(); }
inline float sum_lanes(Floats v) { return _mm512_reduce_add_ps(v); }
#else
using Floats = __m256;
inline Floats zero_floats() { return _mm256_setzero_ps(); }
inline float sum_lanes(Floats v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// bf16 -> fp32 is a 16-bit left shift of the bits.
inline __m256 bf16x8_to_floats(const c10::BFloat16* p) {
  __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m128 bf16x4_to_floats(const c10::BFloat16* p) {
  __m128i bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
}

// ----------------------------------------------------------------------------- int8 x int8
// One weight row (in int8 values) times one activation row: sum over blocks of d_block * (w . q).
// The integer instructions multiply an unsigned byte by a signed one. AVX-512: flipping a weight's
// top bit makes it the unsigned w + 128, so the sums come out as w . q + 128 * sum(q), and
// `offset` (128 * sum over blocks of d * sum(q), the same for every row) is subtracted once.
// AVX2's instruction saturates 16-bit pair sums, which w + 128 would overflow, so there the sign
// of each activation moves onto the weight instead: w * q = (w * sign(q)) * |q|.
inline float int8_row_dot(const int8_t* w, const int8_t* q, const float* lane_scales, float offset, int64_t in) {
  Floats acc = zero_floats();
  for (int64_t k = 0; k < in; k += kStep) {
#ifdef QDOT_AVX512
    __m512i w_unsigned = _mm512_xor_si512(_mm512_loadu_si512(w + k), _mm512_set1_epi8(static_cast<char>(0x80)));
    __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w_unsigned, _mm512_loadu_si512(q + k));  // 16 lanes of 4 products
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_loadu_ps(lane_scales + k / 4), acc);
#else
    __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k));
    __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qv, qv), _mm256_sign_epi8(wv, qv));  // 16 x (2 products)
    __m256i dots = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));  // 8 lanes of 4 products
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_loadu_ps(lane_scales + k / 4), acc);
#endif
  }
#ifdef QDOT_AVX512
  return sum_lanes(acc) - offset;
#else
  (void)offset;
  return sum_lanes(acc);
#endif
}

// ----------------------------------------------------------------------------- int4 x int8
// One weight row (in / 2 bytes of codes, (scale, zero) bf16 pairs per group) times one
// activation row. A weight is (code - 8) * scale + zero, so a group contributes
//   scale * d * (codes . q) + scale * (-8 * S) + zero * S,   S = d * sum(q):
// the first term from the integer dot products, the other two from one multiply-add per group.
inline float int4_row_dot(const uint8_t* codes, const c10::BFloat16* scale_zero, const int8_t* q,
                          const float* lane_scales, const float* group_terms, int64_t in) {
  Floats acc = zero_floats();
#ifdef QDOT_AVX512
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512i scale_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  __m256 terms = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; k += 2 * kStep) {  // 128 inputs: 4 groups
    __m512i packed = _mm512_loadu_si512(codes + k / 2);
    __m512i even = _mm512_and_si512(packed, low_nibbles);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
    __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(q + k));
    dots = _mm512_dpbusd_epi32(dots, odd, _mm512_loadu_si512(q + k + kStep));
    __m256 sz = bf16x8_to_floats(scale_zero + k / kBlock * 2);  // (scale, zero) of the 4 groups
    __m512 scales = _mm512_permutexvar_ps(scale_of_lane, _mm512_castps256_ps512(sz));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(scales, _mm512_loadu_ps(lane_scales + k / 8)), acc);
    terms = _mm256_fmadd_ps(sz, _mm256_loadu_ps(group_terms + k / kBlock * 2), terms);
  }
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(terms), _mm256_extractf128_ps(terms, 1));
#else
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const __m256i scale_of_lane = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  __m128 t = _mm_setzero_ps();
  for (int64_t k = 0; k < in; k += 2 * kStep) {  // 64 inputs: 2 groups
    __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k / 2));
    __m256i even = _mm256_and_si256(packed, low_nibbles);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
    __m256i pairs = _mm256_add_epi16(  // codes <= 15, |q| <= 127: no 16-bit overflow
        _mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k))),
        _mm256_maddubs_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k + kStep))));
    __m256i dots = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    __m128 sz = bf16x4_to_floats(scale_zero + k / kBlock * 2);  // (scale, zero) of the 2 groups
    __m256 scales = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sz), scale_of_lane);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(scales, _mm256_loadu_ps(lane_scales + k / 8)), acc);
    t = _mm_fmadd_ps(sz, _mm_loadu_ps(group_terms + k / kBlock * 2), t);
  }
#endif
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return sum_lanes(acc) + _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// ----------------------------------------------------------------------------- operators
void check_operands(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t in,
                    int64_t multiple, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), what, ": x must be a contiguous (rows, in) matrix, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              what, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), what, ": the weight must be contiguous");
  TORCH_CHECK(x.size(1) == in && in % multiple == 0, what, ": x has ", x.size(1), " inputs, the weight ", in,
              " (which must be a multiple of ", multiple, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == weight.size(0) && bias->is_contiguous(),
                what, ": the bias must be a contiguous vector of ", weight.size(0), " in x's dtype");
  }
}

// Runs row_dot(out_row, activation_row) for every (activation row, output row), the output rows
// split over PyTorch's threads; adds the bias and writes x's dtype.
template <typename T, typename RowDot>
void for_each_output(const at::Tensor& out, const c10::optional<at::Tensor>& bias, int64_t rows, RowDot row_dot) {
  const int64_t n_out = out.size(1);
  T* y = out.data_ptr<T>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t r = 0; r < rows; ++r) {
        float v = row_dot(n, r) + (b ? static_cast<float>(b[n]) : 0.f);
        y[r * n_out + n] = static_cast<T>(v);
      }
    }
  });
}

template <typename T>
void int8_linear_typed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& out) {
  const int64_t rows = x.size(0), in = x.size(1);
  Activations a = quantize_for_int8(x.data_ptr<T>(), rows, in);
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  for_each_output<T>(out, bias, rows, [&](int64_t n, int64_t r) {
    return s[n] * int8_row_dot(w + n * in, a.values.data() + r * in, a.lane_scales.data() + r * in / 4, a.offsets[r], in);
  });
}

template <typename T>
void int4_linear_typed(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_zero,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& out) {
  const int64_t rows = x.size(0), in = x.size(1), groups = in / kBlock;
  Activations a = quantize_for_int4(x.data_ptr<T>(), rows, in);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const c10::BFloat16* sz = scale_zero.data_ptr<c10::BFloat16>();
  for_each_output<T>(out, bias, rows, [&](int64_t n, int64_t r) {
    return int4_row_dot(c + n * in / 2, sz + n * groups * 2, a.values.data() + r * in,
                        a.lane_scales.data() + r * in / 8, a.group_terms.data() + r * groups * 2, in);
  });
}

template <typename Body>
void dispatch_activation_dtype(at::ScalarType dtype, Body body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kBFloat16: body(c10::BFloat16{}); break;
    default: body(c10::Half{}); break;
  }
}

// y (rows, out) = x (rows, in) @ (scale[:, None] * weight).T + bias, weight int8 (out, in), scale fp32 (out,).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2, "int8_linear: the weight must be int8 (out, in)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "int8_linear: the scale must be a contiguous float32 vector of ", weight.size(0));
  check_operands(x, weight, bias, weight.size(1), kStep, "int8_linear");
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  dispatch_activation_dtype(x.scalar_type(), [&](auto t) { int8_linear_typed<decltype(t)>(x, weight, scale, bias, out); });
  return out;
}

// y (rows, out) = x (rows, in) @ W.T + bias, W[o, k] = (code - 8) * scale + zero per group of 32 inputs;
// codes uint8 (out, in / 2), two per byte (the even input in the low nibble); scale_zero bf16 (out, in / 32, 2).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_zero,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2, "int4_linear: the codes must be uint8 (out, in / 2)");
  const int64_t in = codes.size(1) * 2;
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.is_contiguous() &&
                  scale_zero.dim() == 3 && scale_zero.size(0) == codes.size(0) && scale_zero.size(1) == in / kBlock &&
                  scale_zero.size(2) == 2,
              "int4_linear: scale_and_zero must be contiguous bfloat16 (out, in / 32, 2), got ", scale_zero.sizes());
  check_operands(x, codes, bias, in, 2 * kStep, "int4_linear");
  at::Tensor out = at::empty({x.size(0), codes.size(0)}, x.options());
  dispatch_activation_dtype(x.scalar_type(), [&](auto t) { int4_linear_typed<decltype(t)>(x, codes, scale_zero, bias, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY(QDOT_NAMESPACE, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor", &int8_linear);
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scale_and_zero, Tensor? bias) -> Tensor", &int4_linear);
  m.def("step_bytes() -> int", [] { return kStep; });
}
