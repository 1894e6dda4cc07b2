// swattn's decode step for one layer: store each row's new key and value in its cache, then
// attend with one query per head over the cache's visible keys, in one call.
//
// The caches are position-stamped buffers (swattn/cache.py): slot_pos[b, s] is the position
// slot s holds (-1: empty); a ring (local layer) keeps position p in slot p % slots, a full
// cache (global layer) at slot p. Key j is visible to the query at position p iff it holds a
// position in (p - window, p] (any position <= p without a window).
//
// Work item = (batch row, kv head, range of slots): the query heads sharing a kv head read
// each key once (grouped-query attention, K/V never repeated). When there are fewer (row, kv
// head) pairs than threads, as for one sequence of a model with one or few kv heads, the slots
// are split across threads and the partial softmaxes merged by their log-sum-exp
// (flash-decoding), so every core reads a share of a long cache.
//
// Stored keys and values may be float32, bfloat16, float16, or int8 with one float scale per
// token and head (scale = max|x| / 127); they are read in that form, never converted whole.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastmath.h"

namespace swattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kTileKeys = 256;  // keys scored before their values are read (their values,
                                     // prefetched meanwhile, wait in L2: 128 KiB at head_dim 256)
constexpr int64_t kMinSlotsPerSplit = 256;
constexpr int64_t kAheadKeys = 6;  // key rows prefetched ahead on the AVX-512 path
std::atomic<bool> g_native_decode{true};  // the AVX-512 path (off: the portable loops, for tests)

// A stored row as fp32: float rows as they are, others converted into buf (16 lanes at a time).
template <typename T>
inline const float* load_row(const T* src, const float* /*scale*/, float* buf, int64_t d) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    int64_t e = 0;
#if defined(__AVX512F__)
    for (; e + 16 <= d; e += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + e));
      if constexpr (std::is_same_v<T, c10::BFloat16>)
        _mm512_storeu_ps(buf + e, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      else
        _mm512_storeu_ps(buf + e, _mm512_cvtph_ps(h));
    }
#endif
    for (; e < d; ++e) buf[e] = static_cast<float>(src[e]);
    return buf;
  }
}
template <>
inline const float* load_row<int8_t>(const int8_t* src, const float* scale, float* buf, int64_t d) {
  const float s = *scale;
  for (int64_t e = 0; e < d; ++e) buf[e] = s * static_cast<float>(src[e]);
  return buf;
}

template <typename T>
inline void store_row(const float* src, T* dst, float* /*scale*/, int64_t d) {
  for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(src[e]);
}
template <>
inline void store_row<int8_t>(const float* src, int8_t* dst, float* scale, int64_t d) {
  float amax = 0.0f;
  for (int64_t e = 0; e < d; ++e) amax = std::max(amax, std::fabs(src[e]));
  const float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
  for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<int8_t>(std::nearbyint(src[e] * inv));
  *scale = s;
}

struct Step {
  int64_t B, H, Hkv, G, S, D, window, used;
  bool ring;
  float softcap, scale;
};

