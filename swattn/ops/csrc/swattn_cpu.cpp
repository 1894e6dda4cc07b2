// swattn's CPU kernel: exact sliding-window attention, forward and backward.
//
// Work item = (batch row, kv head, block of queries). The query rows of all heads that
// share one kv head are folded into the rows of one matrix (grouped-query attention without
// repeating K/V). For each key range the planner (plan.py) says the block must visit:
//   S = scale * Q K^T
//   one fused pass per row: soft-cap, mask, running max, exp, running sum
//   Acc = corr * Acc + P V
// so the only score memory is one (rows x block_k) tile per thread; all arithmetic is fp32.
// Backward recomputes the tiles from the saved log-sum-exp (flash-attention's approach) and
// accumulates dK/dV per work item. Where the build has AVX-512, the products run on our own
// register-blocked kernels ("native" paths below: fp32 forward and backward on FMAs, bf16
// forward and backward on AVX512_BF16 pair products); elsewhere, and for fp16, on BLAS's sgemm
// (MKL on x86; one thread per work item), bf16/fp16 inputs converted tile by tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastmath.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

extern "C" {
// BLAS as linked into libtorch_cpu (MKL on x86): column-major Fortran sgemm, and MKL's
// per-thread thread count (Fortran binding; weak, so a build without MKL still loads).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
__attribute__((weak)) int mkl_set_num_threads_local_(const int* nt);
}

namespace swattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row-major C = alpha * op(A) op(B) + beta * C, through column-major sgemm on transposes.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ca = ta ? 'T' : 'N';
  const char cb = tb ? 'T' : 'N';
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
  sgemm_(&cb, &ca, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// With few rows (decoding: one query per head) a BLAS call packs more than it computes;
// these stream each key and value row once instead. s = scale * Q K^T, (rows x kn).
constexpr int64_t kSmallRows = 8;

inline void small_scores(int64_t rows, int64_t kn, int64_t d, float scale, const float* q, const float* k,
                         float* s) {
  for (int64_t j = 0; j < kn; ++j) {
    const float* kj = k + j * d;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * d;
      float acc = 0.0f;
      for (int64_t e = 0; e < d; ++e) acc += qr[e] * kj[e];
      s[r * kn + j] = scale * acc;
    }
  }
}

// acc += P V for few rows: acc (rows x d), p (rows x kn), v (kn x d).
inline void small_pv(int64_t rows, int64_t kn, int64_t d, const float* p, const float* v, float* acc) {
  for (int64_t j = 0; j < kn; ++j) {
    const float* vj = v + j * d;
    for (int64_t r = 0; r < rows; ++r) {
      const float w = p[r * kn + j];
      if (w == 0.0f) continue;  // masked keys
      float* ar = acc + r * d;
      for (int64_t e = 0; e < d; ++e) ar[e] += w * vj[e];
    }
  }
}

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n, float mul) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * mul);
}

// A tile of keys or values as fp32: a pointer into the input for float, else a converted copy.
template <typename T>
inline const float* tile(const T* src, std::vector<float>& buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, buf.data(), n);
    return buf.data();
  }
}

// Everything the kernels need to know about one call.
struct Problem {
  int64_t B, H, Hkv, G, Lq, Lk, D;
  int64_t window;  // <= 0: full causal attention
  float softcap;   // <= 0: none
  float scale;
  int64_t block_q, n_qblocks, max_kn;
  // K/V element strides of batch and head: a cache may hand over a prefix of a larger
  // buffer; within a head the keys are contiguous rows of D.
  int64_t k_sb, k_sh, v_sb, v_sh;
  const int64_t* q_pos;  // (B, Lq) or nullptr: queries are the last Lq of the keys
  const int64_t* k_pos;  // (B, Lk) or nullptr
  const int64_t* block_ptr;  // (n_qblocks + 1): CSR index into ranges
  const int64_t* ranges;     // (n_ranges, 2): key ranges [start, stop) per query block

  int64_t q_position(int64_t b, int64_t i) const {
    return q_pos ? q_pos[b * Lq + i] : Lk - Lq + i;
  }
};

// The keys of [j0, j1) that a query at position p sees form, without positions, the interval
// [lo, hi) relative to j0; with positions `exact` is set and the caller tests each key.
struct RowMask {
  int64_t lo, hi;
  bool exact;
};

// Always 0 <= lo <= hi <= j1 - j0: a row whose window starts past the tile's end (a query
// block taller than a key tile) gets an empty range, never one past the tile's row of scores.
inline RowMask row_mask(const Problem& pb, int64_t p, int64_t j0, int64_t j1) {
  if (pb.k_pos) return {0, j1 - j0, true};
  const int64_t lo = std::min(j1, pb.window > 0 ? std::max(j0, p - pb.window + 1) : j0);
  const int64_t hi = std::max(lo, std::min(j1, p + 1));
  return {lo - j0, hi - j0, false};
}

inline bool key_visible(int64_t kp, int64_t p, int64_t window) {
  return kp >= 0 && kp <= p && (window <= 0 || kp > p - window);
}

// Soft-caps s[lo:hi] in place; keeps tanh's value in t (for the backward) when t is given.
inline void apply_softcap(float* s, float* t, int64_t lo, int64_t hi, float cap) {
  const float inv = 1.0f / cap;
  if (t) {
    for (int64_t j = lo; j < hi; ++j) {
      const float th = fast_tanh(s[j] * inv);
      t[j] = th;
      s[j] = cap * th;
    }
  } else {
    for (int64_t j = lo; j < hi; ++j) s[j] = cap * fast_tanh(s[j] * inv);
  }
}

// Turns a row of scores into exp(s - m) over the visible keys, zero elsewhere; returns the sum.
inline float exp_row(float* s, int64_t kn, const RowMask& rm, const int64_t* kp, int64_t p,
                     int64_t window, float m) {
  float sum = 0.0f;
  if (rm.exact) {
    for (int64_t j = 0; j < kn; ++j) {
      const float e = fast_exp(s[j] - m);
      const float v = key_visible(kp[j], p, window) ? e : 0.0f;
      s[j] = v;
      sum += v;
    }
    return sum;
  }
  std::fill(s, s + rm.lo, 0.0f);
  for (int64_t j = rm.lo; j < rm.hi; ++j) {
    const float v = fast_exp(s[j] - m);
    s[j] = v;
    sum += v;
  }
  std::fill(s + rm.hi, s + kn, 0.0f);
  return sum;
}

// Max over the visible keys of a row. Eight independent lanes so that the compiler
// vectorises it (a single running max is a dependency chain it will not reorder).
inline float row_max(const float* s, const RowMask& rm, const int64_t* kp, int64_t p, int64_t window) {
  constexpr int kLanes = 8;
  float lane[kLanes];
  for (int u = 0; u < kLanes; ++u) lane[u] = kNegInf;
  int64_t j = rm.lo;
  for (; j + kLanes <= rm.hi; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const float v = (!rm.exact || key_visible(kp[j + u], p, window)) ? s[j + u] : kNegInf;
      lane[u] = v > lane[u] ? v : lane[u];
    }
  }
  float mx = kNegInf;
  for (int u = 0; u < kLanes; ++u) mx = lane[u] > mx ? lane[u] : mx;
  for (; j < rm.hi; ++j) {
    const float v = (!rm.exact || key_visible(kp[j], p, window)) ? s[j] : kNegInf;
    mx = v > mx ? v : mx;
  }
  return mx;
}

// Loads the rows of one query block, all heads of kv head hk: (G * n, D) fp32, row g * n + i.
template <typename T>
inline void load_rows(const T* x, const Problem& pb, int64_t b, int64_t hk, int64_t i0, int64_t n,
                      float* dst) {
  for (int64_t g = 0; g < pb.G; ++g) {
    const T* src = x + ((b * pb.H + hk * pb.G + g) * pb.Lq + i0) * pb.D;
    to_float(src, dst + g * n * pb.D, n * pb.D);
  }
}

// One key range of a work item: fp32 K and V tiles (kn x D), the keys' positions (or
// nullptr), and the scaled scores S = scale * Q K^T of the item's rows, (rows x kn) in s.
struct KeyTile {
  int64_t j0, j1, kn;
  const float* k;
  const float* v;
  const int64_t* k_pos;
};

