// Fused fold of one candidate chunk into a running softmax (see els/softmax.py, RunningSoftmax.fold).
//
// The torch version makes seven passes over a chunk's logits (bias copy, product, max, subtract,
// floor, exp, weighted sums); each pass streams the whole chunk through memory. Here each query's
// row of logits is finished while it sits in L1/L2: one pass for the logits and their max, one for
// the weights and the sums. Same arithmetic as the torch version up to float rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr float kExpFloor = -80.0f;  // els.softmax.EXP_FLOOR

// e^x for x in [-80, 0] in float32 (Cephes' expf: Cody-Waite reduction by ln 2 and a degree-5
// polynomial, about 1 ulp). Plain arithmetic, so that GCC vectorises the loops that call it;
// x >= -80 keeps 2^n a normal number (no special cases).
inline float exp_neg(float x) {
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_neg(double x) { return std::exp(x); }

// One query's row of logits l [M] (the products q.c on entry, overwritten) folded into its state.
// Everything by value or __restrict pointer: the loops then vectorise without alias checks.
template <typename T>
inline void fold_row(T* __restrict l, const T* __restrict bias, const T alpha, const int64_t M,
                     const T* __restrict cen, const int64_t E1, const T* __restrict lm,
                     const int64_t* __restrict ids, T* __restrict run_max, T* __restrict acc,
                     const int64_t acc_stride, T* __restrict best_logit, int64_t* __restrict best_id,
                     T* __restrict sq) {
  const T floor_ = static_cast<T>(kExpFloor);
  const T ninf = -std::numeric_limits<T>::infinity();
  T mx = ninf;
#pragma omp simd reduction(max : mx)
  for (int64_t m = 0; m < M; ++m) {
    const T v = alpha * l[m] + bias[m];
    l[m] = v;
    mx = v > mx ? v : mx;
  }
  if (best_logit != nullptr) {
    // the dominant single candidate: logits without multiplicity; among exact ties the first
    // position (ids ascend within a chunk: the smallest id)
    T smax = mx;
    if (lm != nullptr) {
      smax = ninf;
#pragma omp simd reduction(max : smax)
      for (int64_t m = 0; m < M; ++m) {
        const T v = l[m] - lm[m];
        smax = v > smax ? v : smax;
      }
    }
    int64_t arg = 0;
    for (int64_t m = 0; m < M; ++m) {
      if ((lm != nullptr ? l[m] - lm[m] : l[m]) == smax) {
        arg = m;
        break;
      }
    }
    const int64_t first = ids[arg];
    if (smax > *best_logit || (smax == *best_logit && first < *best_id)) {
      *best_logit = smax;
      *best_id = first;
    }
  }
  const T new_max = *run_max > mx ? *run_max : mx;
  // clamp keeps exp(-inf - -inf) = nan away while a row has seen only padding
  const T safe = new_max > std::numeric_limits<T>::lowest() ? new_max : std::numeric_limits<T>::lowest();
  const T rescale = std::exp(*run_max - safe);
  *run_max = new_max;
  T sums[9];
  T wsum = 0, sqsum = 0;
  if (E1 == 2 && best_logit == nullptr) {  // one channel, no statistics: one fused loop
    T c0 = 0;
#pragma omp simd reduction(+ : c0, wsum)
    for (int64_t m = 0; m < M; ++m) {
      T x = l[m] - safe;
      x = x > floor_ ? x : floor_;
      const T w = exp_neg(x);
      c0 += w * cen[m];
      wsum += w;
    }
    sums[0] = c0;
  } else {
    // weights first (in place), then one dot product per channel
#pragma omp simd reduction(+ : wsum)
    for (int64_t m = 0; m < M; ++m) {
      T x = l[m] - safe;
      x = x > floor_ ? x : floor_;
      const T w = exp_neg(x);
      l[m] = w;
      wsum += w;
    }
    for (int64_t e = 0; e + 1 < E1; ++e) {
      T ce = 0;
      const T* __restrict cene = cen + e * M;
#pragma omp simd reduction(+ : ce)
      for (int64_t m = 0; m < M; ++m) ce += l[m] * cene[m];
      sums[e] = ce;
    }
    if (sq != nullptr) {
      // sum of squared weights over single candidates: a group of n copies adds n (w / n)^2
      if (lm != nullptr) {
#pragma omp simd reduction(+ : sqsum)
        for (int64_t m = 0; m < M; ++m) {
          const T inv = lm[m] == ninf ? T(0) : exp_neg(-lm[m]);
          sqsum += l[m] * l[m] * inv;
        }
      } else {
#pragma omp simd reduction(+ : sqsum)
        for (int64_t m = 0; m < M; ++m) sqsum += l[m] * l[m];
      }
    }
  }
  for (int64_t e = 0; e + 1 < E1; ++e) acc[e * acc_stride] = acc[e * acc_stride] * rescale + sums[e];
  acc[(E1 - 1) * acc_stride] = acc[(E1 - 1) * acc_stride] * rescale + wsum;
  if (sq != nullptr) *sq = *sq * rescale * rescale + sqsum;
}

template <typename T>
void fold_rows(const at::Tensor& dots, const at::Tensor& bias, const double alpha,
               const at::Tensor& centres, const at::Tensor& log_mult, const at::Tensor& ids,
               const at::Tensor& run_max, const at::Tensor& acc, const at::Tensor& best_logit,
               const at::Tensor& best_id, const at::Tensor& sq) {
  const int64_t G = dots.size(0), P = dots.size(1), M = dots.size(2);
  const int64_t sG = dots.stride(0), sP = dots.stride(1);
  const int64_t E1 = centres.size(1);
  const bool stats = best_logit.defined();
  T* const d_all = dots.data_ptr<T>();
  const T* const bias_all = bias.data_ptr<T>();
  const T* const cen_all = centres.data_ptr<T>();
  const T* const lm_all = log_mult.defined() ? log_mult.data_ptr<T>() : nullptr;
  const int64_t* const id_all = stats ? ids.data_ptr<int64_t>() : nullptr;
  T* const rmax = run_max.data_ptr<T>();
  T* const acc_all = acc.data_ptr<T>();
  T* const bl = stats ? best_logit.data_ptr<T>() : nullptr;
  int64_t* const bi = stats ? best_id.data_ptr<int64_t>() : nullptr;
  T* const sq_all = stats ? sq.data_ptr<T>() : nullptr;
  const T a = static_cast<T>(alpha);
  // rows are independent: the split among threads cannot change any row's rounding
  at::parallel_for(0, G * P, 8, [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / P, p = row % P;
      fold_row<T>(d_all + g * sG + p * sP, bias_all + g * M, a, M, cen_all + g * E1 * M, E1,
                  lm_all ? lm_all + g * M : nullptr, id_all, rmax + row,
                  acc_all + g * E1 * P + p, P, stats ? bl + row : nullptr,
                  stats ? bi + row : nullptr, stats ? sq_all + row : nullptr);
    }
  });
}

}  // namespace