// One work item's partial softmax: running max m, sum l and unnormalised output acc per head.
template <typename TQ, typename TC>
void partial(const Step& st, const TQ* q, const TC* ck, const TC* cv, const float* ks, const float* vs,
             const int64_t* slot_pos, int64_t b, int64_t hk, int64_t p, int64_t j0, int64_t j1, float* m, float* l,
             float* acc) {
  const int64_t G = st.G, D = st.D;
  std::vector<float> qf(G * D), row(D), s(G * kTileKeys);
  for (int64_t g = 0; g < G; ++g) {
    const TQ* qg = q + ((b * st.H + hk * G + g) * D);
    for (int64_t e = 0; e < D; ++e) qf[g * D + e] = static_cast<float>(qg[e]) * st.scale;
    m[g] = kNegInf;
    l[g] = 0.0f;
  }
  std::fill(acc, acc + G * D, 0.0f);
  const int64_t base = (b * st.Hkv + hk) * st.S;
  const int64_t* sp = slot_pos + b * st.S;
  for (int64_t t0 = j0; t0 < j1; t0 += kTileKeys) {
    const int64_t t1 = std::min(j1, t0 + kTileKeys), n = t1 - t0;
    bool any = false;
    for (int64_t j = t0; j < t1; ++j) {
      const int64_t kp = sp[j];
      const bool visible = kp >= 0 && kp <= p && (st.window <= 0 || p - kp < st.window);
      if (!visible) {
        for (int64_t g = 0; g < G; ++g) s[g * kTileKeys + (j - t0)] = kNegInf;
        continue;
      }
      any = true;
      const float* kr = load_row(ck + (base + j) * D, ks + base + j, row.data(), D);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf.data() + g * D;
        float dot = 0.0f;
        for (int64_t e = 0; e < D; ++e) dot += qg[e] * kr[e];
        if (st.softcap > 0.0f) dot = st.softcap * fast_tanh(dot / st.softcap);
        s[g * kTileKeys + (j - t0)] = dot;
      }
    }
    if (!any) continue;
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s.data() + g * kTileKeys;
      float mx = m[g];
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sg[j]);
      const float corr = m[g] == kNegInf ? 0.0f : fast_exp(m[g] - mx);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) {  // masked keys exactly 0 (fast_exp clamps, it never gives 0)
        const float e = fast_exp(sg[j] - mx);
        sg[j] = sg[j] == kNegInf ? 0.0f : e;
        sum += sg[j];
      }
      l[g] = l[g] * corr + sum;
      m[g] = mx;
      float* ag = acc + g * D;
      for (int64_t e = 0; e < D; ++e) ag[e] *= corr;
    }
    for (int64_t j = t0; j < t1; ++j) {
      if (s[j - t0] == 0.0f) {  // masked for every head (all heads share visibility)
        bool all_zero = true;
        for (int64_t g = 1; g < G && all_zero; ++g) all_zero = s[g * kTileKeys + (j - t0)] == 0.0f;
        if (all_zero) continue;
      }
      const float* vr = load_row(cv + (base + j) * D, vs + base + j, row.data(), D);
      for (int64_t g = 0; g < G; ++g) {
        const float w = s[g * kTileKeys + (j - t0)];
        float* ag = acc + g * D;
        for (int64_t e = 0; e < D; ++e) ag[e] += w * vr[e];
      }
    }
  }
}

#if defined(__AVX512BF16__)
// The same partial softmax with AVX-512, for every cache dtype. bf16: scores by vdpbf16ps
// (q rounded to bf16, as the native bf16 forward does), values two keys at a time by vdpbf16ps
// with the probabilities rounded to bf16 (as the bf16 forward rounds them before the product
// with V); fp32, fp16 and int8: keys and values widened 16 at a time (int8 scaled once per key),
// fp32 products. The G heads share each row read (the portable loops read it once per head);
// rows are prefetched ahead. head_dim a multiple of 32.
template <typename TC>
inline __m512 widen16(const TC* src) {
  if constexpr (std::is_same_v<TC, float>) {
    return _mm512_loadu_ps(src);
  } else if constexpr (std::is_same_v<TC, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  } else if constexpr (std::is_same_v<TC, c10::BFloat16>) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  }
}