// Empty slots (position -1) may hold anything, NaN included: a zero probability times NaN
// is NaN in P.V (and in dS.K in the backward), so their K and V rows become zeros in the
// tile. fp32 tiles point into the caller's tensor and are copied first, only when needed.
inline void zero_empty_slots(KeyTile& kt, int64_t D, std::vector<float>& kbuf, std::vector<float>& vbuf) {
  bool any = false;
  for (int64_t j = 0; j < kt.kn && !any; ++j) any = kt.k_pos[j] < 0;
  if (!any) return;
  for (auto [src, buf] : {std::pair<const float**, std::vector<float>*>{&kt.k, &kbuf}, {&kt.v, &vbuf}}) {
    if (*src != buf->data()) {
      if (static_cast<int64_t>(buf->size()) < kt.kn * D) buf->resize(kt.kn * D);
      std::copy(*src, *src + kt.kn * D, buf->data());
      *src = buf->data();
    }
    for (int64_t j = 0; j < kt.kn; ++j) {
      if (kt.k_pos[j] < 0) std::fill(buf->data() + j * D, buf->data() + (j + 1) * D, 0.0f);
    }
  }
}

template <typename T>
inline KeyTile score_tile(const Problem& pb, const T* k, const T* v, int64_t b, int64_t hk, int64_t r,
                          const float* qt, int64_t rows, std::vector<float>& kbuf, std::vector<float>& vbuf,
                          float* s) {
  KeyTile kt;
  kt.j0 = pb.ranges[2 * r];
  kt.j1 = pb.ranges[2 * r + 1];
  kt.kn = kt.j1 - kt.j0;
  kt.k = tile(k + b * pb.k_sb + hk * pb.k_sh + kt.j0 * pb.D, kbuf, kt.kn * pb.D);
  kt.v = tile(v + b * pb.v_sb + hk * pb.v_sh + kt.j0 * pb.D, vbuf, kt.kn * pb.D);
  kt.k_pos = pb.k_pos ? pb.k_pos + b * pb.Lk + kt.j0 : nullptr;
  if (kt.k_pos) zero_empty_slots(kt, pb.D, kbuf, vbuf);
  if (rows <= kSmallRows) {
    small_scores(rows, kt.kn, pb.D, pb.scale, qt, kt.k, s);
  } else {
    gemm(false, true, rows, kt.kn, pb.D, pb.scale, qt, pb.D, kt.k, pb.D, 0.0f, s, kt.kn);
  }
  return kt;
}

// Keeps MKL to one thread inside our own parallel loop, restoring the caller's setting.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    const int one = 1;
    if (mkl_set_num_threads_local_) previous = mkl_set_num_threads_local_(&one);
  }
  ~SingleThreadedBlas() {
    if (mkl_set_num_threads_local_) mkl_set_num_threads_local_(&previous);
  }
};

// ---------------------------------------------------------------------------------------
// Native forwards, fp32 and bf16, on our own AVX-512 kernels (MKL's sgemm reaches about
// half of this machine's FMA rate on AMD CPUs, and its bf16 GEMM is no faster than its sgemm
// there). Used with more than kSmallRows rows per item where the build targets a CPU with
// AVX-512 (bf16: AVX512_BF16 too, whose vdpbf16ps multiplies pairs of bf16 into fp32 sums at
// twice the fp32 FMA rate):
//   S^T (keys x rows) = K Q^T    K read in place, Q packed once per item (fp32: transposed;
//                                bf16: as row pairs); rows are the vector lanes
//   one pass per 16 rows over S^T: scale, soft-cap, mask (exact, by position), max;
//   a second: exp, sum, P (fp32: in place in S^T; bf16: rounded and packed as key pairs, as
//   flash-attention rounds P for P V)
//   Acc (rows x D) += P V         fp32: V read in place when D is a multiple of 32 and no
//                                slot is empty; else (and bf16) V packed, padded with zeros
// Rows are padded to a multiple of 32 and D to a multiple of 32 inside the work item, so
// the kernels have no ragged edges except the key count (a template over 1..12 keys).
#if defined(__AVX512F__)
constexpr bool kNativeFp32Build = true;
#if defined(__AVX512BF16__)
constexpr bool kNativeBf16Build = true;
#else
constexpr bool kNativeBf16Build = false;
#endif

constexpr int64_t kNativeKeys = 256;  // keys per sub-tile: S^T, P and V pairs stay in L2

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline uint32_t bf16_bits(const c10::BFloat16& x) { return static_cast<uint32_t>(x.x); }

// e^x for 16 lanes, the same polynomial as fast_exp; 2^n applied with scalef.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), _mm512_min_ps(x, _mm512_set1_ps(88.0f)));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// tanh(t) for 16 lanes, from e^(-2|t|) (no overflow), the sign put back.
inline __m512 tanh16(__m512 t) {
  const __m512 sign = _mm512_and_ps(t, _mm512_castsi512_ps(_mm512_set1_epi32(0x80000000)));
  const __m512 a = _mm512_andnot_ps(_mm512_castsi512_ps(_mm512_set1_epi32(0x80000000)), t);
  const __m512 e = exp16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
  const __m512 th = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_or_ps(th, sign);
}

// cap * tanh(x / cap) for 16 lanes.
inline __m512 softcap16(__m512 x, float cap) {
  return _mm512_mul_ps(tanh16(_mm512_mul_ps(x, _mm512_set1_ps(1.0f / cap))), _mm512_set1_ps(cap));
}

// Which of 16 rows (lanes) see a key: rows at positions pos[0..16), keys at position kp.
struct LaneWindow {
  __m512i p_lo, p_hi, e_lo, e_hi;  // the rows' positions (two halves of 8 int64) and window edges
  bool windowed;
  LaneWindow(const int64_t* pos, int64_t window) : windowed(window > 0) {
    p_lo = _mm512_loadu_si512(pos);
    p_hi = _mm512_loadu_si512(pos + 8);
    const __m512i w = _mm512_set1_epi64(windowed ? window : 0);
    e_lo = _mm512_sub_epi64(p_lo, w);
    e_hi = _mm512_sub_epi64(p_hi, w);
  }
  __mmask16 operator()(int64_t kp) const {
    if (kp < 0) return 0;  // an empty slot
    const __m512i kv = _mm512_set1_epi64(kp);
    __mmask8 lo = _mm512_cmp_epi64_mask(kv, p_lo, _MM_CMPINT_LE);
    __mmask8 hi = _mm512_cmp_epi64_mask(kv, p_hi, _MM_CMPINT_LE);
    if (windowed) {
      lo &= _mm512_cmp_epi64_mask(kv, e_lo, _MM_CMPINT_NLE);
      hi &= _mm512_cmp_epi64_mask(kv, e_hi, _MM_CMPINT_NLE);
    }
    return static_cast<__mmask16>(lo | (static_cast<unsigned>(hi) << 8));
  }
};

// The fp32 products, all one register-blocked kernel: C (M x N) = or += A (M x K) B (K x N),
// where A[m][k] is a[m * sm + k * sk] (any strides: it is broadcast one element at a time, so
// both A and A^T stored row-major serve), B is K rows of N floats at stride ldb, N a multiple
// of 32, and C rows are at stride ldc. A block of MR rows x 32 columns of C stays in registers
// over all of K: per k, two vector loads of B and MR broadcasts feed 2 MR FMAs.
template <int MR>
inline void gemm_block(int64_t K, const float* a, int64_t sm, int64_t sk, const float* b, int64_t ldb, float* c,
                       int64_t ldc, bool accumulate) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
    c1[r] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * ldb);
    const __m512 b1 = _mm512_loadu_ps(b + k * ldb + 16);
    const float* ak = a + k * sk;
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(ak[r * sm]);
      c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(c + r * ldc, c0[r]);
    _mm512_storeu_ps(c + r * ldc + 16, c1[r]);
  }
}

// The last M % MR rows: one block of exactly that many (a template per count).
template <int MR>
inline void gemm_rest(int rest, int64_t K, const float* a, int64_t sm, int64_t sk, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rest == MR) return gemm_block<MR>(K, a, sm, sk, b, ldb, c, ldc, accumulate);
    gemm_rest<MR - 1>(rest, K, a, sm, sk, b, ldb, c, ldc, accumulate);
  }
}

