// swattn's linear-layer kernels for few rows (decoding, small batches): y = x W^T.
//
// Decoding reads every weight once per step and does little arithmetic with it, so its speed
// is the memory bandwidth's. These kernels read each weight byte once per call for all (up to
// 16) rows and split the output features across threads.
//
// Dense fp32 / bf16 weights (as stored, (N, K) row-major): each weight row is streamed once
// while the rows' partial sums stay in registers; bf16 through AVX512_BF16 dot products.
//
// Quantized weights (see swattn/quant.py, which defines the formats): blocks of 32 values
// along K with one fp16 scale each, stored in panels of 16 output features interleaved so
// that one 64-byte vector holds 4 consecutive values of each of the 16 features:
//   q8: byte (P, b, j, l, t) = q[16P + l, 32b + 4j + t] + 128 (unsigned), j = 0..7;
//   q4: byte (P, b, j, l, t) = q[.., 32b + 4j + t] | q[.., 32b + 4(j+4) + t] << 4, j = 0..3,
//       q in 0..15 (w = s * (q - 8));
//   scales (P, b, l) fp16.
// Activation rows are quantized per block of 32 to int8 (scale max|x| / 127, as llama.cpp's
// Q8_0 activations; in vector code, and rows in parallel for long ones), stored block-major.
// One vpdpbusd (AVX512-VNNI: unsigned x signed bytes) takes 4 values of 16 features against
// 4 values of one row broadcast, so a block costs each row 8 integer dot products and one
// float update for 16 features together, with no horizontal sums; the weights' offset (128 or
// 8) enters as the dot product's starting value, -offset * sum(x_q). Up to 4 rows, each thread
// reads the two halves of its panels side by side: two streams, block by block.
// Without VNNI the same integer arithmetic runs in portable loops (`linear_simd(0)` forces
// them, for tests).
//
// Prepacked bf16 weights (oneDNN's layout, read in place): see panel_linear below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SWATTN_VNNI 1
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__)
#define SWATTN_DPBF16 1
#endif

namespace swattn {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kLanes = 16;  // output features per interleaved panel
constexpr int kTile = 8;        // activation rows kept in registers per pass
constexpr int64_t kMaxRows = 16;
constexpr int64_t kAheadBytes = 8192;  // weight bytes prefetched ahead
constexpr int64_t kPairRows = 4;       // up to this many rows, two panels are read side by side
std::atomic<bool> g_simd{true};

bool use_simd() { return g_simd.load(std::memory_order_relaxed); }

// Activation rows quantized per block: int8 values, each block's scale, -offset * sum(q).
// Block-major, so that a kernel reaches every row of a block at fixed offsets from one
// pointer (row-major, 8 rows' pointers did not fit the registers: spills in the inner loop).
struct QuantRows {
  int64_t M = 0, K = 0;
  std::vector<int8_t> q;       // (K / 32, M, 32)
  std::vector<float> scale;    // (K / 32, M)
  std::vector<int32_t> start;  // (K / 32, M): -offset * sum of the block's q
};

// One block of 32 values at v (already float), quantized to qb; gives the block's scale and sum(q).
inline float quantize_block(const float* v, int8_t* qb, int32_t& sum) {
  float amax = 0.0f;
  for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
  const float d = amax / 127.0f;
  const float id = d > 0.0f ? 1.0f / d : 0.0f;
  sum = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    const int32_t qi = static_cast<int32_t>(std::nearbyint(v[i] * id));
    qb[i] = static_cast<int8_t>(std::max(-127, std::min(127, qi)));
    sum += qb[i];
  }
  return d;
}

#if SWATTN_VNNI
// The same for a block held in two vectors: the same products and rounding (to nearest even,
// as nearbyint in the default mode), so the same bytes as the loop above.
inline float quantize_block_simd(__m512 lo, __m512 hi, int8_t* qb, int32_t& sum) {
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float d = amax / 127.0f;
  const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
  const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
  const __m512i qlo = _mm512_max_epi32(bottom, _mm512_min_epi32(top, _mm512_cvtps_epi32(_mm512_mul_ps(lo, id))));
  const __m512i qhi = _mm512_max_epi32(bottom, _mm512_min_epi32(top, _mm512_cvtps_epi32(_mm512_mul_ps(hi, id))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(qhi));
  sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  return d;
}

inline void load_block(const float* x, __m512& lo, __m512& hi) {
  lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
}

inline void load_block(const c10::BFloat16* x, __m512& lo, __m512& hi) {
  const __m512i raw = _mm512_loadu_si512(x);  // 32 bf16: widening is a shift into the high half
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
}
#endif

// One block of x's row at xb, on the SIMD path where it runs.
template <typename T>
inline float quantize_block_at(const T* xb, int8_t* qb, int32_t& sum, bool simd) {
#if SWATTN_VNNI
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (simd) {
      __m512 lo, hi;
      load_block(xb, lo, hi);
      return quantize_block_simd(lo, hi, qb, sum);
    }
  }
#endif
  (void)simd;
  float v[kBlock];
  for (int64_t i = 0; i < kBlock; ++i) v[i] = static_cast<float>(xb[i]);
  return quantize_block(v, qb, sum);
}