// acc[g, c .. c + 16 * CH) += sum over the tile's n keys of s[g][j] * value(keys[j]).
template <int G, int CH, typename TC>
inline void values(const TC* cv, int64_t base, const int64_t* keys, int64_t n, const float (*s)[kTileKeys + 1],
                   float* acc, int64_t D, int64_t c) {
  __m512 a[G][CH];
  for (int g = 0; g < G; ++g)
    for (int h = 0; h < CH; ++h) a[g][h] = _mm512_loadu_ps(acc + g * D + c + 16 * h);
  for (int64_t j = 0; j < n; ++j) {
    const TC* vr = cv + (base + keys[j]) * D + c;
    __m512 v[CH];
    for (int h = 0; h < CH; ++h) v[h] = widen16(vr + 16 * h);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(s[g][j]);
      for (int h = 0; h < CH; ++h) a[g][h] = _mm512_fmadd_ps(w, v[h], a[g][h]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int h = 0; h < CH; ++h) _mm512_storeu_ps(acc + g * D + c + 16 * h, a[g][h]);
}

// The same for bf16 values with vdpbf16ps, two keys at a time: a weight pair (s[j], s[j + 1])
// rounded to bf16 (as a bf16 forward rounds its probabilities before the product with V) times
// the two rows interleaved lane by lane. The accumulators come out permuted within each block of
// 32: acc[c + 4L + i] holds element c + 8L + i, acc[c + 16 + 4L + i] element c + 8L + 4 + i
// (L: 128-bit lane, i < 4); unpermute() restores the order. n is even (the caller pads).
template <int G, int CH>
inline void values_pairs(const c10::BFloat16* cv, int64_t base, const int64_t* keys, int64_t n,
                         const int32_t (*w)[kTileKeys / 2 + 1], float* acc, int64_t D, int64_t c) {
  __m512 a[G][CH][2];
  for (int g = 0; g < G; ++g)
    for (int h = 0; h < CH; ++h)
      for (int k = 0; k < 2; ++k) a[g][h][k] = _mm512_loadu_ps(acc + g * D + c + 32 * h + 16 * k);
  for (int64_t j = 0; j < n; j += 2) {
    const c10::BFloat16* va = cv + (base + keys[j]) * D + c;
    const c10::BFloat16* vb = cv + (base + keys[j + 1]) * D + c;
    __m512bh lo[CH], hi[CH];
    for (int h = 0; h < CH; ++h) {
      const __m512i ra = _mm512_loadu_si512(va + 32 * h), rb = _mm512_loadu_si512(vb + 32 * h);
      lo[h] = (__m512bh)_mm512_unpacklo_epi16(ra, rb);
      hi[h] = (__m512bh)_mm512_unpackhi_epi16(ra, rb);
    }
    for (int g = 0; g < G; ++g) {
      const __m512bh wp = (__m512bh)_mm512_set1_epi32(w[g][j / 2]);
      for (int h = 0; h < CH; ++h) {
        a[g][h][0] = _mm512_dpbf16_ps(a[g][h][0], lo[h], wp);
        a[g][h][1] = _mm512_dpbf16_ps(a[g][h][1], hi[h], wp);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int h = 0; h < CH; ++h)
      for (int k = 0; k < 2; ++k) _mm512_storeu_ps(acc + g * D + c + 32 * h + 16 * k, a[g][h][k]);
}

// Undoes values_pairs' order in each block of 32 of rows x D accumulators.
inline void unpermute(float* acc, int64_t rows, int64_t D) {
  float t[32];
  for (int64_t c = 0; c < rows * D; c += 32) {
    for (int L = 0; L < 4; ++L)
      for (int i = 0; i < 4; ++i) {
        t[8 * L + i] = acc[c + 4 * L + i];
        t[8 * L + 4 + i] = acc[c + 16 + 4 * L + i];
      }
    std::copy(t, t + 32, acc + c);
  }
}

template <int G, typename TQ, typename TC>
void partial_simd(const Step& st, const TQ* q, const TC* ck, const TC* cv, const float* ks, const float* vs,
                  const int64_t* slot_pos, int64_t b, int64_t hk, int64_t p, int64_t j0, int64_t j1, float* m,
                  float* l, float* acc) {
  constexpr bool kBf16 = std::is_same_v<TC, c10::BFloat16>, kInt8 = std::is_same_v<TC, int8_t>;
  const int64_t D = st.D, nc = D / 32, row_bytes = D * static_cast<int64_t>(sizeof(TC));
  std::vector<__m512bh> qb(kBf16 ? G * nc : 0);
  std::vector<float> qf(kBf16 ? 0 : G * D);
  for (int g = 0; g < G; ++g) {
    const TQ* qg = q + ((b * st.H + hk * G + g) * D);
    for (int64_t c = 0; c < nc; ++c) {
      if constexpr (!kBf16) {
        for (int64_t e = c * 32; e < c * 32 + 32; ++e) qf[g * D + e] = static_cast<float>(qg[e]);
      } else if constexpr (std::is_same_v<TQ, c10::BFloat16>) {
        qb[g * nc + c] = (__m512bh)_mm512_loadu_si512(qg + c * 32);
      } else {
        qb[g * nc + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qg + c * 32 + 16), _mm512_loadu_ps(qg + c * 32));
      }
    }
    m[g] = kNegInf;
    l[g] = 0.0f;
  }
  std::fill(acc, acc + G * D, 0.0f);
  const int64_t base = (b * st.Hkv + hk) * st.S;
  const int64_t* sp = slot_pos + b * st.S;
  float s[G][kTileKeys + 1];  // + 1: values_pairs' pad
  int64_t keys[kTileKeys + 1];
  for (int64_t t0 = j0; t0 < j1; t0 += kTileKeys) {
    const int64_t t1 = std::min(j1, t0 + kTileKeys);
    int64_t n = 0;  // the tile's visible keys, compacted
    for (int64_t j = t0; j < t1; ++j) {
      const int64_t kp = sp[j];
      if (!(kp >= 0 && kp <= p && (st.window <= 0 || p - kp < st.window))) continue;
      const TC* kr = ck + (base + j) * D;
      // keep the memory busy: the key a few rows on, and this key's value (read after the tile)
      for (int64_t line = 0; line < row_bytes; line += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kr + kAheadKeys * D) + line, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(cv + (base + j) * D) + line, _MM_HINT_T1);
      }
      __m512 a[G];
      for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
      if constexpr (kBf16) {
        for (int64_t c = 0; c < nc; ++c) {
          const __m512bh kv = (__m512bh)_mm512_loadu_si512(kr + c * 32);
          for (int g = 0; g < G; ++g) a[g] = _mm512_dpbf16_ps(a[g], kv, qb[g * nc + c]);
        }
      } else {
        for (int64_t c = 0; c < D; c += 16) {
          const __m512 kv = widen16(kr + c);
          for (int g = 0; g < G; ++g) a[g] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(qf.data() + g * D + c), a[g]);
        }
      }
      const float key_scale = kInt8 ? st.scale * ks[base + j] : st.scale;
      for (int g = 0; g < G; ++g) s[g][n] = _mm512_reduce_add_ps(a[g]) * key_scale;
      keys[n++] = j;
    }
    if (n == 0) continue;
    if (st.softcap > 0.0f) {  // over the whole tile, where the loop vectorises
      const float cap = st.softcap, inv = 1.0f / st.softcap;
      for (int g = 0; g < G; ++g)
        for (int64_t j = 0; j < n; ++j) s[g][j] = cap * fast_tanh(s[g][j] * inv);
    }
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[g][j]);
      const float corr = m[g] == kNegInf ? 0.0f : fast_exp(m[g] - mx);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        s[g][j] = fast_exp(s[g][j] - mx);
        sum += s[g][j];
      }
      l[g] = l[g] * corr + sum;
      m[g] = mx;
      float* ag = acc + g * D;
      for (int64_t e = 0; e < D; ++e) ag[e] *= corr;
    }
    if constexpr (kBf16) {
      // two keys per vdpbf16ps: half the products and conversions of widening each value row
      if (n & 1) {  // an odd tile ends with a zero weight on a repeated key
        keys[n] = keys[n - 1];
        for (int g = 0; g < G; ++g) s[g][n] = 0.0f;
      }
      const int64_t pairs = (n + 1) / 2;
      int32_t w[G][kTileKeys / 2 + 1];
      for (int g = 0; g < G; ++g)
        for (int64_t i = 0; i < pairs; ++i)
          w[g][i] = static_cast<int32_t>(c10::BFloat16(s[g][2 * i]).x) |
                    (static_cast<int32_t>(c10::BFloat16(s[g][2 * i + 1]).x) << 16);
      // G x kBlocks x 2 chains of dependent products in flight keep the units busy
      constexpr int kBlocks = G >= 8 ? 1 : 8 / G;
      int64_t c = 0;
      for (; c + 32 * kBlocks <= D; c += 32 * kBlocks) values_pairs<G, kBlocks>(cv, base, keys, 2 * pairs, w, acc, D, c);
      for (; c < D; c += 32) values_pairs<G, 1>(cv, base, keys, 2 * pairs, w, acc, D, c);
    } else {
      if constexpr (kInt8)
        for (int64_t j = 0; j < n; ++j)  // int8 values: their scale joins the weights
          for (int g = 0; g < G; ++g) s[g][j] *= vs[base + keys[j]];
      // every head's output over the tile's values, kChunks x 16 lanes at a time: each lane's sum
      // is a chain of n dependent FMAs, so G x kChunks of them in flight keep the FMA units busy
      // (16 lanes of 2 heads at a time left 2 chains, bound by the FMA's latency, not its rate)
      constexpr int kChunks = G >= 8 ? 1 : 8 / G;
      int64_t c = 0;
      for (; c + 16 * kChunks <= D; c += 16 * kChunks) values<G, kChunks>(cv, base, keys, n, s, acc, D, c);
      for (; c < D; c += 16) values<G, 1>(cv, base, keys, n, s, acc, D, c);
    }
  }
  if constexpr (kBf16) unpermute(acc, G, D);
}
#endif

