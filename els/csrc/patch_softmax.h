// The patch-machine kernel: for every query pixel p, a streaming softmax over the candidates
// p + d of every training image, d from the machine's displacement rectangle (els/machines.py).
//
// A machine is a list of blocks (Q, R, D): query pixels p in rectangle Q take the candidate patches
// centred at c = p + d for d in rectangle D with c in rectangle R. Pixels of different blocks never
// share state. For one training image y, one row displacement dy and one query row r, the dot
// products of all queries of the row with all their candidates come from
//     A(u, e) = sum_{i < k} sum_ch xq(r + i, u) * y(r + dy + i, u + dx_e)        (a vertical window)
//     T(p, e) = sum_{o < k} A(p + o, e)                                            (a horizontal window)
// so a (query, candidate) pair costs O(1) work whatever k is, and the lanes run over displacements
// dx_e: contiguous memory, no gather. The logit of candidate c is
//     (2 a <q, c> - a^2 |c|^2) / (2 b^2)   (the query's own |q|^2 cancels in the softmax),
// folded into a per-lane running state with one max per query and block of lanes, so each pair
// costs one exp.
//
// Work items are (query image, block, fixed chunk of training images); their partial softmax states
// are merged in chunk order. Neither the chunks nor the order depend on the thread count or the
// batch, so a batch equals its images alone bit for bit and any number of threads gives the same
// result.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace els_kernel {

constexpr int64_t kImageChunk = 96;  // training images per work item (fixed: results never depend on it)
// a query's running maximum is raised only when a logit exceeds it by this much (e^12 = 1.6e5
// keeps every sum far from overflow); most blocks of lanes then need no horizontal maximum
constexpr double kRescaleSlack = 12.0;
// Candidates whose logit is more than skip_below<T>() under the query's running maximum are not
// folded. The maximum's own weight is >= 1 in the sum and the maximum only grows, so a skipped
// weight is below e^-skip of the sum; a machine has at most N H W candidates per query (6e7 for
// 60000 images of 32x32), so all skipped weights together stay below
//   float32: 6e7 * e^-40 = 2.5e-10 < 2^-24 (6e-8), the float32 resolution of the sum;
//   float64: 6e7 * e^-60 = 5.2e-19 < 2^-53 (1.1e-16), the float64 resolution.
// A skipped candidate is never the dominant one either: the running maximum is a folded logit.
template <typename T>
constexpr double skip_below() {
  return sizeof(T) == 4 ? 40.0 : 60.0;
}

// one vector register: 64 bytes with AVX-512, else 32 (AVX2) -- the build is per CPU type
#ifdef __AVX512F__
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int n = kVecBytes / 4;
  // exp(x) for x below this is not evaluated below it: e^-80 = 1.8e-35, so each such weight is
  // under 2^-100 of the sum (which is >= 1: the maximum's weight is 1); 2^76 of them would still
  // stay below float32 resolution of the sum, so flooring never changes a float32 result.
  static constexpr float floor = -80.0f;
};
template <>
struct Lanes<double> {
  static constexpr int n = kVecBytes / 8;
  // e^-700 = 1e-304: below float64 resolution of the sum for any realistic candidate count.
  static constexpr double floor = -700.0;
};

// e^x for x in [floor, 0]: Cody-Waite reduction by ln 2 and a polynomial (float32: Cephes' expf,
// about 1 ulp; float64: degree-12 Taylor on |r| <= ln2/2, under 1e-16 relative). Branch-free plain
// arithmetic so that GCC vectorises the lane loops that call it.
inline float exp_neg(float x) {
  x = x < Lanes<float>::floor ? Lanes<float>::floor : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);  // as vexp_neg
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