// Column panels outer (a panel of B, K x 32, is reused by every row block), row blocks inner.
template <int MR>
inline void gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t sm, int64_t sk, const float* b,
                     int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR) {
      gemm_block<MR>(K, a + m0 * sm, sm, sk, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    }
    if (m0 < M) {
      gemm_rest<MR - 1>(static_cast<int>(M - m0), K, a + m0 * sm, sm, sk, b + n0, ldb, c + m0 * ldc + n0, ldc,
                        accumulate);
    }
  }
}

// S^T (kn x rp) = K Q^T for fp32: k rows of D, qt Q transposed (D x rp).
inline void scores_t(const float* k, int64_t kn, int64_t D, const float* qt, int64_t rp, float* st) {
  gemm_f32<12>(kn, rp, D, k, D, 1, qt, rp, st, rp, false);
}

// acc (rp x dp) += P V for fp32: pt is P transposed (kn x rp), v kn rows of dp floats at stride ldv.
inline void pv_kernel(const float* pt, const float* v, int64_t ldv, int64_t kn, int64_t rp, int64_t dp, float* acc) {
  gemm_f32<8>(rp, dp, kn, pt, 1, rp, v, ldv, acc, dp, true);
}

#if defined(__AVX512BF16__)
// S^T rows [0, J) for J keys: st[j][r] = sum_d K[j][d] Q[r][d], r over rp (multiple of 32).
// k: J rows of D bf16; qp: (pairs x rp) uint32, pair p of row r = (Q[r][2p], Q[r][2p+1]).
template <int J>
inline void st_kernel(const c10::BFloat16* k, int64_t D, const uint32_t* qp, int64_t rp, float* st) {
  const int64_t full = D / 2;
  for (int64_t r0 = 0; r0 < rp; r0 += 32) {
    __m512 acc[J][2];
    for (int j = 0; j < J; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < full; ++p) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(qp + p * rp + r0);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(qp + p * rp + r0 + 16);
      for (int j = 0; j < J; ++j) {
        uint32_t pair;
        std::memcpy(&pair, k + j * D + 2 * p, sizeof(pair));
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], a, b0);
        acc[j][1] = _mm512_dpbf16_ps(acc[j][1], a, b1);
      }
    }
    if (D % 2) {  // the last, unpaired dimension: its partner is zero (never memory past the row)
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(qp + full * rp + r0);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(qp + full * rp + r0 + 16);
      for (int j = 0; j < J; ++j) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(bf16_bits(k[j * D + D - 1])));
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], a, b0);
        acc[j][1] = _mm512_dpbf16_ps(acc[j][1], a, b1);
      }
    }
    for (int j = 0; j < J; ++j) {
      _mm512_storeu_ps(st + j * rp + r0, acc[j][0]);
      _mm512_storeu_ps(st + j * rp + r0 + 16, acc[j][1]);
    }
  }
}

constexpr int kStKeys = 12;

template <int J>
inline void st_rest(const c10::BFloat16* k, int64_t D, const uint32_t* qp, int64_t rp, float* st, int rest) {
  if constexpr (J > 0) {
    if (rest == J) return st_kernel<J>(k, D, qp, rp, st);
    st_rest<J - 1>(k, D, qp, rp, st, rest);
  }
}

// S^T for kn keys (rows of D, contiguous).
inline void scores_t(const c10::BFloat16* k, int64_t kn, int64_t D, const uint32_t* qp, int64_t rp, float* st) {
  int64_t j = 0;
  for (; j + kStKeys <= kn; j += kStKeys) st_kernel<kStKeys>(k + j * D, D, qp, rp, st + j * rp);
  if (j < kn) st_rest<kStKeys - 1>(k + j * D, D, qp, rp, st + j * rp, static_cast<int>(kn - j));
}

// acc (rp x dp) += P V: pp (key pairs x rp) and vp (key pairs x dp) as uint32 bf16 pairs.
inline void pv_kernel(const uint32_t* pp, const uint32_t* vp, int64_t pairs, int64_t rp, int64_t dp, float* acc) {
  constexpr int R = 8;
  for (int64_t d0 = 0; d0 < dp; d0 += 32) {
    for (int64_t r0 = 0; r0 < rp; r0 += R) {
      __m512 c[R][2];
      for (int r = 0; r < R; ++r) {
        c[r][0] = _mm512_loadu_ps(acc + (r0 + r) * dp + d0);
        c[r][1] = _mm512_loadu_ps(acc + (r0 + r) * dp + d0 + 16);
      }
      for (int64_t p = 0; p < pairs; ++p) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(vp + p * dp + d0);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(vp + p * dp + d0 + 16);
        const uint32_t* a_row = pp + p * rp + r0;
        for (int r = 0; r < R; ++r) {
          const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(a_row[r]));
          c[r][0] = _mm512_dpbf16_ps(c[r][0], a, b0);
          c[r][1] = _mm512_dpbf16_ps(c[r][1], a, b1);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(acc + (r0 + r) * dp + d0, c[r][0]);
        _mm512_storeu_ps(acc + (r0 + r) * dp + d0 + 16, c[r][1]);
      }
    }
  }
}

// Pairs of consecutive V rows, interleaved: vp[p][d] = (V[2p][d], V[2p+1][d]); zeros past kn and D.
// V rows of empty slots (kpos < 0) are packed as zeros: they may hold NaN, and 0 * NaN is NaN.
inline void pack_v(const c10::BFloat16* v, int64_t kn, int64_t D, int64_t dp, uint32_t* vp, const int64_t* kpos) {
  for (int64_t p = 0; p < (kn + 1) / 2; ++p) {
    const c10::BFloat16* v0 = v + 2 * p * D;
    const bool has1 = 2 * p + 1 < kn;
    uint32_t* out = vp + p * dp;
    if (kpos && (kpos[2 * p] < 0 || (has1 && kpos[2 * p + 1] < 0))) {
      const bool keep0 = kpos[2 * p] >= 0, keep1 = has1 && kpos[2 * p + 1] >= 0;
      for (int64_t d = 0; d < D; ++d) {
        out[d] = (keep0 ? bf16_bits(v0[d]) : 0u) | (keep1 ? bf16_bits(v0[D + d]) << 16 : 0u);
      }
      for (int64_t d = D; d < dp; ++d) out[d] = 0;
      continue;
    }
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
      const __m512i hi = has1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + D + d)))
                              : _mm512_setzero_si512();
      _mm512_storeu_si512(out + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; d < D; ++d) out[d] = bf16_bits(v0[d]) | (has1 ? bf16_bits(v0[D + d]) << 16 : 0u);
    for (; d < dp; ++d) out[d] = 0;
  }
}

// Sixteen bf16 (as fp32 lanes) rounded to nearest even, in the low 16 bits of each lane.
inline __m512i to_bf16_lanes(__m512 x) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)); }

inline uint32_t load_pair(const uint32_t* p) {
  uint32_t x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// The bf16 products of the backward, gemm_f32's blocking on vdpbf16ps: C (M x N) = or +=
// A (M x K) B (K x N) with K taken in pairs. A's pair p of row m, (A[m][2p], A[m][2p+1]), is
// the uint32 a[m * sm + p * sk]; B's pair row p holds (B[2p][n], B[2p+1][n]) at b[p * ldb + n]
// for N (a multiple of 32) columns. Sums in fp32.
template <int MR>
inline void gemm_bf16_block(int64_t pairs, const uint32_t* a, int64_t sm, int64_t sk, const uint32_t* b, int64_t ldb,
                            float* c, int64_t ldc, bool accumulate) {
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
    c1[r] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * ldb);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * ldb + 16);
    const uint32_t* ap = a + p * sk;
    for (int r = 0; r < MR; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(ap + r * sm)));
      c0[r] = _mm512_dpbf16_ps(c0[r], x, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], x, b1);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(c + r * ldc, c0[r]);
    _mm512_storeu_ps(c + r * ldc + 16, c1[r]);
  }
}

template <int MR>
inline void gemm_bf16_rest(int rest, int64_t pairs, const uint32_t* a, int64_t sm, int64_t sk, const uint32_t* b,
                           int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rest == MR) return gemm_bf16_block<MR>(pairs, a, sm, sk, b, ldb, c, ldc, accumulate);
    gemm_bf16_rest<MR - 1>(rest, pairs, a, sm, sk, b, ldb, c, ldc, accumulate);
  }
}