template <typename T>
QuantRows quantize_rows(const T* x, int64_t M, int64_t K, int32_t offset, bool simd) {
  QuantRows r;
  r.M = M, r.K = K;
  const int64_t nb = K / kBlock;
  r.q.resize(M * K);
  r.scale.resize(M * nb);
  r.start.resize(M * nb);
  // rows in parallel once there is enough work to pay for waking the threads (8 rows of a
  // down projection's 9216: a one-panel call 21 -> 15 us on 2 threads; 4 rows gained nothing)
  at::parallel_for(0, M, M * K >= (1 << 16) ? 1 : M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b) {
        const T* xb = x + m * K + b * kBlock;
        int8_t* qb = r.q.data() + (b * M + m) * kBlock;
        int32_t sum = 0;
        r.scale[b * M + m] = quantize_block_at(xb, qb, sum, simd);
        r.start[b * M + m] = -offset * sum;
      }
    }
  });
  return r;
}

// The unsigned weight byte (value + offset) of feature l, column k within panel `w`.
template <int BITS>
inline int32_t weight_byte(const uint8_t* w, int64_t l, int64_t k) {
  const int64_t b = k / kBlock, j = (k % kBlock) / 4, t = k % 4;
  if constexpr (BITS == 8) {
    return w[((b * 8 + j) * kLanes + l) * 4 + t];
  } else {
    const uint8_t byte = w[((b * 4 + j % 4) * kLanes + l) * 4 + t];
    return j < 4 ? (byte & 0x0F) : (byte >> 4);
  }
}
template <int BITS>
constexpr int32_t kOffset = BITS == 8 ? 128 : 8;
template <int BITS>
constexpr int64_t kPanelBytesPerColumn = BITS == 8 ? kLanes : kLanes / 2;

// Feature l, column k of the panel at w (scales ws) as its value: the portable loops' dequantizer.
inline float weight_value(const uint8_t* w, const at::Half* ws, int64_t bits, int64_t l, int64_t k) {
  const int32_t q = bits == 8 ? weight_byte<8>(w, l, k) - kOffset<8> : weight_byte<4>(w, l, k) - kOffset<4>;
  return static_cast<float>(ws[(k / kBlock) * kLanes + l]) * static_cast<float>(q);
}

// Portable: a panel's 16 features for rows m0 .. m0+rows; out (rows, 16).
template <int BITS>
void panel_portable(const uint8_t* w, const at::Half* ws, const QuantRows& xr, int64_t m0, int rows, float* out) {
  const int64_t M = xr.M, nb = xr.K / kBlock;
  for (int r = 0; r < rows; ++r) {
    for (int64_t l = 0; l < kLanes; ++l) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t at = b * M + m0 + r;
        const int8_t* xq = xr.q.data() + at * kBlock;
        int32_t dot = xr.start[at];
        for (int64_t i = 0; i < kBlock; ++i) dot += weight_byte<BITS>(w, l, b * kBlock + i) * xq[i];
        acc += static_cast<float>(dot) * (static_cast<float>(ws[b * kLanes + l]) * xr.scale[at]);
      }
      out[r * kLanes + l] = acc;
    }
  }
}

#if SWATTN_VNNI
// acc += dot products of w's bytes with the 4 bytes at x, broadcast. Written out because the
// compilers emit a separate broadcast instead of the instruction's embedded one ({1to16}),
// which costs a vector slot per product on CPUs that split 512-bit operations.
inline void dpbusd_bcast(__m512i& acc, const __m512i& w, const int32_t* x) {
  asm("vpdpbusd %[x]%{1to16%}, %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "m"(*x));
}

// Block b of the panel at wi into wv (8 vectors of 4 bytes x 16 features, q4 unpacked to one
// value a byte); gives the block's 16 scales. R: the rows it is read for (the prefetch's choice).
template <int BITS, int R>
inline __m512 fetch_block(const uint8_t* wi, const at::Half* ws, int64_t b, __m512i* wv) {
  constexpr int64_t block_bytes = BITS * kBlock * kLanes / 8;
  // ask for the weights 8 KB ahead: wherever the loop computes long enough per byte (q4, or
  // several rows) the hardware prefetcher alone leaves the memory idle, and the bytes in flight
  // must cover the memory's latency at its rate (a 9216 x 2304 q4 product at 8 rows: 0.42 ms
  // with 6 blocks ahead, 1.5 KB; 0.30 ms with 8 KB; one-row q4 products of a layer's weights on
  // 2 Zen 5 cores: 61-64 -> 82 GB/s with a plain read at 85, 2 rows 55 -> 87-90). Not for one
  // row of q8, the least work per byte, where the prefetcher keeps up and the extra
  // instructions cost (54-56 -> 51-52 GB/s with a plain read at 52).
  if constexpr (R > 1 || BITS == 4)
    for (int64_t line = 0; line < block_bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wi + b * block_bytes + kAheadBytes + line), _MM_HINT_T0);
  if constexpr (BITS == 8) {
    for (int j = 0; j < 8; ++j) wv[j] = _mm512_loadu_si512(wi + (b * 8 + j) * 64);
  } else {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      const __m512i raw = _mm512_loadu_si512(wi + (b * 4 + j) * 64);
      wv[j] = _mm512_and_si512(raw, low);
      wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    }
  }
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + b * kLanes)));
}

