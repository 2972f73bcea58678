// CPU decode kernels (fft/kernels/cpu.py builds and registers them; AVX2 + FMA, float32):
//   FftCpuSmallMatmul      y[M, O] = x[M, I] . W for decode batches, W packed [O/16][I][16]
//   FftCpuPack             W[I, O] -> [O/16][I][16]
//   FftCpuDecodeAttention  one query per row against the filled prefix of the KV cache
// Each weight and each cache slot is read once per step; the work is split between the
// calling thread and XLA's intra-op pool, which XLA:CPU's own small dots do at more cost than
// the work itself on 2-core machines.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Four rows of x (row stride I) against one packed 16-column strip; stores the first `rows`.
inline void Strip4(const float* x, int64_t I, const float* w, float* y, int64_t O, int64_t rows) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
  __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  for (int64_t i = 0; i < I; ++i) {
    const float* wi = w + i * 16;
    const __m256 w0 = _mm256_loadu_ps(wi), w1 = _mm256_loadu_ps(wi + 8);
    __m256 b = _mm256_broadcast_ss(x + i);
    a00 = _mm256_fmadd_ps(b, w0, a00);
    a01 = _mm256_fmadd_ps(b, w1, a01);
    b = _mm256_broadcast_ss(x + I + i);
    a10 = _mm256_fmadd_ps(b, w0, a10);
    a11 = _mm256_fmadd_ps(b, w1, a11);
    b = _mm256_broadcast_ss(x + 2 * I + i);
    a20 = _mm256_fmadd_ps(b, w0, a20);
    a21 = _mm256_fmadd_ps(b, w1, a21);
    b = _mm256_broadcast_ss(x + 3 * I + i);
    a30 = _mm256_fmadd_ps(b, w0, a30);
    a31 = _mm256_fmadd_ps(b, w1, a31);
  }
  _mm256_storeu_ps(y, a00);
  _mm256_storeu_ps(y + 8, a01);
  if (rows > 1) _mm256_storeu_ps(y + O, a10), _mm256_storeu_ps(y + O + 8, a11);
  if (rows > 2) _mm256_storeu_ps(y + 2 * O, a20), _mm256_storeu_ps(y + 2 * O + 8, a21);
  if (rows > 3) _mm256_storeu_ps(y + 3 * O, a30), _mm256_storeu_ps(y + 3 * O + 8, a31);
}

// Runs fn(begin, end) over [0, n) in chunks claimed by the calling thread and one helper per
// other thread of XLA's intra-op pool. A helper may start after the call has returned, find
// nothing left and exit, hence the shared state; the caller waits only for helpers that are
// mid-chunk (`busy`).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t chunk, Fn fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int> busy{0};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, n, chunk, &fn] {
    for (int64_t c; (c = shared->next.fetch_add(1)) * chunk < n;)
      fn(c * chunk, std::min(n, (c + 1) * chunk));
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(0, pool.num_threads() - 1),
                                            (n + chunk - 1) / chunk - 1);
  for (int64_t h = 0; h < helpers && h < 7; ++h) {
    pool.Schedule([shared, run] {
      shared->busy.fetch_add(1);
      run();
      shared->busy.fetch_sub(1);
    });
  }
  run();
  while (shared->busy.load() > 0) _mm_pause();
}

ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != 16 || wd[1] != xd[1])
    return ffi::Error::InvalidArgument("fft_cpu_small_matmul: want x[M,I] and w[O/16,I,16]");
  const int64_t m = xd[0], in = xd[1], strips = wd[0], out = strips * 16, full = m / 4 * 4;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // Rows past a multiple of four are read from a zero-padded copy, never past the end of x.
  std::unique_ptr<float[]> tail;
  if (full < m) {
    tail.reset(new float[4 * in]());
    std::memcpy(tail.get(), xp + full * in, sizeof(float) * (m - full) * in);
  }
  ParallelFor(pool, strips, 2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* wt = wp + t * in * 16;
      for (int64_t r = 0; r < full; r += 4) Strip4(xp + r * in, in, wt, yp + r * out + t * 16, out, 4);
      if (tail) Strip4(tail.get(), in, wt, yp + full * out + t * 16, out, m - full);
    }
  });
  return ffi::Error::Success();
}