template <int MR>
inline void gemm_bf16(int64_t M, int64_t N, int64_t pairs, const uint32_t* a, int64_t sm, int64_t sk,
                      const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR) {
      gemm_bf16_block<MR>(pairs, a + m0 * sm, sm, sk, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    }
    if (m0 < M) {
      gemm_bf16_rest<MR - 1>(static_cast<int>(M - m0), pairs, a + m0 * sm, sm, sk, b + n0, ldb, c + m0 * ldc + n0,
                             ldc, accumulate);
    }
  }
}
#endif

// fp32 K or V rows as the B of a product (P V, dS K): in place where they can be, else copied
// to (kn x dp) with zeros past D and in the rows of empty slots (which may hold NaN, and
// 0 * NaN is NaN).
inline const float* rows_for_product(const float* v, int64_t kn, int64_t D, int64_t dp, std::vector<float>& buf,
                                     const int64_t* kpos, int64_t& ldv) {
  bool empty = false;
  for (int64_t j = 0; kpos && j < kn && !empty; ++j) empty = kpos[j] < 0;
  if (D == dp && !empty) {
    ldv = D;
    return v;
  }
  ldv = dp;
  for (int64_t j = 0; j < kn; ++j) {
    float* dst = buf.data() + j * dp;
    if (kpos && kpos[j] < 0) {
      std::fill(dst, dst + dp, 0.0f);
    } else {
      std::copy(v + j * D, v + (j + 1) * D, dst);
      std::fill(dst + D, dst + dp, 0.0f);
    }
  }
  return buf.data();
}

struct NativeScratch {
  std::vector<uint32_t> qp, pp, vp;  // bf16: Q, P and V as pairs
  std::vector<float> qt, vbuf;       // fp32: Q transposed, V where it cannot be read in place
  std::vector<float> st, acc, m, l;
  std::vector<int64_t> pos;  // per padded row: its query position (padding rows: none visible)
};

// One work item of the native forward (T: float or bf16): queries [i0, i0 + n) of all heads
// of kv head hk.
template <typename T>
inline void native_item(const Problem& pb, const T* q, const T* k, const T* v, T* out, float* lse, int64_t b,
                        int64_t hk, int64_t qb, int64_t i0, int64_t n, NativeScratch& sc) {
  constexpr bool fp32 = std::is_same_v<T, float>;
  const int64_t D = pb.D, rows = pb.G * n, rp = round_up(rows, 32), dp = round_up(D, 32), pairs_d = (D + 1) / 2;
  static_assert(fp32 || kNativeBf16Build, "the native bf16 forward needs AVX512_BF16");
  if constexpr (fp32) {
    sc.qt.assign(D * rp, 0.0f);
  } else {
    sc.qp.assign(pairs_d * rp, 0u);
  }
  sc.pos.assign(rp, std::numeric_limits<int64_t>::min() / 4);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / n, i = r % n;
    sc.pos[r] = pb.q_position(b, i0 + i);
    const T* src = q + ((b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i) * D;
    if constexpr (fp32) {
      for (int64_t d = 0; d < D; ++d) sc.qt[d * rp + r] = src[d];
    } else {
      for (int64_t p = 0; p < pairs_d; ++p) {  // (no bf16-only instructions: builds without them too)
        const uint32_t hi = 2 * p + 1 < D ? bf16_bits(src[2 * p + 1]) : 0u;
        sc.qp[p * rp + r] = bf16_bits(src[2 * p]) | (hi << 16);
      }
    }
  }
  sc.acc.assign(rp * dp, 0.0f);
  sc.m.assign(rp, kNegInf);
  sc.l.assign(rp, 0.0f);
  sc.st.resize(kNativeKeys * rp);
  if constexpr (fp32) {
    sc.vbuf.resize(kNativeKeys * dp);
  } else {
    sc.pp.resize((kNativeKeys / 2) * rp);
    sc.vp.resize((kNativeKeys / 2) * dp);
  }
  const __m512 scale = _mm512_set1_ps(pb.scale), neg_inf = _mm512_set1_ps(kNegInf);

  for (int64_t range = pb.block_ptr[qb]; range < pb.block_ptr[qb + 1]; ++range) {
    for (int64_t j0 = pb.ranges[2 * range]; j0 < pb.ranges[2 * range + 1]; j0 += kNativeKeys) {
      const int64_t kn = std::min(kNativeKeys, pb.ranges[2 * range + 1] - j0);
      [[maybe_unused]] const int64_t kpairs = (kn + 1) / 2;  // bf16 only
      const int64_t* kpos = pb.k_pos ? pb.k_pos + b * pb.Lk + j0 : nullptr;
      float* st = sc.st.data();
      const T* kj = k + b * pb.k_sb + hk * pb.k_sh + j0 * D;
      const T* vj = v + b * pb.v_sb + hk * pb.v_sh + j0 * D;
      const float* vrows = nullptr;
      int64_t ldv = 0;
      if constexpr (fp32) {
        scores_t(kj, kn, D, sc.qt.data(), rp, st);
        vrows = rows_for_product(vj, kn, D, dp, sc.vbuf, kpos, ldv);
      } else {
#if defined(__AVX512BF16__)
        scores_t(kj, kn, D, sc.qp.data(), rp, st);
        pack_v(vj, kn, D, dp, sc.vp.data(), kpos);
#endif
      }

      for (int64_t r0 = 0; r0 < rp; r0 += 16) {
        const LaneWindow lanes(sc.pos.data() + r0, pb.window);
        auto visible = [&](int64_t j) { return lanes(kpos ? kpos[j] : j0 + j); };
        // Pass 1: scale, soft-cap, running max over the visible keys.
        __m512 mx = neg_inf;
        for (int64_t j = 0; j < kn; ++j) {
          __m512 s = _mm512_mul_ps(_mm512_loadu_ps(st + j * rp + r0), scale);
          if (pb.softcap > 0) s = softcap16(s, pb.softcap);
          _mm512_storeu_ps(st + j * rp + r0, s);
          mx = _mm512_mask_max_ps(mx, visible(j), mx, s);
        }
        const __m512 m_old = _mm512_loadu_ps(sc.m.data() + r0);
        const __m512 m_new = _mm512_max_ps(m_old, mx);
        // Rows whose maximum grew rescale what earlier tiles gave (exp(-inf) = 0 where none yet).
        const __mmask16 grew = _mm512_cmp_ps_mask(m_new, m_old, _CMP_NEQ_OQ) &
                               _mm512_cmp_ps_mask(m_old, neg_inf, _CMP_NEQ_OQ);
        if (grew) {
          alignas(64) float corr[16];
          _mm512_store_ps(corr, exp16(_mm512_sub_ps(m_old, m_new)));
          for (int u = 0; u < 16; ++u) {
            if (!((grew >> u) & 1)) continue;
            sc.l[r0 + u] *= corr[u];
            float* ar = sc.acc.data() + (r0 + u) * dp;
            for (int64_t d = 0; d < dp; ++d) ar[d] *= corr[u];
          }
        }
        _mm512_storeu_ps(sc.m.data() + r0, m_new);
        // Pass 2: P = exp(s - m) on visible keys, its row sums; P in place (fp32) or as bf16 key pairs.
        const __mmask16 live = _mm512_cmp_ps_mask(m_new, neg_inf, _CMP_NEQ_OQ);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < kn; j += 2) {
          const __m512 e0 = _mm512_maskz_mov_ps(visible(j) & live, exp16(_mm512_sub_ps(_mm512_loadu_ps(st + j * rp + r0), m_new)));
          __m512 e1 = _mm512_setzero_ps();
          if (j + 1 < kn) {
            e1 = _mm512_maskz_mov_ps(visible(j + 1) & live,
                                     exp16(_mm512_sub_ps(_mm512_loadu_ps(st + (j + 1) * rp + r0), m_new)));
          }
          sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
          if constexpr (fp32) {
            _mm512_storeu_ps(st + j * rp + r0, e0);
            if (j + 1 < kn) _mm512_storeu_ps(st + (j + 1) * rp + r0, e1);
          } else {
#if defined(__AVX512BF16__)
            const __m512i pair = _mm512_or_si512(to_bf16_lanes(e0), _mm512_slli_epi32(to_bf16_lanes(e1), 16));
            _mm512_storeu_si512(sc.pp.data() + (j / 2) * rp + r0, pair);
#endif
          }
        }
        _mm512_storeu_ps(sc.l.data() + r0, _mm512_add_ps(_mm512_loadu_ps(sc.l.data() + r0), sum));
      }
      if constexpr (fp32) {
        pv_kernel(st, vrows, ldv, kn, rp, dp, sc.acc.data());
      } else {
#if defined(__AVX512BF16__)
        pv_kernel(sc.pp.data(), sc.vp.data(), kpairs, rp, dp, sc.acc.data());
#endif
      }
    }
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / n, i = r % n, h = hk * pb.G + g;
    T* o = out + ((b * pb.H + h) * pb.Lq + i0 + i) * D;
    float* lr = lse + (b * pb.H + h) * pb.Lq + i0 + i;
    if (sc.l[r] > 0.0f) {
      from_float(sc.acc.data() + r * dp, o, D, 1.0f / sc.l[r]);
      *lr = sc.m[r] + std::log(sc.l[r]);
    } else {
      std::fill(o, o + D, static_cast<T>(0.0f));
      *lr = kNegInf;
    }
  }
}