// Panels w[0..P) against rows m0 .. m0+R, block by block in lockstep: P = 2 reads two weight
// streams side by side, which the memory serves faster than one (a one-row q8 product of a
// layer's weights on 2 Zen 5 cores: 69 -> 80 GB/s, q4 58 -> 65, with a plain read at 83).
// out[i]: panel i's (R, 16) results.
//
// Zen 5 issues two vector loads a cycle (a 64-byte one takes both), and a dot product's
// broadcast operand is one of them: with every activation group loaded for every product the
// loads, not the two multiply pipes, bound the loop from a few rows on. So two panels share
// each broadcast, and from 5 rows half of them come from shuffles.
template <int BITS, int R, int P>
void panel_vnni(const uint8_t* const* w, const at::Half* const* ws, const QuantRows& xr, int64_t m0, float* const* out) {
  const int64_t M = xr.M, nb = xr.K / kBlock;
  __m512 acc[P][R];
  for (int i = 0; i < P; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const int8_t* xq = xr.q.data() + m0 * kBlock;  // block b, row r: xq + (b * M + r) * 32
  const float* xs = xr.scale.data() + m0;        // block b, row r: xs[b * M + r]
  const int32_t* x0 = xr.start.data() + m0;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* xqb = xq + b * M * kBlock;
    const float* xsb = xs + b * M;
    const int32_t* x0b = x0 + b * M;
    if constexpr (P == 2 && R > 1) {
      // two panels: each group broadcast once into a register for both panels' products (in
      // L2, cycles a panel and block: q4 2 rows 15.4-20.0 -> 13.6, 4 rows 24.0 -> 22.5; q8 2
      // rows 20.2-20.8 -> 18.0-18.8, 4 rows 26.2-26.7 -> 22.7-23.2; L3-resident layer weights on
      // 2 cores, alternating processes over six rounds: q4 2 rows 114-122 -> 126-138 GB/s, 4
      // rows 78-80 -> 80-85, q8 2 rows 155-167 -> 159-180, 4 rows 116-129 -> 146-154; one row,
      // which memory bounds anyway, measured 2-3% slower this way and keeps the loop below).
      // One chain a panel: the two panels' chains are the independent work that covers the
      // products' latency.
      __m512i wa[8], wb[8];
      const __m512 sa = fetch_block<BITS, R>(w[0], ws[0], b, wa);
      const __m512 sb = fetch_block<BITS, R>(w[1], ws[1], b, wb);
      for (int r = 0; r < R; ++r) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(xqb + r * kBlock);
        const __m512i start = _mm512_set1_epi32(x0b[r]);
        __m512i da = start, db = start;
        for (int j = 0; j < 8; ++j) {
          const __m512i x = _mm512_set1_epi32(xb[j]);
          da = _mm512_dpbusd_epi32(da, wa[j], x);
          db = _mm512_dpbusd_epi32(db, wb[j], x);
        }
        const __m512 xsr = _mm512_set1_ps(xsb[r]);
        acc[0][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(da), _mm512_mul_ps(sa, xsr), acc[0][r]);
        acc[1][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(db), _mm512_mul_ps(sb, xsr), acc[1][r]);
      }
    } else {
      for (int i = 0; i < P; ++i) {
        __m512i wv[8];
        const __m512 s = fetch_block<BITS, R>(w[i], ws[i], b, wv);
        for (int r = 0; r < R; ++r) {
          const int32_t* xb = reinterpret_cast<const int32_t*>(xqb + r * kBlock);
          __m512i d0 = _mm512_set1_epi32(x0b[r]);
          __m512i d1 = _mm512_setzero_si512();  // two chains: the dot products' latency, not their rate
          for (int j = 0; j < 4; j += 2) {
            dpbusd_bcast(d0, wv[j], xb + j);
            dpbusd_bcast(d1, wv[j + 1], xb + j + 1);
          }
          if constexpr (R > kPairRows) {
            // from 5 rows the row's last 4 groups come from one 16-byte broadcast and in-lane
            // shuffles, which run beside the products (8 rows, q8, in L2: 46 cycles a block, 42
            // with the shuffles, 40 the bound of its 64 products and 16 multiplies on the two
            // multiply pipes; all 8 groups by shuffles: 50, the shuffle pipes' turn)
            const __m512i high = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 4)));
            d0 = _mm512_dpbusd_epi32(d0, wv[4], _mm512_shuffle_epi32(high, _MM_PERM_AAAA));
            d1 = _mm512_dpbusd_epi32(d1, wv[5], _mm512_shuffle_epi32(high, _MM_PERM_BBBB));
            d0 = _mm512_dpbusd_epi32(d0, wv[6], _mm512_shuffle_epi32(high, _MM_PERM_CCCC));
            d1 = _mm512_dpbusd_epi32(d1, wv[7], _mm512_shuffle_epi32(high, _MM_PERM_DDDD));
          } else {
            for (int j = 4; j < 8; j += 2) {
              dpbusd_bcast(d0, wv[j], xb + j);
              dpbusd_bcast(d1, wv[j + 1], xb + j + 1);
            }
          }
          const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1));
          acc[i][r] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(xsb[r])), acc[i][r]);
        }
      }
    }
  }
  for (int i = 0; i < P; ++i)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[i] + r * kLanes, acc[i][r]);
}