// w[I, O] -> [O/16, I, 16]: the layout SmallMatmul streams. (XLA's transpose + copy of the
// same ran at ~2 GB/s, a noticeable share of a short generate call.)
ffi::Error Pack(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % 16) return ffi::Error::InvalidArgument("fft_cpu_pack: want w[I, 16k]");
  const int64_t in = wd[0], o = wd[1], strips = o / 16;
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, in, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t t = 0; t < strips; ++t)
      for (int64_t i = i0; i < i1; ++i)
        std::memcpy(op + (t * in + i) * 16, wp + i * o + t * 16, 16 * sizeof(float));
  });
  return ffi::Error::Success();
}

// Lane j of the result is the sum of the lanes of a[j].
inline __m256 Sum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// exp(x) for x <= 0 (Cephes' polynomial, ~1 ulp); exactly 0 below -87 like a masked score.
inline __m256 Exp(__m256 x) {
  const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(zero_below, y);
}

// Softmax attention of one query row q[d] over rows 0..len-1 of k, v [*, d] (row stride d),
// additive bias[len]; p is scratch of len rounded up to 8. Writes out[d].
void AttendOne(const float* q, const float* k, const float* v, const float* bias, int64_t len,
               int64_t d, float* p, float* out) {
  const int64_t padded = (len + 7) / 8 * 8;
  __m256 mx = _mm256_set1_ps(-3.0e38f);
  for (int64_t t0 = 0; t0 < padded; t0 += 8) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    const int64_t n = std::min<int64_t>(8, len - t0);
    for (int64_t e = 0; e < d; e += 8) {
      const __m256 qe = _mm256_loadu_ps(q + e);
      for (int64_t j = 0; j < n; ++j)
        a[j] = _mm256_fmadd_ps(qe, _mm256_loadu_ps(k + (t0 + j) * d + e), a[j]);
    }
    float sc[8];
    _mm256_storeu_ps(sc, Sum8x8(a));
    for (int64_t j = 0; j < 8; ++j) sc[j] = j < n ? sc[j] + bias[t0 + j] : -3.0e38f;
    const __m256 s = _mm256_loadu_ps(sc);
    _mm256_storeu_ps(p + t0, s);
    mx = _mm256_max_ps(mx, s);
  }
  float m8[8];
  _mm256_storeu_ps(m8, mx);
  const __m256 m = _mm256_set1_ps(*std::max_element(m8, m8 + 8));
  __m256 tot = _mm256_setzero_ps();
  for (int64_t t0 = 0; t0 < padded; t0 += 8) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(p + t0), m));
    _mm256_storeu_ps(p + t0, e);
    tot = _mm256_add_ps(tot, e);
  }
  float t8[8];
  _mm256_storeu_ps(t8, tot);
  float sum = 0.f;
  for (float t : t8) sum += t;
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int64_t e0 = 0; e0 < d; e0 += 64) {  // up to 8 output vectors held in registers
    const int64_t nv = std::min<int64_t>(8, (d - e0) / 8);
    __m256 o[8];
    for (int64_t i = 0; i < nv; ++i) o[i] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const __m256 pt = _mm256_broadcast_ss(p + t);
      const float* vt = v + t * d + e0;
      for (int64_t i = 0; i < nv; ++i) o[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vt + 8 * i), o[i]);
    }
    for (int64_t i = 0; i < nv; ++i) _mm256_storeu_ps(out + e0 + 8 * i, _mm256_mul_ps(o[i], inv));
  }
}

// One decode step of attention: q[B,K,G,D] (scaled) against cache slots [0, index] of
// k, v [B,K,S,D] with additive bias[B,S]; out[B,K,G,D]. Slots past `index` are not written
// yet (their bias is -inf), so reading only the filled prefix is exact. D % 8 == 0.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] ||
      qd[3] % 8)
    return ffi::Error::InvalidArgument("fft_cpu_decode_attention: bad shapes");
  const int64_t b = qd[0], nk = qd[1], g = qd[2], d = qd[3], s = kd[2];
  const int64_t len = std::min<int64_t>(s, std::max<int64_t>(0, *index.typed_data()) + 1);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float* bp = bias.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, b * nk, 1, [&](int64_t u0, int64_t u1) {
    std::unique_ptr<float[]> p(new float[(len + 7) / 8 * 8]);
    for (int64_t u = u0; u < u1; ++u)
      for (int64_t j = 0; j < g; ++j)
        AttendOne(qp + (u * g + j) * d, kp + u * s * d, vp + u * s * d, bp + (u / nk) * s, len, d,
                  p.get(), op + (u * g + j) * d);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FftCpuSmallMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FftCpuPack, Pack,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FftCpuDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