inline double exp_neg(double x) {
  x = x < Lanes<double>::floor ? Lanes<double>::floor : x;
  const double n = __builtin_floor(x * 1.4426950408889634 + 0.5);
  double r = x - n * 0.6931471803691238;
  r = r - n * 1.9082149292705877e-10;
  double p = 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One vector of lanes (kVecBytes), GCC/Clang vector extensions, so the hot
// loops below are written once for both types with no masks or trip-count guesses left to the
// auto-vectoriser.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef int32_t itype __attribute__((vector_size(kVecBytes)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef int64_t itype __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using vec_t = typename Vec<T>::type;
template <typename T>
using ivec_t = typename Vec<T>::itype;
// the integer of a lane of ivec_t<T>: candidate indices in the provenance statistics
template <typename T>
using lane_int = typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type;
template <>
struct Vec<int32_t> {
  typedef int32_t type __attribute__((vector_size(kVecBytes)));
};
template <>
struct Vec<int64_t> {
  typedef int64_t type __attribute__((vector_size(kVecBytes)));
};

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
inline vec_t<T> vsplat(T x) {
  return vec_t<T>{} + x;
}
template <typename T>
inline T hmax(vec_t<T> v) {
  T m = v[0];
  for (int l = 1; l < Lanes<T>::n; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
template <typename T>
inline T hsum(vec_t<T> v) {
  T s = v[0];
  for (int l = 1; l < Lanes<T>::n; ++l) s += v[l];
  return s;
}

// exp_neg on a vector: the same arithmetic as the scalar versions above, lane by lane
inline vec_t<float> vexp_neg(vec_t<float> x) {
  typedef vec_t<float> V;
  typedef ivec_t<float> I;
  x = x < Lanes<float>::floor ? vsplat<float>(Lanes<float>::floor) : x;
  const V y = x * 1.44269504088896341f + 0.5f;
#ifdef __AVX512F__
  const V n = (V)_mm512_roundscale_ps((__m512)y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  V n = __builtin_convertvector(__builtin_convertvector(y, I), V);  // truncation...
  n = n > y ? n - 1.0f : n;                                         // ...to floor
#endif
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = vsplat<float>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
#ifdef __AVX512F__
  return (V)_mm512_scalef_ps((__m512)p, (__m512)n);  // p 2^n, exactly as the product below
#else
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
#endif
}

inline vec_t<double> vexp_neg(vec_t<double> x) {
  typedef vec_t<double> V;
  typedef ivec_t<double> I;
  x = x < Lanes<double>::floor ? vsplat<double>(Lanes<double>::floor) : x;
  const V y = x * 1.4426950408889634 + 0.5;
#ifdef __AVX512F__
  const V n = (V)_mm512_roundscale_pd((__m512d)y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  V n = __builtin_convertvector(__builtin_convertvector(y, I), V);
  n = n > y ? n - 1.0 : n;
#endif
  V r = x - n * 0.6931471803691238;
  r = r - n * 1.9082149292705877e-10;
  V p = vsplat<double>(1.0 / 479001600.0);
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
#ifdef __AVX512F__
  return (V)_mm512_scalef_pd((__m512d)p, (__m512d)n);
#else
  const I bits = (__builtin_convertvector(n, I) + 1023) << 52;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
#endif
}

struct Rect {
  int64_t r0, r1, c0, c1;  // inclusive
};

// what a run records beside the mean: nothing, the sum of squared weights (n_eff), or that and
// each query's dominant candidate (its first largest logit: image, row, col, weight)
enum Stats : int { kNoStats = 0, kNeff = 1, kSources = 2 };

struct Block {
  Rect q, r, d;  // query pixels, candidate centres, displacements
};

template <typename T>
struct Inputs {
  const T* xq;  // [B, C, Hq, Wq]: queries padded by h
  const T* y;   // [N, C, Hy, Wy]: training images, zero-padded: pixel (r, c) at (r + yo, c + xo)
  const T* cn;  // [N, H, Wn]: candidate squared norms at every centre (Wn >= W + VL)
  int64_t N, C, H, W, Hq, Wq, Hy, Wy, Wn, k, yo, xo;
  T alpha, beta;  // logit = alpha * <q, c> - beta * |c|^2
};

struct Outputs {
  void* mean;  // [B, C, H, W] (T)
  void* best_w;
  void* n_eff;  // [B, H, W] (T)
  int64_t* best_j;
  int64_t* best_r;
  int64_t* best_c;  // [B, H, W]
};

// columns of the lane rows: as many displacements as the queries of a row read, in whole vectors
template <typename T>
inline int64_t lane_width(const Block& blk) {
  constexpr int VL = Lanes<T>::n;
  int64_t need = VL;
  for (int64_t pc = blk.q.c0; pc <= blk.q.c1; ++pc) {
    const int64_t lo = std::max(blk.d.c0, blk.r.c0 - pc), hi = std::min(blk.d.c1, blk.r.c1 - pc);
    if (lo <= hi) need = std::max(need, lo - blk.d.c0 + (hi - lo + VL) / VL * VL);
  }
  return (need + VL - 1) / VL * VL;
}

// true if any lane of a comparison's result is set: one test instruction (a loop over the lanes
// costs more than the fold it guards)
template <typename T>
inline bool any_lane(ivec_t<T> mask) {
#if defined(__AVX512F__)
  __m512i m;
  std::memcpy(&m, &mask, sizeof m);
  return _mm512_test_epi32_mask(m, m) != 0;
#elif defined(__AVX2__)
  __m256i m;
  std::memcpy(&m, &mask, sizeof m);
  return !_mm256_testz_si256(m, m);
#else
  for (int l = 0; l < Lanes<T>::n; ++l)
    if (mask[l]) return true;
  return false;
#endif
}

// the columns of y (relative to its column offset xo) that the kernel reads for a block:
// [first, last], so callers can check their padding
template <typename T>
inline std::pair<int64_t, int64_t> column_reach(const Block& blk, int64_t k) {
  constexpr int VL = Lanes<T>::n;
  const int64_t h = k / 2, width = lane_width<T>(blk);
  const int64_t Wu = blk.q.c1 - blk.q.c0 + k;
  const int64_t base = blk.q.c0 + blk.d.c0 - h;  // A's column u, displacement lane e: base + u + e
  int64_t first = base, last = base + Wu - 1 + width - 1;
  // centre reads: candidate columns from the first one of a query, whole vectors
  for (int64_t pc = blk.q.c0; pc <= blk.q.c1; ++pc) {
    const int64_t lo = std::max(blk.d.c0, blk.r.c0 - pc), hi = std::min(blk.d.c1, blk.r.c1 - pc);
    if (lo <= hi) last = std::max(last, pc + lo + (hi - lo + VL) / VL * VL - 1);
  }
  return {first, last};
}

// per query of a block, one work item's softmax state reduced over its lanes
template <typename T>
struct Partial {
  std::vector<T> m, s, acc, sq, best;  // [nq], [nq], [nq * C], [nq], [nq]
  std::vector<int32_t> bj, br, bc;      // [nq]
};

// A(u, ev .. ev + NV vectors) summed afresh over (channel, row i < k) in registers, in the same
// order of additions as moving the window, so every A is the same to the bit
template <typename T, int NV, typename XRow, typename YRow>
inline void fresh_window(T* Au, int64_t u, int64_t ev, int64_t r, int64_t k, int64_t C,
                         const XRow& xrow, const YRow& yrow) {
  constexpr int VL = Lanes<T>::n;
  vec_t<T> a[NV] = {};
  for (int64_t ch = 0; ch < C; ++ch)
    for (int64_t i = r; i < r + k; ++i) {
      const T xv = xrow(ch, i)[u];
      const T* yr = yrow(ch, i) + u + ev;
      for (int v = 0; v < NV; ++v) a[v] += xv * vload(yr + v * VL);
    }
  for (int v = 0; v < NV; ++v) vstore(Au + ev + v * VL, a[v]);
}

// T(p, e) = sum_{o < k} A(p + o, e) for the NV vectors of lanes from ev, running along the row
// (NV independent chains of additions)
template <typename T, int NV>
inline void row_window(const T* A, T* Tb, int64_t width, int64_t ev, int64_t k, int64_t Lq) {
  constexpr int VL = Lanes<T>::n;
  vec_t<T> t[NV] = {};
  for (int64_t o = 0; o < k; ++o)
    for (int v = 0; v < NV; ++v) t[v] += vload(A + o * width + ev + v * VL);
  for (int v = 0; v < NV; ++v) vstore(Tb + ev + v * VL, t[v]);
  for (int64_t p = 1; p < Lq; ++p) {
    const T* ai = A + (p + k - 1) * width + ev;
    const T* ao = A + (p - 1) * width + ev;
    for (int v = 0; v < NV; ++v) {
      t[v] += vload(ai + v * VL) - vload(ao + v * VL);
      vstore(Tb + p * width + ev + v * VL, t[v]);
    }
  }
}

// NC > 0: the channel count, known when compiled, so that a query's weighted centre sums stay in
// registers across its vectors of candidates (NC = 0: any C, summed in memory)
template <typename T, int STATS, int NC>
void run_item(const Inputs<T>& in, int64_t b, const Block& blk, int64_t j0, int64_t j1,
              const T* seed, Partial<T>& part) {
  constexpr int VL = Lanes<T>::n;
  const int64_t C = NC > 0 ? NC : in.C, k = in.k, h = k / 2;
  const Rect& Q = blk.q;
  const Rect& R = blk.r;
  const Rect& D = blk.d;
  const int64_t Lq = Q.c1 - Q.c0 + 1, nq = (Q.r1 - Q.r0 + 1) * Lq;
  const int64_t width = lane_width<T>(blk);
  const int64_t Wu = Lq + k - 1;  // padded query columns of a row of queries
  // per padded query column u, the vectors of displacements that some query using u reads; the
  // rest of A stays zero (it is never written), so the running sums along the row stay exact
  std::vector<int64_t> ev_lo(Wu, 0), ev_hi(Wu, 0);
  for (int64_t u = 0; u < Wu; ++u) {
    int64_t lo_e = width, hi_e = 0;
    for (int64_t pc = std::max(Q.c0, Q.c0 + u - k + 1); pc <= std::min(Q.c1, Q.c0 + u); ++pc) {
      const int64_t lo = std::max(D.c0, R.c0 - pc), hi = std::min(D.c1, R.c1 - pc);
      if (lo > hi) continue;
      lo_e = std::min(lo_e, (lo - D.c0) / VL * VL);
      hi_e = std::max(hi_e, lo - D.c0 + (hi - lo + VL) / VL * VL);
    }
    ev_lo[u] = lo_e;
    ev_hi[u] = std::max(lo_e, hi_e);
  }
  typedef vec_t<T> V;
  std::vector<T> A(Wu * width), Tb(Lq * width);
  const T lowest = -std::numeric_limits<T>::infinity();
  const T slack = T(kRescaleSlack), skip = T(skip_below<T>());
  typedef ivec_t<T> IV;
  V lane_index;
  IV lane_col;
  for (int l = 0; l < VL; ++l) {
    lane_index[l] = T(l);
    lane_col[l] = l;
  }
  // seed: each query's running maximum from the image's first chunk (see run), else -inf
  std::vector<T> m = seed ? std::vector<T>(seed, seed + nq) : std::vector<T>(nq, lowest);
  std::vector<T> s(nq * VL, T(0)), acc(nq * C * VL, T(0));
  const int64_t nsq = STATS >= kNeff ? nq * VL : 0, nbest = STATS >= kSources ? nq * VL : 0;
  std::vector<T> sq(nsq, T(0)), bv(nbest, lowest);
  std::vector<lane_int<T>> bj(nbest, 0), br(nbest, 0), bc(nbest, 0);
  const T* xb = in.xq + b * C * in.Hq * in.Wq;

  for (int64_t j = j0; j < j1; ++j) {
    const T* yj = in.y + j * C * in.Hy * in.Wy;
    const T* cnj = in.cn + j * in.H * in.Wn;
    for (int64_t dy = D.r0; dy <= D.r1; ++dy) {
      const int64_t rlo = std::max(Q.r0, R.r0 - dy), rhi = std::min(Q.r1, R.r1 - dy);
      if (rlo > rhi) continue;
      // padded query row i against the candidates' row: y(i + dy - h, Q.c0 + u + D.c0 + e - h)
      auto xrow = [&](int64_t ch, int64_t i) { return xb + (ch * in.Hq + i) * in.Wq + Q.c0; };
      auto yrow = [&](int64_t ch, int64_t i) {
        return yj + (ch * in.Hy + i + dy - h + in.yo) * in.Wy + Q.c0 + D.c0 - h + in.xo;
      };
      for (int64_t r = rlo; r <= rhi; ++r) {
        // A(u, e): the vertical window (padded query rows r .. r + k - 1), summed afresh for the
        // first row, then moved down one row at a time
        if (r == rlo) {
          for (int64_t u = 0; u < Wu; ++u) {
            T* Au = A.data() + u * width;
            int64_t ev = ev_lo[u];
            for (; ev + 4 * VL <= ev_hi[u]; ev += 4 * VL)
              fresh_window<T, 4>(Au, u, ev, r, k, C, xrow, yrow);
            for (; ev < ev_hi[u]; ev += VL) fresh_window<T, 1>(Au, u, ev, r, k, C, xrow, yrow);
          }
        } else {
          for (int64_t ch = 0; ch < C; ++ch) {
            const T* x_out = xrow(ch, r - 1);
            const T* y_out = yrow(ch, r - 1);
            const T* x_in = xrow(ch, r + k - 1);
            const T* y_in = yrow(ch, r + k - 1);
            for (int64_t u = 0; u < Wu; ++u) {
              const T xo = x_out[u], xi = x_in[u];
              T* Au = A.data() + u * width;
              for (int64_t ev = ev_lo[u]; ev < ev_hi[u]; ev += VL)
                vstore(Au + ev, vload(Au + ev) + (xi * vload(y_in + u + ev) -
                                                  xo * vload(y_out + u + ev)));
            }
          }
        }
        // T(p, e) = sum_{o < k} A(p + o, e), running along the row, four vectors at a time
        {
          int64_t ev = 0;
          for (; ev + 4 * VL <= width; ev += 4 * VL)
            row_window<T, 4>(A.data(), Tb.data(), width, ev, k, Lq);
          for (; ev < width; ev += VL) row_window<T, 1>(A.data(), Tb.data(), width, ev, k, Lq);
        }
        // fold each query of the row: lanes over its candidates' columns
        const int64_t cr = r + dy;
        const T* cnrow = cnj + cr * in.Wn;
        for (int64_t p = 0; p < Lq; ++p) {
          const int64_t pc = Q.c0 + p;
          const int64_t lo = std::max(D.c0, R.c0 - pc), hi = std::min(D.c1, R.c1 - pc);
          if (lo > hi) continue;
          const int64_t n = hi - lo + 1, cc0 = pc + lo;
          const T* Tp = Tb.data() + p * width + (lo - D.c0);
          const int64_t q = (r - Q.r0) * Lq + p;
          constexpr int kMaxVec = 512 / kVecBytes;  // candidates per query row: images up to 128 wide
          V lg[kMaxVec];
          const int64_t nv = (n + VL - 1) / VL;
          V top = vsplat<T>(lowest);
          for (int64_t v = 0; v < nv; ++v) {
            V l = in.alpha * vload(Tp + v * VL) - in.beta * vload(cnrow + cc0 + v * VL);
            l = lane_index < T(n - v * VL) ? l : vsplat<T>(lowest);
            lg[v] = l;
            top = top > l ? top : l;
          }
          T mq = m[q];
          T* sum_q = s.data() + q * VL;
          T* acq = acc.data() + q * C * VL;
          if (any_lane<T>(top > mq + slack)) {  // a new maximum (or the first): rescale to it
            const T bm = hmax<T>(top);
            const T f = mq == lowest ? T(0) : exp_neg(mq - bm);
            vstore(sum_q, vload(sum_q) * f);
            for (int64_t ch = 0; ch < C; ++ch) vstore(acq + ch * VL, vload(acq + ch * VL) * f);
            if (STATS >= kNeff) vstore(sq.data() + q * VL, vload(sq.data() + q * VL) * (f * f));
            m[q] = mq = bm;
          }
          if (!any_lane<T>(top > mq - skip)) continue;  // every weight below e^-skip: see skip_below
          V sum = vload(sum_q);
          // n_eff's sum of squared weights in a register too: in memory, each folded vector would
          // wait for the store of the one before
          T* sq_q = sq.data() + (STATS >= kNeff ? q * VL : 0);
          V sq_reg = STATS >= kNeff ? vload(sq_q) : V{};
          V acc_reg[NC > 0 ? NC : 1];
          for (int ch = 0; ch < NC; ++ch) acc_reg[ch] = vload(acq + ch * VL);
          for (int64_t v = 0; v < nv; ++v) {
            if (!any_lane<T>(lg[v] > mq - skip)) continue;  // see skip_below
            V w = vexp_neg(lg[v] - mq);
            if (v == nv - 1) w = lane_index < T(n - v * VL) ? w : V{};  // lanes past the row
            sum += w;
            const T* yc = yj + (cr + in.yo) * in.Wy + cc0 + in.xo + v * VL;
            if (NC > 0) {
              for (int ch = 0; ch < NC; ++ch)
                acc_reg[ch] += w * vload(yc + ch * in.Hy * in.Wy);
            } else {
              for (int64_t ch = 0; ch < C; ++ch)
                vstore(acq + ch * VL, vload(acq + ch * VL) + w * vload(yc + ch * in.Hy * in.Wy));
            }
            if (STATS >= kNeff) sq_reg += w * w;
            if (STATS >= kSources) {
              // the lane's first largest logit and its candidate (lanes past the row hold -inf)
              T* bvq = bv.data() + q * VL;
              lane_int<T>* bjq = bj.data() + q * VL;
              lane_int<T>* brq = br.data() + q * VL;
              lane_int<T>* bcq = bc.data() + q * VL;
              const IV better = lg[v] > vload(bvq);
              vstore(bvq, better ? lg[v] : vload(bvq));
              vstore(bjq, better ? vsplat<lane_int<T>>(lane_int<T>(j)) : vload(bjq));
              vstore(brq, better ? vsplat<lane_int<T>>(lane_int<T>(cr)) : vload(brq));
              vstore(bcq, better ? lane_col + lane_int<T>(cc0 + v * VL) : vload(bcq));
            }
          }
          for (int ch = 0; ch < NC; ++ch) vstore(acq + ch * VL, acc_reg[ch]);
          if (STATS >= kNeff) vstore(sq_q, sq_reg);
          vstore(sum_q, sum);
        }
      }
    }
  }
  // reduce the lanes (in lane order) into the item's partial state
  part.m = m;
  part.s.assign(nq, T(0));
  part.acc.assign(nq * C, T(0));
  if (STATS >= kNeff) part.sq.assign(nq, T(0));
  if (STATS >= kSources) {
    part.best.assign(nq, lowest);
    part.bj.assign(nq, 0);
    part.br.assign(nq, 0);
    part.bc.assign(nq, 0);
  }
  for (int64_t q = 0; q < nq; ++q) {
    for (int l = 0; l < VL; ++l) part.s[q] += s[q * VL + l];
    for (int64_t ch = 0; ch < C; ++ch)
      for (int l = 0; l < VL; ++l) part.acc[q * C + ch] += acc[(q * C + ch) * VL + l];
    if (STATS >= kNeff)
      for (int l = 0; l < VL; ++l) part.sq[q] += sq[q * VL + l];
    if (STATS >= kSources) {
      for (int l = 0; l < VL; ++l) {
        const int64_t i = q * VL + l;
        // the largest logit; among equal ones the smallest (image, row, col): the first candidate
        const bool better =
            bv[i] > part.best[q] ||
            (bv[i] == part.best[q] && std::make_tuple(bj[i], br[i], bc[i]) <
                                          std::make_tuple(part.bj[q], part.br[q], part.bc[q]));
        if (better) {
          part.best[q] = bv[i];
          part.bj[q] = bj[i];
          part.br[q] = br[i];
          part.bc[q] = bc[i];
        }
      }
    }
  }
}

// merge the partial states of one (image, block) in chunk order and write its pixels
template <typename T, int STATS>
void write_block(const Inputs<T>& in, const Outputs& out, int64_t b, const Block& blk,
                 const Partial<T>* parts, int64_t nparts) {
  const int64_t C = in.C, H = in.H, W = in.W, Lq = blk.q.c1 - blk.q.c0 + 1;
  const int64_t nq = (blk.q.r1 - blk.q.r0 + 1) * Lq;
  const T lowest = -std::numeric_limits<T>::infinity();
  T* mean = static_cast<T*>(out.mean);
  std::vector<T> acc(C);
  for (int64_t q = 0; q < nq; ++q) {
    T M = lowest;
    for (int64_t c = 0; c < nparts; ++c) M = std::max(M, parts[c].m[q]);
    T tot = 0, s2 = 0, best = lowest;
    int32_t lj = 0, lr = 0, lc = 0;
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t c = 0; c < nparts; ++c) {
      const Partial<T>& pc = parts[c];
      if (pc.m[q] == lowest) continue;
      const T f = exp_neg(pc.m[q] - M);
      tot += f * pc.s[q];
      for (int64_t ch = 0; ch < C; ++ch) acc[ch] += f * pc.acc[q * C + ch];
      if (STATS >= kNeff) s2 += f * f * pc.sq[q];
      if (STATS >= kSources) {
        if (pc.best[q] > best) {  // chunks in image order: a tie keeps the earlier image
          best = pc.best[q];
          lj = pc.bj[q];
          lr = pc.br[q];
          lc = pc.bc[q];
        }
      }
    }
    const int64_t pix = (blk.q.r0 + q / Lq) * W + blk.q.c0 + q % Lq;
    for (int64_t ch = 0; ch < C; ++ch) mean[(b * C + ch) * H * W + pix] = acc[ch] / tot;
    const int64_t o = b * H * W + pix;
    if (STATS >= kNeff) static_cast<T*>(out.n_eff)[o] = tot * tot / s2;
    if (STATS >= kSources) {
      static_cast<T*>(out.best_w)[o] = exp_neg(best - M) / tot;
      out.best_j[o] = lj;
      out.best_r[o] = lr;
      out.best_c[o] = lc;
    }
  }
}

template <typename T, int STATS>
void run_item_of(const Inputs<T>& in, int64_t b, const Block& blk, int64_t j0, int64_t j1,
                 const T* seed, Partial<T>& part) {
  if (in.C == 1)
    run_item<T, STATS, 1>(in, b, blk, j0, j1, seed, part);
  else if (in.C == 3)
    run_item<T, STATS, 3>(in, b, blk, j0, j1, seed, part);
  else
    run_item<T, STATS, 0>(in, b, blk, j0, j1, seed, part);
}

template <typename T>
void run(const Inputs<T>& in, const Outputs& out, int64_t B, const std::vector<Block>& blocks,
         Stats stats, int threads) {
  const int64_t nchunks = (in.N + kImageChunk - 1) / kImageChunk;
  const int64_t nb = int64_t(blocks.size()), items = B * nb * nchunks;
  std::vector<Partial<T>> parts(items);
  auto item = [&](int64_t i, const T* seed) {
    const int64_t c = i % nchunks, blk = (i / nchunks) % nb, b = i / (nchunks * nb);
    const int64_t j0 = c * kImageChunk, j1 = std::min(in.N, j0 + kImageChunk);
    if (stats == kSources)
      run_item_of<T, kSources>(in, b, blocks[blk], j0, j1, seed, parts[i]);
    else if (stats == kNeff)
      run_item_of<T, kNeff>(in, b, blocks[blk], j0, j1, seed, parts[i]);
    else
      run_item_of<T, kNoStats>(in, b, blocks[blk], j0, j1, seed, parts[i]);
  };
  // The first chunk of every (image, block) runs first; its final running maxima seed the other
  // chunks. Started at -inf, each chunk would fold its first candidates for nothing while its
  // maximum climbs (at low noise most folded weights end up far below the final maximum). A seed
  // is a folded logit of the query, so it never exceeds the query's final maximum and the bound
  // of skip_below holds unchanged. The seeds depend only on the first chunk, never on the thread
  // count or the batch.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < B * nb; ++i) item(i * nchunks, nullptr);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < items; ++i)
    if (i % nchunks) item(i, parts[i - i % nchunks].m.data());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < B * nb; ++i) {
    const Partial<T>* p = parts.data() + i * nchunks;
    if (stats == kSources)
      write_block<T, kSources>(in, out, i / nb, blocks[i % nb], p, nchunks);
    else if (stats == kNeff)
      write_block<T, kNeff>(in, out, i / nb, blocks[i % nb], p, nchunks);
    else
      write_block<T, kNoStats>(in, out, i / nb, blocks[i % nb], p, nchunks);
  }
}

}  // namespace els_kernel