// P panels side by side (2 only up to kPairRows rows: beyond, the loop computes long enough per
// block that one stream keeps up, and two panels' accumulators would not fit the registers).
template <int BITS, int P>
void panel_simd(const uint8_t* const* w, const at::Half* const* ws, const QuantRows& xr, int64_t m0, int rows,
                float* const* out) {
  switch (rows) {
    case 1: return panel_vnni<BITS, 1, P>(w, ws, xr, m0, out);
    case 2: return panel_vnni<BITS, 2, P>(w, ws, xr, m0, out);
    case 3: return panel_vnni<BITS, 3, P>(w, ws, xr, m0, out);
    case 4: return panel_vnni<BITS, 4, P>(w, ws, xr, m0, out);
    case 5: return panel_vnni<BITS, 5, 1>(w, ws, xr, m0, out);
    case 6: return panel_vnni<BITS, 6, 1>(w, ws, xr, m0, out);
    case 7: return panel_vnni<BITS, 7, 1>(w, ws, xr, m0, out);
    default: return panel_vnni<BITS, 8, 1>(w, ws, xr, m0, out);
  }
}
#endif

template <typename T>
inline void store(T* y, float v) { *y = static_cast<T>(v); }

// A thread's items [s, e) as two streams read side by side: pair(a, b) for a in the first half
// and b its twin in the second; gives where the items left over (one, if the count is odd) start.
template <typename Pair>
int64_t side_by_side(int64_t s, int64_t e, Pair pair) {
  const int64_t half = (e - s) / 2;
  for (int64_t i = 0; i < half; ++i) pair(s + i, s + half + i);
  return s + 2 * half;
}

// Splits the N output features across threads; fn(n, rows m0.., count, results) per feature.
template <typename T, typename Fn>
void over_features(int64_t M, int64_t N, T* y, Fn fn) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float res[kTile];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kTile, M - m0));
        fn(n, m0, rows, res);
        for (int r = 0; r < rows; ++r) store(y + (m0 + r) * N + n, res[r]);
      }
    }
  });
}

// x: (..., K) contiguous, 1..16 rows in all; gives the row count.
int64_t check_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be a contiguous (..., in_features) tensor");
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, the weight ", K);
  const int64_t rows = x.numel() / K;
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "these kernels take 1..", kMaxRows, " rows, got ", rows);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  return rows;
}

// The output's shape: x's with the last dimension N.
std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// y (..., N) = x (..., K) W^T for a q8 (bits 8) or q4 (bits 4) weight in panels: qweight
// uint8 (ceil(N/16), K * 16 * bits / 8), scales fp16 (ceil(N/16), K / 32 * 16).
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, int64_t bits,
                        int64_t N) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && scales.is_contiguous(), "weights must be contiguous");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf,
              "qweight must be uint8 and scales float16");
  const int64_t panels = qweight.size(0), K = qweight.size(1) * 8 / (kLanes * bits), nb = K / kBlock;
  TORCH_CHECK(panels == (N + kLanes - 1) / kLanes, "qweight has ", panels, " panels, not enough for ", N, " features");
  TORCH_CHECK(K % 64 == 0, "in_features must be a multiple of 64, got ", K);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == panels && scales.size(1) == nb * kLanes, "scales have the wrong shape");
  const int64_t M = check_rows(x, K);
  const bool simd = use_simd();
  QuantRows xr;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "quantize_rows", [&] {
    xr = quantize_rows(x.data_ptr<scalar_t>(), M, K, bits == 8 ? kOffset<8> : kOffset<4>, simd);
  });
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  const uint8_t* wq = qweight.data_ptr<uint8_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  const int64_t panel_bytes = qweight.size(1), panel_scales = scales.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "quant_linear", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    // panel p's results (rows m0.., 16 features) into y
    auto emit = [&](int64_t p, int64_t m0, int rows, const float* res) {
      const int64_t n0 = p * kLanes, lanes = std::min(kLanes, N - n0);
      for (int r = 0; r < rows; ++r)
        for (int64_t l = 0; l < lanes; ++l) yp[(m0 + r) * N + n0 + l] = static_cast<scalar_t>(res[r * kLanes + l]);
    };
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      float res[2][kTile * kLanes];
      float* outs[2] = {res[0], res[1]};
      int64_t p = p0;
#if SWATTN_VNNI
      // few rows: each thread reads the two halves of its panels side by side
      if (simd && M <= kPairRows) {
        p = side_by_side(p0, p1, [&](int64_t pa, int64_t pb) {
          const uint8_t* w[2] = {wq + pa * panel_bytes, wq + pb * panel_bytes};
          const at::Half* ws[2] = {sc + pa * panel_scales, sc + pb * panel_scales};
          if (bits == 8) panel_simd<8, 2>(w, ws, xr, 0, static_cast<int>(M), outs);
          else panel_simd<4, 2>(w, ws, xr, 0, static_cast<int>(M), outs);
          emit(pa, 0, static_cast<int>(M), res[0]);
          emit(pb, 0, static_cast<int>(M), res[1]);
        });
      }