// Runs the work item on the fastest path there is for it.
template <typename TQ, typename TC>
void item(const Step& st, const TQ* q, const TC* ck, const TC* cv, const float* ks, const float* vs,
          const int64_t* slot_pos, int64_t b, int64_t hk, int64_t p, int64_t j0, int64_t j1, float* m, float* l,
          float* acc) {
#if defined(__AVX512BF16__)
  if (st.D % 32 == 0 && g_native_decode.load(std::memory_order_relaxed)) {  // every cache dtype
    switch (st.G) {
      case 1: return partial_simd<1>(st, q, ck, cv, ks, vs, slot_pos, b, hk, p, j0, j1, m, l, acc);
      case 2: return partial_simd<2>(st, q, ck, cv, ks, vs, slot_pos, b, hk, p, j0, j1, m, l, acc);
      case 4: return partial_simd<4>(st, q, ck, cv, ks, vs, slot_pos, b, hk, p, j0, j1, m, l, acc);
      case 8: return partial_simd<8>(st, q, ck, cv, ks, vs, slot_pos, b, hk, p, j0, j1, m, l, acc);
      default: break;
    }
  }
#endif
  partial<TQ, TC>(st, q, ck, cv, ks, vs, slot_pos, b, hk, p, j0, j1, m, l, acc);
}