// The native fp32 backward of one query block [i0, i0 + n) of kv head hk (flash-attention's
// recomputation from the saved log-sum-exp), every product on gemm_f32. Per key sub-tile:
//   S^T = K Q^T and dP^T = V dO^T            (keys x rows; Q and dO packed transposed)
//   P = exp(S - lse) on visible keys, dS = P (dP - delta) [(1 - tanh^2)] scale, in place
//   dV += P^T dO, dK += dS^T Q               (rows of dva / dka at stride dp; Q, dO row-major)
//   dQ += dS K                               (K read in place when it can be)
// Empty slots' K and V may hold NaN: P and dS are selected (not multiplied) to zero there,
// and K is copied with zero rows for dS K.
struct BackwardScratch {
  std::vector<float> qt, dot, qr, dor, st, dpt, th, dqa, kbuf, lse, delta;
  std::vector<int64_t> pos;
  // bf16: Q and dO as pairs along D (qp, dotp) and along rows (qrp, dorp); K / V rows padded
  // to pairs (odd D); K as key pairs; P^T and dS^T rounded to bf16; dS as key pairs.
  std::vector<uint32_t> qp, dotp, qrp, dorp, kpad, vpad, kp, dsp;
  std::vector<c10::BFloat16> ptb, dsb;
};