#endif
      for (; p < p1; ++p) {
        const uint8_t* w = wq + p * panel_bytes;
        const at::Half* ws = sc + p * panel_scales;
        for (int64_t m0 = 0; m0 < M; m0 += kTile) {
          const int rows = static_cast<int>(std::min<int64_t>(kTile, M - m0));
#if SWATTN_VNNI
          if (simd) {
            if (bits == 8) panel_simd<8, 1>(&w, &ws, xr, m0, rows, outs);
            else panel_simd<4, 1>(&w, &ws, xr, m0, rows, outs);
          } else
#endif
          {
            (void)simd;
            if (bits == 8) panel_portable<8>(w, ws, xr, m0, rows, res[0]);
            else panel_portable<4>(w, ws, xr, m0, rows, res[0]);
          }
          emit(p, m0, rows, res[0]);
        }
      }
    });
  });
  return y;
}

// Dense weights (fp32 or bf16, the dtype of x): each weight row streamed once for all rows.
template <typename T>
void dense_portable(const T* w, const T* x, int64_t K, int64_t m0, int rows, float* out) {
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + (m0 + r) * K;
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(w[k]) * static_cast<float>(xr[k]);
    out[r] = acc;
  }
}

#if SWATTN_VNNI
template <int R>
void dense_f32(const float* w, const float* x, int64_t K, int64_t m0, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = _mm512_loadu_ps(w + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (m0 + r) * K + k), acc[r]);
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + (m0 + r) * K + k), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

#if SWATTN_VNNI && SWATTN_DPBF16
template <int R>
void dense_bf16(const c10::BFloat16* w, const c10::BFloat16* x, int64_t K, int64_t m0, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(x + (m0 + r) * K + k));
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m0 + r) * K + k));
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

#if SWATTN_VNNI && SWATTN_DPBF16
// Two weight rows wa, wb against rows 0..R of x, read side by side (two streams, as the
// quantized kernel's panels); out (2, R). fp32 and bf16 only (the dispatch also names fp64).
template <int R, typename T>
void dense_pair(const T*, const T*, const T*, int64_t, float*) {
  TORCH_CHECK(false, "no paired kernel for this dtype");
}

template <int R>
void dense_pair(const float* wa, const float* wb, const float* x, int64_t K, float* out) {
  __m512 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 va = _mm512_loadu_ps(wa + k), vb = _mm512_loadu_ps(wb + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      a[r] = _mm512_fmadd_ps(va, xv, a[r]), b[r] = _mm512_fmadd_ps(vb, xv, b[r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 va = _mm512_maskz_loadu_ps(mask, wa + k), vb = _mm512_maskz_loadu_ps(mask, wb + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * K + k);
      a[r] = _mm512_fmadd_ps(va, xv, a[r]), b[r] = _mm512_fmadd_ps(vb, xv, b[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(a[r]), out[R + r] = _mm512_reduce_add_ps(b[r]);
}

template <int R>
void dense_pair(const c10::BFloat16* wa, const c10::BFloat16* wb, const c10::BFloat16* x, int64_t K, float* out) {
  __m512 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512bh va = (__m512bh)_mm512_loadu_si512(wa + k), vb = (__m512bh)_mm512_loadu_si512(wb + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * K + k);
      a[r] = _mm512_dpbf16_ps(a[r], va, xv), b[r] = _mm512_dpbf16_ps(b[r], vb, xv);
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
    const __m512bh va = (__m512bh)_mm512_maskz_loadu_epi16(mask, wa + k), vb = (__m512bh)_mm512_maskz_loadu_epi16(mask, wb + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * K + k);
      a[r] = _mm512_dpbf16_ps(a[r], va, xv), b[r] = _mm512_dpbf16_ps(b[r], vb, xv);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(a[r]), out[R + r] = _mm512_reduce_add_ps(b[r]);
}
#endif

#define SWATTN_ROWS_SWITCH(KERNEL, ...)          \
  switch (rows) {                                \
    case 1: KERNEL<1>(__VA_ARGS__); break;       \
    case 2: KERNEL<2>(__VA_ARGS__); break;       \
    case 3: KERNEL<3>(__VA_ARGS__); break;       \
    case 4: KERNEL<4>(__VA_ARGS__); break;       \
    case 5: KERNEL<5>(__VA_ARGS__); break;       \
    case 6: KERNEL<6>(__VA_ARGS__); break;       \
    case 7: KERNEL<7>(__VA_ARGS__); break;       \
    default: KERNEL<8>(__VA_ARGS__); break;      \
  }

// One weight row (feature) against rows m0 .. m0+rows of x, on the fastest kernel built here.
template <typename T>
void dense_feature(const T* w, const T* x, int64_t K, int64_t m0, int rows, float* res, bool simd) {
#if SWATTN_VNNI
  if constexpr (std::is_same_v<T, float>) {
    if (simd) {
      SWATTN_ROWS_SWITCH(dense_f32, w, x, K, m0, res);
      return;
    }
  }
#endif
#if SWATTN_VNNI && SWATTN_DPBF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (simd) {
      SWATTN_ROWS_SWITCH(dense_bf16, w, x, K, m0, res);
      return;
    }
  }
#endif
  (void)simd;
  dense_portable(w, x, K, m0, rows, res);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous (N, K) tensor");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must have one dtype");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t M = check_rows(x, K);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  const bool simd = use_simd();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dense_linear", [&] {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
      const scalar_t* w = weight.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
#if SWATTN_VNNI && SWATTN_DPBF16
      if (simd && M <= kPairRows) {  // few rows: each thread reads the two halves of its features side by side
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
          float res[2 * kPairRows];
          auto pair = [&](int64_t a, int64_t b) {
            switch (M) {
              case 1: dense_pair<1>(w + a * K, w + b * K, xp, K, res); break;
              case 2: dense_pair<2>(w + a * K, w + b * K, xp, K, res); break;
              case 3: dense_pair<3>(w + a * K, w + b * K, xp, K, res); break;
              default: dense_pair<4>(w + a * K, w + b * K, xp, K, res); break;
            }
            for (int64_t r = 0; r < M; ++r) store(yp + r * N + a, res[r]), store(yp + r * N + b, res[M + r]);
          };
          for (int64_t n = side_by_side(n0, n1, pair); n < n1; ++n) {
            dense_feature(w + n * K, xp, K, 0, static_cast<int>(M), res, simd);
            for (int64_t r = 0; r < M; ++r) store(yp + r * N + n, res[r]);
          }
        });
        return;
      }
#endif
      over_features(M, N, yp, [&](int64_t n, int64_t m0, int rows, float* res) {
        dense_feature(w + n * K, xp, K, m0, rows, res, simd);
      });
    }
  });
  return y;
}