template <typename TQ, typename TC>
void run(const Step& st, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache_k,
         at::Tensor& cache_v, const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
         at::Tensor& slot_pos, at::Tensor& last_pos, const at::Tensor& pos, at::Tensor& out) {
  const int64_t B = st.B, Hkv = st.Hkv, S = st.S, D = st.D, G = st.G;
  TC* ck = cache_k.data_ptr<TC>();
  TC* cv = cache_v.data_ptr<TC>();
  float* ks = k_scale ? k_scale->data_ptr<float>() : nullptr;
  float* vs = v_scale ? v_scale->data_ptr<float>() : nullptr;
  int64_t* sp = slot_pos.data_ptr<int64_t>();
  int64_t* lp = last_pos.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const TQ* kp = k.data_ptr<TQ>();
  const TQ* vp = v.data_ptr<TQ>();
  // store first: the new key is visible to its own query
  for (int64_t b = 0; b < B; ++b) {  // all checks before any write
    const int64_t p = pp[b];
    if (p < 0) continue;
    TORCH_CHECK(p > lp[b], "positions must increase: row ", b, " got position ", p, " after position ", lp[b]);
    TORCH_CHECK(st.ring || p < S, "position ", p, " is beyond this cache's ", S, " slots");
  }
  std::vector<float> row(D);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pp[b];
    if (p < 0) continue;
    const int64_t slot = st.ring ? p % S : p;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at = (b * Hkv + h) * S + slot;
      for (int64_t e = 0; e < D; ++e) row[e] = static_cast<float>(kp[(b * Hkv + h) * D + e]);
      store_row(row.data(), ck + at * D, ks ? ks + at : nullptr, D);
      for (int64_t e = 0; e < D; ++e) row[e] = static_cast<float>(vp[(b * Hkv + h) * D + e]);
      store_row(row.data(), cv + at * D, vs ? vs + at : nullptr, D);
    }
    sp[b * S + slot] = p;
    lp[b] = p;
  }
  // the slots each row scans: a ring all of them, or up to p while p < S (position q sits in
  // slot q % S, so a visible key, q <= p < S, sits in slot q <= p: a ring not yet full scans
  // only its filled part); a full cache those a window can reach, up to p
  std::vector<int64_t> lo(B), hi(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pp[b];
    if (st.ring) {
      lo[b] = 0, hi[b] = std::min(S, p + 1);
    } else {
      lo[b] = st.window > 0 ? std::max<int64_t>(0, p - st.window + 1) : 0;
      hi[b] = std::min(std::max<int64_t>(st.used, p + 1), S);
    }
    if (p < 0) hi[b] = lo[b];
    longest = std::max(longest, hi[b] - lo[b]);
  }
  const int64_t pairs = B * Hkv, threads = at::get_num_threads();
  int64_t splits = 1;
  if (pairs < threads && longest > kMinSlotsPerSplit)
    splits = std::min<int64_t>((2 * threads + pairs - 1) / pairs, (longest + kMinSlotsPerSplit - 1) / kMinSlotsPerSplit);
  std::vector<float> ms(pairs * splits * G), ls(pairs * splits * G), accs(pairs * splits * G * D);
  const TQ* qp = q.data_ptr<TQ>();
  at::parallel_for(0, pairs * splits, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t pair = i / splits, c = i % splits, b = pair / Hkv, hk = pair % Hkv;
      const int64_t span = hi[b] - lo[b], per = (span + splits - 1) / splits;
      const int64_t j0 = lo[b] + std::min(span, c * per), j1 = lo[b] + std::min(span, (c + 1) * per);
      item<TQ, TC>(st, qp, ck, cv, ks, vs, sp, b, hk, pp[b], j0, j1, ms.data() + i * G, ls.data() + i * G,
                      accs.data() + i * G * D);
    }
  });
  TQ* op = out.data_ptr<TQ>();
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / Hkv, hk = pair % Hkv;
    for (int64_t g = 0; g < G; ++g) {
      TQ* o = op + (b * st.H + hk * G + g) * D;
      float mx = kNegInf;
      for (int64_t c = 0; c < splits; ++c) mx = std::max(mx, ms[(pair * splits + c) * G + g]);
      if (mx == kNegInf) {  // a padding row
        for (int64_t e = 0; e < D; ++e) o[e] = static_cast<TQ>(0.0f);
        continue;
      }
      float total = 0.0f;
      std::vector<float> sum(D, 0.0f);
      for (int64_t c = 0; c < splits; ++c) {
        const int64_t at = (pair * splits + c) * G + g;
        if (ms[at] == kNegInf) continue;
        const float w = fast_exp(ms[at] - mx);
        total += w * ls[at];
        const float* a = accs.data() + at * D;
        for (int64_t e = 0; e < D; ++e) sum[e] += w * a[e];
      }
      for (int64_t e = 0; e < D; ++e) o[e] = static_cast<TQ>(sum[e] / total);
    }
  }
}