// What both native backwards need per row of a query block: its position, its saved
// log-sum-exp and delta = dO . O; padding rows (past `rows`) see nothing.
template <typename T>
inline void backward_rows(const Problem& pb, const float* lse, const T* out, const T* dout, int64_t b, int64_t hk,
                          int64_t i0, int64_t n, int64_t rp, BackwardScratch& sc) {
  const int64_t rows = pb.G * n;
  sc.pos.assign(rp, std::numeric_limits<int64_t>::min() / 4);
  sc.lse.assign(rp, kNegInf);
  sc.delta.assign(rp, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / n, i = r % n, row = (b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i;
    sc.pos[r] = pb.q_position(b, i0 + i);
    sc.lse[r] = lse[row];
    float delta = 0.0f;
    for (int64_t d = 0; d < pb.D; ++d) delta += static_cast<float>(dout[row * pb.D + d]) * static_cast<float>(out[row * pb.D + d]);
    sc.delta[r] = delta;
  }
}

// One key's P and scale * dS for 16 rows, from its raw scores s (Q.K) and dP (dO.V): P =
// exp(softcap(scale s) - lse) where `visible`, dS = P (dP - delta) [(1 - tanh^2)], selected
// (not multiplied) to zero where P is zero, so NaN in an empty slot's K or V never passes.
struct BackwardLanes {
  __m512 scale, lse, delta;
  __mmask16 live;
  float softcap;
  BackwardLanes(float sc, const float* l, const float* dl, float cap)
      : scale(_mm512_set1_ps(sc)), lse(_mm512_loadu_ps(l)), delta(_mm512_loadu_ps(dl)), softcap(cap) {
    live = _mm512_cmp_ps_mask(lse, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
  }
  void operator()(__m512 raw, __m512 dp, __mmask16 visible, __m512& p, __m512& ds) const {
    __m512 s = _mm512_mul_ps(raw, scale), th = _mm512_setzero_ps();
    if (softcap > 0) {
      th = tanh16(_mm512_mul_ps(s, _mm512_set1_ps(1.0f / softcap)));
      s = _mm512_mul_ps(th, _mm512_set1_ps(softcap));
    }
    p = _mm512_maskz_mov_ps(visible & live, exp16(_mm512_sub_ps(s, lse)));
    const __mmask16 nz = _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    ds = _mm512_maskz_mul_ps(nz, p, _mm512_sub_ps(dp, delta));
    if (softcap > 0) ds = _mm512_mul_ps(ds, _mm512_fnmadd_ps(th, th, _mm512_set1_ps(1.0f)));  // d tanh = 1 - tanh^2
    ds = _mm512_mul_ps(ds, scale);
  }
};

template <typename T>
inline void native_backward_block(const Problem& pb, const T* q, const T* k, const T* v, const T* out,
                                  const T* dout, const float* lse, T* dq, int64_t b, int64_t hk, int64_t qb,
                                  int64_t i0, int64_t n, int64_t lo, float* dka, float* dva, BackwardScratch& sc) {
  static_assert(std::is_same_v<T, float>, "bf16 has native_backward_block_bf16");
  const int64_t D = pb.D, rows = pb.G * n, rp = round_up(rows, 32), dp = round_up(D, 32);
  backward_rows(pb, lse, out, dout, b, hk, i0, n, rp, sc);
  sc.qt.assign(D * rp, 0.0f);
  sc.dot.assign(D * rp, 0.0f);
  sc.qr.assign(rp * dp, 0.0f);
  sc.dor.assign(rp * dp, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / n, i = r % n, row = (b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i;
    const T* qs = q + row * D;
    const T* ds = dout + row * D;
    for (int64_t d = 0; d < D; ++d) {
      sc.qt[d * rp + r] = sc.qr[r * dp + d] = qs[d];
      sc.dot[d * rp + r] = sc.dor[r * dp + d] = ds[d];
    }
  }
  sc.dqa.assign(rp * dp, 0.0f);
  sc.st.resize(kNativeKeys * rp);
  sc.dpt.resize(kNativeKeys * rp);
  sc.kbuf.resize(kNativeKeys * dp);

  for (int64_t range = pb.block_ptr[qb]; range < pb.block_ptr[qb + 1]; ++range) {
    for (int64_t j0 = pb.ranges[2 * range]; j0 < pb.ranges[2 * range + 1]; j0 += kNativeKeys) {
      const int64_t kn = std::min(kNativeKeys, pb.ranges[2 * range + 1] - j0);
      const int64_t* kpos = pb.k_pos ? pb.k_pos + b * pb.Lk + j0 : nullptr;
      const T* kj = k + b * pb.k_sb + hk * pb.k_sh + j0 * D;
      const T* vj = v + b * pb.v_sb + hk * pb.v_sh + j0 * D;
      float* st = sc.st.data();
      float* dpt = sc.dpt.data();
      scores_t(kj, kn, D, sc.qt.data(), rp, st);
      gemm_f32<12>(kn, rp, D, vj, D, 1, sc.dot.data(), rp, dpt, rp, false);
      for (int64_t r0 = 0; r0 < rp; r0 += 16) {
        const LaneWindow lanes(sc.pos.data() + r0, pb.window);
        const BackwardLanes grad(pb.scale, sc.lse.data() + r0, sc.delta.data() + r0, pb.softcap);
        for (int64_t j = 0; j < kn; ++j) {
          __m512 p, ds;
          grad(_mm512_loadu_ps(st + j * rp + r0), _mm512_loadu_ps(dpt + j * rp + r0), lanes(kpos ? kpos[j] : j0 + j),
               p, ds);
          _mm512_storeu_ps(st + j * rp + r0, p);
          _mm512_storeu_ps(dpt + j * rp + r0, ds);
        }
      }
      gemm_f32<12>(kn, dp, rp, st, rp, 1, sc.dor.data(), dp, dva + (j0 - lo) * dp, dp, true);
      gemm_f32<12>(kn, dp, rp, dpt, rp, 1, sc.qr.data(), dp, dka + (j0 - lo) * dp, dp, true);
      int64_t ldk = 0;
      const float* krows = rows_for_product(kj, kn, D, dp, sc.kbuf, kpos, ldk);
      gemm_f32<8>(rp, dp, kn, dpt, 1, rp, krows, ldk, sc.dqa.data(), dp, true);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / n, i = r % n;
    T* dst = dq + ((b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i) * D;
    from_float(sc.dqa.data() + r * dp, dst, D, 1.0f);
  }
}

#if defined(__AVX512BF16__)
// Rows of a bf16 tile (kn x D at stride D) as uint32 pairs along D: in place when D is even,
// else copied with a zero partner for the last dimension (stride pairs_d).
inline const uint32_t* rows_as_pairs(const c10::BFloat16* x, int64_t kn, int64_t D, std::vector<uint32_t>& buf,
                                     int64_t& stride) {
  const int64_t pairs_d = (D + 1) / 2;
  stride = pairs_d;
  if (D % 2 == 0) return reinterpret_cast<const uint32_t*>(x);
  buf.resize(kn * pairs_d);
  for (int64_t j = 0; j < kn; ++j) {
    for (int64_t p = 0; p < pairs_d; ++p) {
      const uint32_t hi = 2 * p + 1 < D ? bf16_bits(x[j * D + 2 * p + 1]) : 0u;
      buf[j * pairs_d + p] = bf16_bits(x[j * D + 2 * p]) | (hi << 16);
    }
  }
  return buf.data();
}

// The native bf16 backward: native_backward_block's steps with every product on vdpbf16ps.
// P and dS are rounded to bf16 for the products (as flash-attention does); sums are fp32.
inline void native_backward_block_bf16(const Problem& pb, const c10::BFloat16* q, const c10::BFloat16* k,
                                       const c10::BFloat16* v, const c10::BFloat16* out, const c10::BFloat16* dout,
                                       const float* lse, c10::BFloat16* dq, int64_t b, int64_t hk, int64_t qb,
                                       int64_t i0, int64_t n, int64_t lo, float* dka, float* dva,
                                       BackwardScratch& sc) {
  using bf16 = c10::BFloat16;
  const int64_t D = pb.D, rows = pb.G * n, rp = round_up(rows, 32), dp = round_up(D, 32), pairs_d = (D + 1) / 2;
  backward_rows(pb, lse, out, dout, b, hk, i0, n, rp, sc);
  sc.qp.assign(pairs_d * rp, 0u);
  sc.dotp.assign(pairs_d * rp, 0u);
  sc.qrp.assign((rp / 2) * dp, 0u);
  sc.dorp.assign((rp / 2) * dp, 0u);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / n, i = r % n, row = (b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i;
    const bf16* qs = q + row * D;
    const bf16* ds = dout + row * D;
    for (int64_t p = 0; p < pairs_d; ++p) {
      const bool two = 2 * p + 1 < D;
      sc.qp[p * rp + r] = bf16_bits(qs[2 * p]) | ((two ? bf16_bits(qs[2 * p + 1]) : 0u) << 16);
      sc.dotp[p * rp + r] = bf16_bits(ds[2 * p]) | ((two ? bf16_bits(ds[2 * p + 1]) : 0u) << 16);
    }
    const int shift = (r % 2) * 16;  // row pairs: even rows in the low half
    for (int64_t d = 0; d < D; ++d) {
      sc.qrp[(r / 2) * dp + d] |= bf16_bits(qs[d]) << shift;
      sc.dorp[(r / 2) * dp + d] |= bf16_bits(ds[d]) << shift;
    }
  }
  sc.dqa.assign(rp * dp, 0.0f);
  sc.st.resize(kNativeKeys * rp);
  sc.dpt.resize(kNativeKeys * rp);
  sc.ptb.resize(kNativeKeys * rp);
  sc.dsb.resize(kNativeKeys * rp);
  sc.dsp.resize((kNativeKeys / 2) * rp);
  sc.kp.resize((kNativeKeys / 2) * dp);

  for (int64_t range = pb.block_ptr[qb]; range < pb.block_ptr[qb + 1]; ++range) {
    for (int64_t j0 = pb.ranges[2 * range]; j0 < pb.ranges[2 * range + 1]; j0 += kNativeKeys) {
      const int64_t kn = std::min(kNativeKeys, pb.ranges[2 * range + 1] - j0), kpairs = (kn + 1) / 2;
      const int64_t* kpos = pb.k_pos ? pb.k_pos + b * pb.Lk + j0 : nullptr;
      const bf16* kj = k + b * pb.k_sb + hk * pb.k_sh + j0 * D;
      const bf16* vj = v + b * pb.v_sb + hk * pb.v_sh + j0 * D;
      float* st = sc.st.data();
      float* dpt = sc.dpt.data();
      int64_t ks = 0, vs = 0;
      const uint32_t* krow = rows_as_pairs(kj, kn, D, sc.kpad, ks);
      const uint32_t* vrow = rows_as_pairs(vj, kn, D, sc.vpad, vs);
      gemm_bf16<12>(kn, rp, pairs_d, krow, ks, 1, sc.qp.data(), rp, st, rp, false);     // S^T = K Q^T
      gemm_bf16<12>(kn, rp, pairs_d, vrow, vs, 1, sc.dotp.data(), rp, dpt, rp, false);  // dP^T = V dO^T
      for (int64_t r0 = 0; r0 < rp; r0 += 16) {
        const LaneWindow lanes(sc.pos.data() + r0, pb.window);
        const BackwardLanes grad(pb.scale, sc.lse.data() + r0, sc.delta.data() + r0, pb.softcap);
        __m512i prev = _mm512_setzero_si512();  // the even key's dS, bf16 in the low halves
        for (int64_t j = 0; j < kn; ++j) {
          __m512 p, ds;
          grad(_mm512_loadu_ps(st + j * rp + r0), _mm512_loadu_ps(dpt + j * rp + r0), lanes(kpos ? kpos[j] : j0 + j),
               p, ds);
          const __m256i ds16 = (__m256i)_mm512_cvtneps_pbh(ds);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.ptb.data() + j * rp + r0), (__m256i)_mm512_cvtneps_pbh(p));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.dsb.data() + j * rp + r0), ds16);
          const __m512i ds32 = _mm512_cvtepu16_epi32(ds16);
          if (j % 2) {
            _mm512_storeu_si512(sc.dsp.data() + (j / 2) * rp + r0, _mm512_or_si512(prev, _mm512_slli_epi32(ds32, 16)));
          } else if (j + 1 == kn) {  // an odd key count: the last pair's partner is zero
            _mm512_storeu_si512(sc.dsp.data() + (j / 2) * rp + r0, ds32);
          }
          prev = ds32;
        }
      }
      const uint32_t* ptb = reinterpret_cast<const uint32_t*>(sc.ptb.data());
      const uint32_t* dsb = reinterpret_cast<const uint32_t*>(sc.dsb.data());
      gemm_bf16<12>(kn, dp, rp / 2, ptb, rp / 2, 1, sc.dorp.data(), dp, dva + (j0 - lo) * dp, dp, true);  // P^T dO
      gemm_bf16<12>(kn, dp, rp / 2, dsb, rp / 2, 1, sc.qrp.data(), dp, dka + (j0 - lo) * dp, dp, true);  // dS^T Q
      pack_v(kj, kn, D, dp, sc.kp.data(), kpos);  // K as key pairs, empty slots zero
      gemm_bf16<8>(rp, dp, kpairs, sc.dsp.data(), 1, rp, sc.kp.data(), dp, sc.dqa.data(), dp, true);   // dS K
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = r / n, i = r % n;
    bf16* dst = dq + ((b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i) * D;
    from_float(sc.dqa.data() + r * dp, dst, D, 1.0f);
  }
}
#endif
#else
constexpr bool kNativeFp32Build = false;
constexpr bool kNativeBf16Build = false;
struct NativeScratch {};
struct BackwardScratch {};
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
template <typename T>
inline void native_backward_block(const Problem&, const T*, const T*, const T*, const T*, const T*, const float*, T*,
                                  int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*,
                                  BackwardScratch&) {}
template <typename T>
inline void native_item(const Problem&, const T*, const T*, const T*, T*, float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t, NativeScratch&) {}
#endif

// Whether fp32 / bf16 forwards take the native path (on by default where built; off for comparisons).
std::atomic<bool> g_native_fp32{true};
std::atomic<bool> g_native_bf16{true};

template <typename T>
void forward_kernel(const Problem& pb, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t rows_max = pb.G * pb.block_q;
  const int64_t items = pb.B * pb.Hkv * pb.n_qblocks;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas;
    std::vector<float> qt(rows_max * pb.D), acc(rows_max * pb.D), s(rows_max * pb.max_kn);
    std::vector<float> m(rows_max), l(rows_max), kbuf, vbuf;
    std::vector<int64_t> qp(pb.block_q);
    if constexpr (!std::is_same_v<T, float>) {
      kbuf.resize(pb.max_kn * pb.D);
      vbuf.resize(pb.max_kn * pb.D);
    }
    NativeScratch native;
    const bool use_native = (kNativeBf16Build && std::is_same_v<T, c10::BFloat16> && g_native_bf16.load()) ||
                            (kNativeFp32Build && std::is_same_v<T, float> && g_native_fp32.load());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (pb.Hkv * pb.n_qblocks);
      const int64_t hk = (item / pb.n_qblocks) % pb.Hkv;
      const int64_t qb = item % pb.n_qblocks;
      const int64_t i0 = qb * pb.block_q;
      const int64_t n = std::min(pb.block_q, pb.Lq - i0);
      const int64_t rows = pb.G * n;
      if constexpr (std::is_same_v<T, float> || (kNativeBf16Build && std::is_same_v<T, c10::BFloat16>)) {
        if (use_native && rows > kSmallRows) {
          native_item<T>(pb, q, k, v, out, lse, b, hk, qb, i0, n, native);
          continue;
        }
      }
      for (int64_t i = 0; i < n; ++i) qp[i] = pb.q_position(b, i0 + i);
      load_rows(q, pb, b, hk, i0, n, qt.data());
      std::fill(m.begin(), m.begin() + rows, kNegInf);
      std::fill(l.begin(), l.begin() + rows, 0.0f);
      std::fill(acc.begin(), acc.begin() + rows * pb.D, 0.0f);

      for (int64_t r = pb.block_ptr[qb]; r < pb.block_ptr[qb + 1]; ++r) {
        const KeyTile kt = score_tile(pb, k, v, b, hk, r, qt.data(), rows, kbuf, vbuf, s.data());
        const int64_t j0 = kt.j0, j1 = kt.j1, kn = kt.kn;
        const int64_t* kp = kt.k_pos;
        bool any = false;
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t p = qp[row % n];
          float* sr = s.data() + row * kn;
          const RowMask rm = row_mask(pb, p, j0, j1);
          if (pb.softcap > 0) apply_softcap(sr, nullptr, rm.lo, rm.hi, pb.softcap);
          const float mx = row_max(sr, rm, kp, p, pb.window);
          if (mx == kNegInf) {  // no visible key in this range
            std::fill(sr, sr + kn, 0.0f);
            continue;
          }
          const float m_new = std::max(m[row], mx);
          const float sum = exp_row(sr, kn, rm, kp, p, pb.window, m_new);
          if (m[row] != kNegInf && m[row] != m_new) {
            const float corr = std::exp(m[row] - m_new);  // rescale what earlier ranges gave
            l[row] *= corr;
            float* ar = acc.data() + row * pb.D;
            for (int64_t d = 0; d < pb.D; ++d) ar[d] *= corr;
          }
          l[row] += sum;
          m[row] = m_new;
          any = true;
        }
        if (!any) continue;
        if (rows <= kSmallRows) {
          small_pv(rows, kn, pb.D, s.data(), kt.v, acc.data());
        } else {
          gemm(false, false, rows, pb.D, kn, 1.0f, s.data(), kn, kt.v, pb.D, 1.0f, acc.data(), pb.D);
        }
      }

      for (int64_t row = 0; row < rows; ++row) {
        const int64_t g = row / n, i = row % n;
        const int64_t h = hk * pb.G + g;
        T* o = out + ((b * pb.H + h) * pb.Lq + i0 + i) * pb.D;
        float* lr = lse + (b * pb.H + h) * pb.Lq + i0 + i;
        if (l[row] > 0.0f) {
          from_float(acc.data() + row * pb.D, o, pb.D, 1.0f / l[row]);
          *lr = m[row] + std::log(l[row]);
        } else {  // the query sees no key: zeros, never NaN
          std::fill(o, o + pb.D, static_cast<T>(0.0f));
          *lr = kNegInf;
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const Problem& pb, int64_t n_segments, const T* q, const T* k, const T* v,
                     const T* out, const T* dout, const float* lse, T* dq, T* dk, T* dv) {
  const int64_t rows_max = pb.G * pb.block_q;
  const int64_t items = pb.B * pb.Hkv * n_segments;
  const int64_t per_seg = (pb.n_qblocks + n_segments - 1) / n_segments;
  // Each work item owns fp32 dK/dV accumulators over the keys its queries visit; items of
  // one kv head overlap only where their windows do, and are summed afterwards.
  std::vector<std::vector<float>> acc_k(items), acc_v(items);
  std::vector<int64_t> k_lo(items, 0), k_hi(items, 0);
  const bool softcap = pb.softcap > 0;
  const bool native = (kNativeFp32Build && std::is_same_v<T, float> && g_native_fp32.load()) ||
                      (kNativeBf16Build && std::is_same_v<T, c10::BFloat16> && g_native_bf16.load());
  const int64_t ld = native ? round_up(pb.D, 32) : pb.D;  // the accumulators' row stride

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas;
    std::vector<float> qt(rows_max * pb.D), dot(rows_max * pb.D), ot(rows_max * pb.D),
        dqa(rows_max * pb.D), s(rows_max * pb.max_kn), dp(rows_max * pb.max_kn), t, delta(rows_max),
        lr(rows_max), kbuf, vbuf;
    std::vector<int64_t> qp(pb.block_q);
    BackwardScratch native_scratch;
    if (softcap) t.resize(rows_max * pb.max_kn);
    if constexpr (!std::is_same_v<T, float>) {
      kbuf.resize(pb.max_kn * pb.D);
      vbuf.resize(pb.max_kn * pb.D);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (pb.Hkv * n_segments);
      const int64_t hk = (item / n_segments) % pb.Hkv;
      const int64_t seg = item % n_segments;
      const int64_t qb_begin = seg * per_seg, qb_end = std::min(pb.n_qblocks, qb_begin + per_seg);
      if (qb_begin >= qb_end) continue;
      int64_t lo = pb.Lk, hi = 0;
      for (int64_t r = pb.block_ptr[qb_begin]; r < pb.block_ptr[qb_end]; ++r) {
        lo = std::min(lo, pb.ranges[2 * r]);
        hi = std::max(hi, pb.ranges[2 * r + 1]);
      }
      if (lo >= hi) continue;
      k_lo[item] = lo;
      k_hi[item] = hi;
      std::vector<float>& dka = acc_k[item];
      std::vector<float>& dva = acc_v[item];
      dka.assign((hi - lo) * ld, 0.0f);
      dva.assign((hi - lo) * ld, 0.0f);

      for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
        const int64_t i0 = qb * pb.block_q;
        const int64_t n = std::min(pb.block_q, pb.Lq - i0);
        const int64_t rows = pb.G * n;
        if constexpr (std::is_same_v<T, float>) {
          if (native) {
            native_backward_block(pb, q, k, v, out, dout, lse, dq, b, hk, qb, i0, n, lo, dka.data(), dva.data(),
                                  native_scratch);
            continue;
          }
        }
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (native) {
            native_backward_block_bf16(pb, q, k, v, out, dout, lse, dq, b, hk, qb, i0, n, lo, dka.data(),
                                       dva.data(), native_scratch);
            continue;
          }
        }
#endif
        for (int64_t i = 0; i < n; ++i) qp[i] = pb.q_position(b, i0 + i);
        load_rows(q, pb, b, hk, i0, n, qt.data());
        load_rows(dout, pb, b, hk, i0, n, dot.data());
        load_rows(out, pb, b, hk, i0, n, ot.data());
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t g = row / n, i = row % n;
          lr[row] = lse[(b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i];
          float acc = 0.0f;
          const float* a = dot.data() + row * pb.D;
          const float* o = ot.data() + row * pb.D;
          for (int64_t d = 0; d < pb.D; ++d) acc += a[d] * o[d];
          delta[row] = acc;
        }
        std::fill(dqa.begin(), dqa.begin() + rows * pb.D, 0.0f);

        for (int64_t r = pb.block_ptr[qb]; r < pb.block_ptr[qb + 1]; ++r) {
          const KeyTile kt = score_tile(pb, k, v, b, hk, r, qt.data(), rows, kbuf, vbuf, s.data());
          const int64_t j0 = kt.j0, j1 = kt.j1, kn = kt.kn;
          const int64_t* kp = kt.k_pos;
          for (int64_t row = 0; row < rows; ++row) {
            const int64_t p = qp[row % n];
            float* sr = s.data() + row * kn;
            if (lr[row] == kNegInf) {  // the query sees no key at all
              std::fill(sr, sr + kn, 0.0f);
              continue;
            }
            const RowMask rm = row_mask(pb, p, j0, j1);
            if (softcap) apply_softcap(sr, t.data() + row * kn, rm.lo, rm.hi, pb.softcap);
            exp_row(sr, kn, rm, kp, p, pb.window, lr[row]);  // probabilities, from the saved lse
          }
          float* dvr = dva.data() + (j0 - lo) * pb.D;
          float* dkr = dka.data() + (j0 - lo) * pb.D;
          gemm(true, false, kn, pb.D, rows, 1.0f, s.data(), kn, dot.data(), pb.D, 1.0f, dvr, pb.D);
          gemm(false, true, rows, kn, pb.D, 1.0f, dot.data(), pb.D, kt.v, pb.D, 0.0f, dp.data(), kn);
          for (int64_t row = 0; row < rows; ++row) {
            const float* pr = s.data() + row * kn;
            float* dr = dp.data() + row * kn;
            const float dl = delta[row];
            if (softcap) {
              const float* tr = t.data() + row * kn;
              // d(cap * tanh(x / cap)) / dx = 1 - tanh^2; t is garbage where p == 0, harmlessly
              for (int64_t j = 0; j < kn; ++j) dr[j] = pr[j] == 0.0f ? 0.0f : pr[j] * (dr[j] - dl) * (1.0f - tr[j] * tr[j]);
            } else {
              for (int64_t j = 0; j < kn; ++j) dr[j] = pr[j] * (dr[j] - dl);
            }
          }
          gemm(false, false, rows, pb.D, kn, pb.scale, dp.data(), kn, kt.k, pb.D, 1.0f, dqa.data(), pb.D);
          gemm(true, false, kn, pb.D, rows, pb.scale, dp.data(), kn, qt.data(), pb.D, 1.0f, dkr, pb.D);
        }
        for (int64_t row = 0; row < rows; ++row) {
          const int64_t g = row / n, i = row % n;
          T* dst = dq + ((b * pb.H + hk * pb.G + g) * pb.Lq + i0 + i) * pb.D;
          from_float(dqa.data() + row * pb.D, dst, pb.D, 1.0f);
        }
      }
    }
  });

  // Sum the work items' accumulators into dk/dv, one (batch row, kv head) per task.
  at::parallel_for(0, pb.B * pb.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rk(pb.D), rv(pb.D);
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t j = 0; j < pb.Lk; ++j) {
        std::fill(rk.begin(), rk.end(), 0.0f);
        std::fill(rv.begin(), rv.end(), 0.0f);
        for (int64_t seg = 0; seg < n_segments; ++seg) {
          const int64_t item = bh * n_segments + seg;
          if (j < k_lo[item] || j >= k_hi[item]) continue;
          const float* ak = acc_k[item].data() + (j - k_lo[item]) * ld;
          const float* av = acc_v[item].data() + (j - k_lo[item]) * ld;
          for (int64_t d = 0; d < pb.D; ++d) {
            rk[d] += ak[d];
            rv[d] += av[d];
          }
        }
        from_float(rk.data(), dk + (bh * pb.Lk + j) * pb.D, pb.D, 1.0f);
        from_float(rv.data(), dv + (bh * pb.Lk + j) * pb.D, pb.D, 1.0f);
      }
    }
  });
}