// bf16 weights in oneDNN's blocked layout for bf16 products (what PrepackedLinear holds; the
// layout is checked on each weight before this kernel is given it, see swattn/ops/linear.py):
// panels of 64 features, each (K / 2, 64, 2): element (n, k) at
//   ((n / 64) * (K / 2) + k / 2) * 128 + (n % 64) * 2 + k % 2.
// One 64-byte vector holds a pair of columns of 16 features, the operand vdpbf16ps wants: each
// takes one row's pair of x values broadcast, so a panel needs no horizontal sums, and a thread
// streams its panels once for all rows (oneDNN's own product read them at 65-73 GB/s for one
// row where a plain-layout stream reached 77-81 on 2 Zen 5 cores).
constexpr int64_t kPanelFeatures = 64;
// weight bytes prefetched ahead of each stream (one row, 8 layer-shaped weights in turn on 2 Zen 5
// cores, in the VM's slow memory state: 42-46 GB/s without, 47-52 with 2 KB, level with the
// plain-layout kernel; 4 and 8 KB no better)
constexpr int64_t kPanelAhead = 2048;
constexpr int64_t kPanelPairs = 256;  // column pairs per block when rows come in several tiles

#if SWATTN_VNNI && SWATTN_DPBF16
// Column pairs [c0, c1) of panels w[0..P) against rows 0..R of x (row length K): acc[i] (R, 64)
// of panel i, added to. P = 2 reads two panels side by side (two streams, as the other kernels).
template <int R, int P>
void bf16_panels(const c10::BFloat16* const* w, const c10::BFloat16* x, int64_t K, int64_t c0, int64_t c1,
                 float* const* acc) {
  __m512 a[P][R][4];
  for (int i = 0; i < P; ++i)
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < 4; ++f) a[i][r][f] = _mm512_loadu_ps(acc[i] + r * kPanelFeatures + 16 * f);
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);  // row r's pair c at xp[r * K / 2 + c]
  for (int64_t c = c0; c < c1; ++c) {
    for (int i = 0; i < P; ++i) {
      const c10::BFloat16* wc = w[i] + c * 2 * kPanelFeatures;
      for (int f = 0; f < 4; ++f) _mm_prefetch(reinterpret_cast<const char*>(wc + 32 * f) + kPanelAhead, _MM_HINT_T0);
      __m512bh wv[4];
      for (int f = 0; f < 4; ++f) wv[f] = (__m512bh)_mm512_loadu_si512(wc + 32 * f);
      // the row's pair broadcast once into a register for the panel's 4 vectors: Zen 5 issues two
      // vector loads a cycle, and 4 embedded broadcasts of the same pair were 4 of them (a 4.7 MB
      // prepacked weight, L3-resident, 2 cores, alternating processes over three rounds: 2 rows
      // 118-129 -> 170-184 GB/s, 4 rows 134-142 -> 163-170, 8 rows 70-78 -> 94-97, 1 row level)
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[r * (K / 2) + c]);
        for (int f = 0; f < 4; ++f) a[i][r][f] = _mm512_dpbf16_ps(a[i][r][f], wv[f], xv);
      }
    }
  }
  for (int i = 0; i < P; ++i)
    for (int r = 0; r < R; ++r)
      for (int f = 0; f < 4; ++f) _mm512_storeu_ps(acc[i] + r * kPanelFeatures + 16 * f, a[i][r][f]);
}

template <int P>
void bf16_panels_rows(int rows, const c10::BFloat16* const* w, const c10::BFloat16* x, int64_t K, int64_t c0,
                      int64_t c1, float* const* acc) {
  switch (rows) {
    case 1: return bf16_panels<1, P>(w, x, K, c0, c1, acc);
    case 2: return bf16_panels<2, P>(w, x, K, c0, c1, acc);
    case 3: return bf16_panels<3, 1>(w, x, K, c0, c1, acc);
    default: return bf16_panels<4, 1>(w, x, K, c0, c1, acc);
  }
}
#endif

// The same sums in portable loops (CPUs without AVX512_BF16, and linear_simd(0) for tests).
void bf16_panel_portable(const c10::BFloat16* w, const c10::BFloat16* x, int64_t M, int64_t K, float* acc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t l = 0; l < kPanelFeatures; ++l) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        sum += static_cast<float>(w[(k / 2) * 2 * kPanelFeatures + l * 2 + k % 2]) * static_cast<float>(x[m * K + k]);
      acc[m * kPanelFeatures + l] = sum;
    }
}