// Folds logits = alpha * products + bias into the running state, in place (see
// RunningSoftmax.fold_products): products [G, P, M] (rows contiguous; overwritten), bias [G, M],
// centres [G, E + 1, M], log_mult [G, M] or None, ids [M] (with statistics), state: run_max [G, P],
// acc [G, E + 1, P], and with statistics best_logit, best_id, sq [G, P]; all of one dtype.
void fold_chunk(at::Tensor products, at::Tensor bias, double alpha, at::Tensor centres,
                c10::optional<at::Tensor> log_mult, c10::optional<at::Tensor> ids,
                at::Tensor run_max, at::Tensor acc, c10::optional<at::Tensor> best_logit,
                c10::optional<at::Tensor> best_id, c10::optional<at::Tensor> sq) {
  TORCH_CHECK(products.dim() == 3 && products.stride(2) == 1,
              "products must be [G, P, M] with contiguous rows");
  const int64_t G = products.size(0), P = products.size(1), M = products.size(2);
  TORCH_CHECK(centres.dim() == 3 && centres.size(0) == G && centres.size(2) == M &&
                  centres.size(1) >= 2 && centres.size(1) <= 9,  // els.native.MAX_CHANNELS
              "centres must be [G, E + 1, M] with 1 <= E <= 8");
  TORCH_CHECK(bias.size(0) == G && bias.size(-1) == M, "bias must be [G, M]");
  TORCH_CHECK(run_max.is_contiguous() && acc.is_contiguous(), "state must be contiguous");
  TORCH_CHECK(acc.size(0) == G && acc.size(1) == centres.size(1) && acc.size(2) == P,
              "acc must be [G, E + 1, P]");
  const bool stats = best_logit.has_value();
  TORCH_CHECK(!stats || (ids && best_id && sq && best_logit->is_contiguous() &&
                         best_id->is_contiguous() && sq->is_contiguous() && ids->numel() == M),
              "statistics need ids [M], best_id and sq");
  for (const at::Tensor& t : {bias, centres, run_max, acc}) {
    TORCH_CHECK(t.scalar_type() == products.scalar_type() && t.device().is_cpu(),
                "all tensors must be CPU tensors of one floating dtype");
  }
  if (M == 0 || G * P == 0) return;  // nothing to fold (and no ids[0] to read)
  at::Tensor none;
  AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "fold_chunk", [&] {
    fold_rows<scalar_t>(products, bias.contiguous(), alpha, centres.contiguous(),
                        log_mult ? log_mult->contiguous() : none,
                        stats ? ids->to(at::kLong).contiguous() : none, run_max, acc,
                        stats ? *best_logit : none, stats ? *best_id : none,
                        stats ? *sq : none);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fold_chunk", &fold_chunk); }
