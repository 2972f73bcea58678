// Small-batch matmul for CPU decoding: y[M, O] = x[M, I] . W, M <= 8, W packed [O/16][I][16].
//
// At decode batch sizes every weight is read once per step for ~16 flops per float. XLA:CPU's
// dots run these shapes at ~7 GB/s on a 2-core Zen3 (Eigen spreads each one over the pool with
// more overhead than work); this loop streams the packed weight once, keeps 4 rows x 16
// columns of accumulators in registers, and splits the 16-column strips between the calling
// thread and XLA's intra-op pool (fft/kernels/cpu.py builds it; AVX2 + FMA, float32).
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

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One decode step of attention: q[B,K,G,D] (scaled) against cache slots [0, index] of
// k, v [B,K,S,D] with additive bias[B,S]; out[B,K,G,D]. Slots past `index` are never written
// yet (their bias is -inf), so reading only the filled prefix is exact. D % 8 == 0, G <= 16.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] ||
      qd[3] % 8 || qd[2] > 16)
    return ffi::Error::InvalidArgument("fft_cpu_decode_attention: bad shapes");
  const int64_t b = qd[0], nk = qd[1], g = qd[2], d = qd[3], s = kd[2];
  const int64_t len = std::min<int64_t>(s, std::max<int64_t>(0, *index.typed_data()) + 1);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float* bp = bias.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, b * nk, 1, [&](int64_t u0, int64_t u1) {
    std::unique_ptr<float[]> p(new float[16 * len]);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t row = u / nk;
      const float* qu = qp + u * g * d;
      const float* ku = kp + u * s * d;
      const float* vu = vp + u * s * d;
      const float* bu = bp + row * s;
      float mx[16], sum[16];
      for (int64_t j = 0; j < g; ++j) mx[j] = -3.0e38f;
      for (int64_t t = 0; t < len; ++t) {
        const float* kt = ku + t * d;
        for (int64_t j = 0; j < g; ++j) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t e = 0; e < d; e += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qu + j * d + e), _mm256_loadu_ps(kt + e), acc);
          const float sc = HorizontalSum(acc) + bu[t];
          p[j * len + t] = sc;
          mx[j] = std::max(mx[j], sc);
        }
      }
      for (int64_t j = 0; j < g; ++j) {
        float tot = 0.f;
        for (int64_t t = 0; t < len; ++t) tot += (p[j * len + t] = std::exp(p[j * len + t] - mx[j]));
        sum[j] = tot;
      }
      for (int64_t j = 0; j < g; ++j) {
        float* oj = op + (u * g + j) * d;
        for (int64_t e = 0; e < d; e += 8) _mm256_storeu_ps(oj + e, _mm256_setzero_ps());
      }
      for (int64_t t = 0; t < len; ++t) {
        const float* vt = vu + t * d;
        for (int64_t j = 0; j < g; ++j) {
          const __m256 pj = _mm256_set1_ps(p[j * len + t] / sum[j]);
          float* oj = op + (u * g + j) * d;
          for (int64_t e = 0; e < d; e += 8)
            _mm256_storeu_ps(oj + e, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vt + e), _mm256_loadu_ps(oj + e)));
        }
      }
    }
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