// y (..., N) = x (..., K) W^T, bf16, for W (N, K) in the panels above (`panels`: N * K values;
// N a multiple of 64, K of 2), 1..16 rows.
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t N) {
  TORCH_CHECK(panels.is_contiguous() && panels.scalar_type() == at::kBFloat16, "panels must be contiguous bf16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bf16");
  TORCH_CHECK(N > 0 && N % kPanelFeatures == 0, "N must be a positive multiple of 64, got ", N);
  const int64_t K = panels.numel() / N;
  TORCH_CHECK(K * N == panels.numel() && K % 2 == 0, "panels hold ", panels.numel(), " values, not N x K with K even");
  const int64_t M = check_rows(x, K);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  const c10::BFloat16* wp = panels.data_ptr<c10::BFloat16>();
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t count = N / kPanelFeatures, panel = kPanelFeatures * K, pairs = K / 2;
  const bool simd = use_simd();
  auto emit = [&](int64_t p, const float* acc) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t l = 0; l < kPanelFeatures; ++l) yp[m * N + p * kPanelFeatures + l] = c10::BFloat16(acc[m * kPanelFeatures + l]);
  };
  at::parallel_for(0, count, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(2 * kMaxRows * kPanelFeatures);
    float* acc[2] = {buf.data(), buf.data() + kMaxRows * kPanelFeatures};
    int64_t p = p0;
#if SWATTN_VNNI && SWATTN_DPBF16
    if (simd) {
      if (M <= 2) {  // each thread reads the two halves of its panels side by side
        p = side_by_side(p0, p1, [&](int64_t pa, int64_t pb) {
          const c10::BFloat16* w[2] = {wp + pa * panel, wp + pb * panel};
          std::fill(buf.begin(), buf.end(), 0.0f);
          bf16_panels_rows<2>(static_cast<int>(M), w, xp, K, 0, pairs, acc);
          emit(pa, acc[0]);
          emit(pb, acc[1]);
        });
      }
      for (; p < p1; ++p) {
        const c10::BFloat16* w = wp + p * panel;
        std::fill(buf.begin(), buf.end(), 0.0f);
        if (M <= 4) {
          bf16_panels_rows<1>(static_cast<int>(M), &w, xp, K, 0, pairs, acc);
        } else {  // rows in tiles of 4, block by block: a block read again for each tile comes from the cache
          for (int64_t c0 = 0; c0 < pairs; c0 += kPanelPairs)
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
              float* tile = acc[0] + m0 * kPanelFeatures;
              bf16_panels_rows<1>(static_cast<int>(std::min<int64_t>(4, M - m0)), &w, xp + m0 * K, K, c0,
                                  std::min(pairs, c0 + kPanelPairs), &tile);
            }
        }
        emit(p, acc[0]);
      }
      return;
    }
#endif
    (void)simd;
    for (; p < p1; ++p) {
      bf16_panel_portable(wp + p * panel, xp, M, K, acc[0]);
      emit(p, acc[0]);
    }
  });
  return y;
}

#if SWATTN_VNNI
// One feature's block of 32 values from its run of 4-byte groups in column order (q8: 8 groups
// of bytes; q4: 4 groups, low nibbles columns 0..15, high ones 16..31): less the format's
// offset, times scale, stored at dst.
template <int BITS, typename T>
inline void store_run(const uint32_t* run, float scale, T* dst) {
  __m512i lo, hi;  // columns 0..15 and 16..31
  if constexpr (BITS == 8) {
    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(run));
    lo = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(v));
    hi = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1));
  } else {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(run)));
    lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
    hi = _mm512_srli_epi32(v, 4);
  }
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i offset = _mm512_set1_epi32(kOffset<BITS>);
  const __m512 a = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, offset)));
  const __m512 c = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, offset)));
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(dst, a);
    _mm512_storeu_ps(dst + 16, c);
  } else {
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(c, a));  // round to nearest even, as the cast
  }
}

// One panel's first `lanes` features, all K columns, into rows of `o` (row length K): each
// block's vectors transposed to one run of 32 values per feature, widened, scaled and stored
// 16 at a time (the scalar loop went value by value through weight_byte).
template <int BITS, typename T>
void dequantize_panel(const uint8_t* w, const at::Half* ws, int64_t K, int64_t lanes, T* o) {
  constexpr int kVectors = BITS == 8 ? 8 : 4;  // 64-byte vectors per block
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(w + b * kVectors * 64);
    alignas(64) uint32_t runs[kLanes][kVectors];  // feature l's 4-byte groups in column order
    for (int j = 0; j < kVectors; ++j)
      for (int l = 0; l < kLanes; ++l) runs[l][j] = src[j * kLanes + l];
    for (int64_t l = 0; l < lanes; ++l)
      store_run<BITS>(runs[l], static_cast<float>(ws[b * kLanes + l]), o + l * K + b * kBlock);
  }
}