// q: (B, H, 1, D); k, v: (B, Hkv, 1, D) of q's dtype; cache_k/v: (B, Hkv, S, D) of the cache's
// dtype (int8 with k_scale/v_scale (B, Hkv, S)); slot_pos (B, S), last_pos (B,), pos (B,) int64.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor cache_k,
                            at::Tensor cache_v, const c10::optional<at::Tensor>& k_scale,
                            const c10::optional<at::Tensor>& v_scale, at::Tensor slot_pos, at::Tensor last_pos,
                            const at::Tensor& pos_in, int64_t window, bool ring, int64_t used, double softcap,
                            double scale) {
  const at::Tensor pos = pos_in.contiguous();
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.is_contiguous(), "q must be a contiguous (B, H, 1, D) tensor");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes(), "k and v must be contiguous, one shape");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous() && slot_pos.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must have one dtype");
  TORCH_CHECK(pos.scalar_type() == at::kLong && slot_pos.scalar_type() == at::kLong && last_pos.scalar_type() == at::kLong,
              "positions must be int64");
  Step st;
  st.B = q.size(0), st.H = q.size(1), st.D = q.size(3), st.Hkv = cache_k.size(1), st.S = cache_k.size(2);
  TORCH_CHECK(st.Hkv > 0 && st.H % st.Hkv == 0, "heads must be a multiple of heads_kv");
  TORCH_CHECK(k.size(0) == st.B && k.size(1) == st.Hkv && k.size(3) == st.D, "k does not match the cache");
  TORCH_CHECK(cache_k.size(0) == st.B && cache_k.size(3) == st.D, "the cache does not match q");
  st.G = st.H / st.Hkv, st.window = window, st.used = used, st.ring = ring;
  st.softcap = static_cast<float>(softcap), st.scale = static_cast<float>(scale);
  const bool int8 = cache_k.scalar_type() == at::kChar;
  TORCH_CHECK(!int8 || (k_scale && v_scale), "an int8 cache needs its scales");
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
    using TQ = scalar_t;
    switch (cache_k.scalar_type()) {
      case at::kFloat: run<TQ, float>(st, q, k, v, cache_k, cache_v, k_scale, v_scale, slot_pos, last_pos, pos, out); break;
      case at::kBFloat16:
        run<TQ, c10::BFloat16>(st, q, k, v, cache_k, cache_v, k_scale, v_scale, slot_pos, last_pos, pos, out);
        break;
      case at::kHalf: run<TQ, c10::Half>(st, q, k, v, cache_k, cache_v, k_scale, v_scale, slot_pos, last_pos, pos, out); break;
      case at::kChar: run<TQ, int8_t>(st, q, k, v, cache_k, cache_v, k_scale, v_scale, slot_pos, last_pos, pos, out); break;
      default: TORCH_CHECK(false, "unsupported cache dtype ", cache_k.scalar_type());
    }
  });
  return out;
}

// enable: 1 / 0 switches the AVX-512 path (every cache dtype) on / off, -1 leaves it;
// gives whether it runs (false where the CPU lacks AVX512_BF16).
bool native_decode(int64_t enable) {
  if (enable >= 0) g_native_decode.store(enable != 0);
#if defined(__AVX512BF16__)
  return g_native_decode.load();
#else
  return false;
#endif
}

}  // namespace
}  // namespace swattn

TORCH_LIBRARY_FRAGMENT(swattn, m) {
  m.def("native_decode(int enable) -> bool", &swattn::native_decode);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!)? k_scale, "
        "Tensor(d!)? v_scale, Tensor(e!) slot_pos, Tensor(f!) last_pos, Tensor pos, int window, bool ring, int used, "
        "float softcap, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(swattn, CPU, m) { m.impl("decode_attention", &swattn::decode_attention); }