bool rows_contiguous(const at::Tensor& t) {
  return (t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == t.size(3));
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& q_pos,
                     const c10::optional<at::Tensor>& k_pos, int64_t window, double softcap, double scale,
                     int64_t block_q, const at::Tensor& block_ptr, const at::Tensor& ranges) {
  TORCH_CHECK(q.is_contiguous() && rows_contiguous(k) && rows_contiguous(v),
              "swattn: q must be contiguous, k and v contiguous within each head");
  TORCH_CHECK(block_ptr.scalar_type() == at::kLong && ranges.scalar_type() == at::kLong,
              "swattn: plan tensors must be int64");
  Problem pb{};
  pb.B = q.size(0);
  pb.H = q.size(1);
  pb.Lq = q.size(2);
  pb.D = q.size(3);
  pb.Hkv = k.size(1);
  pb.Lk = k.size(2);
  pb.G = pb.H / pb.Hkv;
  pb.k_sb = k.stride(0);
  pb.k_sh = k.stride(1);
  pb.v_sb = v.stride(0);
  pb.v_sh = v.stride(1);
  pb.window = window;
  pb.softcap = static_cast<float>(softcap);
  pb.scale = static_cast<float>(scale);
  pb.block_q = block_q;
  pb.n_qblocks = block_ptr.size(0) - 1;
  pb.q_pos = q_pos ? q_pos->data_ptr<int64_t>() : nullptr;
  pb.k_pos = k_pos ? k_pos->data_ptr<int64_t>() : nullptr;
  pb.block_ptr = block_ptr.data_ptr<int64_t>();
  pb.ranges = ranges.data_ptr<int64_t>();
  pb.max_kn = 1;
  const int64_t n_ranges = ranges.size(0);
  for (int64_t r = 0; r < n_ranges; ++r) pb.max_kn = std::max(pb.max_kn, pb.ranges[2 * r + 1] - pb.ranges[2 * r]);
  return pb;
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& q_pos,
                                           const c10::optional<at::Tensor>& k_pos, int64_t window,
                                           double softcap, double scale, int64_t block_q,
                                           const at::Tensor& block_ptr, const at::Tensor& ranges) {
  const Problem pb = make_problem(q, k, v, q_pos, k_pos, window, softcap, scale, block_q, block_ptr, ranges);
  auto out = at::empty_like(q);
  auto lse = at::empty({pb.B, pb.H, pb.Lq}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "swattn_forward", [&] {
    forward_kernel<scalar_t>(pb, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& dout, const c10::optional<at::Tensor>& q_pos,
    const c10::optional<at::Tensor>& k_pos, int64_t window, double softcap, double scale, int64_t block_q,
    const at::Tensor& block_ptr, const at::Tensor& ranges, int64_t n_segments) {
  const Problem pb = make_problem(q, k, v, q_pos, k_pos, window, softcap, scale, block_q, block_ptr, ranges);
  TORCH_CHECK(out.is_contiguous() && dout.is_contiguous() && lse.is_contiguous(), "swattn: contiguous inputs");
  auto dq = at::zeros_like(q);  // a segment whose queries see no key writes nothing
  auto dk = at::empty(k.sizes(), k.options());  // contiguous, whatever k's strides
  auto dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "swattn_backward", [&] {
    backward_kernel<scalar_t>(pb, std::max<int64_t>(1, n_segments), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                              dout.data_ptr<scalar_t>(), lse.data_ptr<float>(), dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

// enable: 1 / 0 switches the native bf16 forward on / off, -1 leaves it; gives whether it is on.
bool native_bf16(int64_t enable) {
  if (enable >= 0) g_native_bf16.store(enable != 0);
  return kNativeBf16Build && g_native_bf16.load();
}

// The same for the native fp32 forward.
bool native_fp32(int64_t enable) {
  if (enable >= 0) g_native_fp32.store(enable != 0);
  return kNativeFp32Build && g_native_fp32.load();
}

}  // namespace
}  // namespace swattn

TORCH_LIBRARY(swattn, m) {
  m.def("native_bf16(int enable) -> bool", &swattn::native_bf16);
  m.def("native_fp32(int enable) -> bool", &swattn::native_fp32);
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? q_pos, Tensor? k_pos, int window, float softcap, "
        "float scale, int block_q, Tensor block_ptr, Tensor ranges) -> (Tensor, Tensor)");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, Tensor? q_pos, "
        "Tensor? k_pos, int window, float softcap, float scale, int block_q, Tensor block_ptr, "
        "Tensor ranges, int n_segments) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(swattn, CPU, m) {
  m.impl("forward", &swattn::forward);
  m.impl("backward", &swattn::backward);
}