// One feature (lane l of the panel at w), all K columns, into o: an embedding row.
template <int BITS, typename T>
void dequantize_feature(const uint8_t* w, const at::Half* ws, int64_t K, int64_t l, T* o) {
  constexpr int kVectors = BITS == 8 ? 8 : 4;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(w + b * kVectors * 64);
    alignas(32) uint32_t run[8];
    for (int j = 0; j < kVectors; ++j) run[j] = src[j * kLanes + l];
    store_run<BITS>(run, static_cast<float>(ws[b * kLanes + l]), o + b * kBlock);
  }
}
#endif

// Features [row0, row1) (row0 a multiple of 16) of a quantized weight as dense (rows, K)
// values of `like`'s dtype: prefill's panels.
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, int64_t row0, int64_t row1,
                      const at::Tensor& like) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  const int64_t panels = qweight.size(0), K = qweight.size(1) * 8 / (kLanes * bits);
  TORCH_CHECK(0 <= row0 && row0 % kLanes == 0 && row0 <= row1 && row1 <= panels * kLanes, "feature range out of bounds");
  at::Tensor out = at::empty({row1 - row0, K}, qweight.options().dtype(like.scalar_type()));
  const uint8_t* wq = qweight.data_ptr<uint8_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  const int64_t panel_bytes = qweight.size(1), panel_scales = scales.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, like.scalar_type(), "dequantize", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(row0 / kLanes, (row1 + kLanes - 1) / kLanes, 4, [&](int64_t p0, int64_t p1) {
#if SWATTN_VNNI && SWATTN_DPBF16
      constexpr bool kNative = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>;
      if constexpr (kNative) {
        if (use_simd()) {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t n0 = p * kLanes, lanes = std::min(kLanes, row1 - n0);
            scalar_t* dst = o + (n0 - row0) * K;
            if (bits == 8)
              dequantize_panel<8>(wq + p * panel_bytes, sc + p * panel_scales, K, lanes, dst);
            else
              dequantize_panel<4>(wq + p * panel_bytes, sc + p * panel_scales, K, lanes, dst);
          }
          return;
        }
      }
#endif
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* w = wq + p * panel_bytes;
        const at::Half* ws = sc + p * panel_scales;
        const int64_t n0 = p * kLanes, lanes = std::min(kLanes, row1 - n0);
        for (int64_t l = 0; l < lanes; ++l)
          for (int64_t k = 0; k < K; ++k)
            o[(n0 + l - row0) * K + k] = static_cast<scalar_t>(weight_value(w, ws, bits, l, k));
      }
    });
  });
  return out;
}

// Features `ids` (int64, each in [0, N)) of a quantized weight with N features as dense
// (len(ids), K) rows of `like`'s dtype: a decode step's embedding rows, in one call.
at::Tensor dequantize_rows(const at::Tensor& qweight, const at::Tensor& scales, int64_t bits, const at::Tensor& ids,
                           int64_t N, const at::Tensor& like) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids must be a 1-d int64 tensor");
  const int64_t panels = qweight.size(0), K = qweight.size(1) * 8 / (kLanes * bits), n = ids.size(0);
  TORCH_CHECK(N <= panels * kLanes, "qweight has ", panels, " panels, not enough for ", N, " features");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK_INDEX(0 <= id[r] && id[r] < N, "index ", id[r], " is out of range for ", N, " rows");
  at::Tensor out = at::empty({n, K}, qweight.options().dtype(like.scalar_type()));
  const uint8_t* wq = qweight.data_ptr<uint8_t>();
  const at::Half* sc = scales.data_ptr<at::Half>();
  const int64_t panel_bytes = qweight.size(1), panel_scales = scales.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, like.scalar_type(), "dequantize_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) {  // a few rows: not worth waking the threads
      const int64_t p = id[r] / kLanes, l = id[r] % kLanes;
      const uint8_t* w = wq + p * panel_bytes;
      const at::Half* ws = sc + p * panel_scales;
#if SWATTN_VNNI && SWATTN_DPBF16
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
        if (use_simd()) {
          if (bits == 8) dequantize_feature<8>(w, ws, K, l, o + r * K);
          else dequantize_feature<4>(w, ws, K, l, o + r * K);
          continue;
        }
      }
#endif
      for (int64_t k = 0; k < K; ++k) o[r * K + k] = static_cast<scalar_t>(weight_value(w, ws, bits, l, k));
    }
  });
  return out;
}

// enable: 1 / 0 switches the SIMD kernels on / off (off: the portable loops), -1 leaves it;
// gives whether they run.
bool linear_simd(int64_t enable) {
  if (enable >= 0) g_simd.store(enable != 0);
#if SWATTN_VNNI
  return g_simd.load();
#else
  return false;
#endif
}

}  // namespace
}  // namespace swattn

TORCH_LIBRARY_FRAGMENT(swattn, m) {
  m.def("linear_simd(int enable) -> bool", &swattn::linear_simd);
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, int bits, int N) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor panels, int N) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, int bits, int row0, int row1, Tensor like) -> Tensor");
  m.def("dequantize_rows(Tensor qweight, Tensor scales, int bits, Tensor ids, int N, Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(swattn, CPU, m) {
  m.impl("quant_linear", &swattn::quant_linear);
  m.impl("dense_linear", &swattn::dense_linear);
  m.impl("panel_linear", &swattn::panel_linear);
  m.impl("dequantize", &swattn::dequantize);
  m.impl("dequantize_rows", &swattn::dequantize_rows);
}
