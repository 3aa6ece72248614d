// Causal/segment-masked attention (with rotate-half RoPE applied inside, optionally), forward and
// backward, as XLA FFI handlers for XLA:CPU. phijax/kernels/cpu_attention.py says why and how it is
// checked. Flash-attention style: per (batch, kv head) work item, query blocks of 64 rows see only
// the keys the causal mask lets them see; the forward keeps the log-sum-exp per row instead of the
// probabilities, and the backward recomputes them. Every block's scores live in a per-thread
// scratch of 64 x len floats, so they stay in L2.
//
// Layouts (row-major): q, o, dq [b, t, h, d]; k, v, dk, dv [b, t, kv, d]; lse [b, h, t]; segment
// ids [b, t] (int32); rotary tables [b, t, rd]. Queries of head i read kv head i / (h / kv)
// (grouped-query attention). The GEMMs are one 8x32 register-tile micro-kernel.

#include <vector>

#include "common.h"

namespace {

using namespace phijax_cpu;

constexpr int64_t kBlock = 64;  // query rows per block
constexpr float kNegInf = -INFINITY;

// C[i, j] (+)= sum_k A[i * ars + k * acs] * B[k * ldb + j], for i < m, j < n.
template <int R, int NV>
inline void tile(int64_t kd, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
                 int64_t ldc, bool acc) {
  v16 s[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) s[i][v] = acc ? load(c + i * ldc + 16 * v) : splat(0.0f);
  for (int64_t k = 0; k < kd; ++k) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + 16 * v);
    for (int i = 0; i < R; ++i) {
      const float av = a[i * ars + k * acs];
      for (int v = 0; v < NV; ++v) s[i][v] += av * bv[v];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) store(c + i * ldc + 16 * v, s[i][v]);
}

void gemm(int64_t m, int64_t n, int64_t kd, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool acc) {
  auto one = [&](int64_t r, int64_t j) {  // C[r, j] alone: the edges the tiles leave
    float s = acc ? c[r * ldc + j] : 0.0f;
    for (int64_t k = 0; k < kd; ++k) s += a[r * ars + k * acs] * b[k * ldb + j];
    c[r * ldc + j] = s;
  };
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) tile<8, 2>(kd, a + i * ars, ars, acs, b + j, ldb, c + i * ldc + j, ldc, acc);
    for (; j + 16 <= n; j += 16) tile<8, 1>(kd, a + i * ars, ars, acs, b + j, ldb, c + i * ldc + j, ldc, acc);
    for (; j < n; ++j)
      for (int64_t r = i; r < i + 8; ++r) one(r, j);
  }
  for (; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) one(i, j);
}

struct Dims {
  int64_t b, t, h, kv, d, ld_q, ld_kv, group;
  bool causal;
  float scale;
  int64_t rd;  // rotary dims (0: q and k come rotated)
  const float *cos, *sin;  // [b, t, rd]
};

// Rotate-half RoPE on the first rd features of rows [0, n) of x (stride ldx), positions [i0, i0 + n) of
// batch row bi, into y (stride ldy; may be x). sign -1 applies the transpose (the rotation by -angle):
// the gradient wrt the unrotated input.
void rotate_rows(const Dims& dm, int64_t bi, int64_t i0, const float* x, int64_t ldx, float* y, int64_t ldy,
                 int64_t n, float sign) {
  const int64_t half = dm.rd / 2;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = (bi * dm.t + i0 + i) * dm.rd;
    const float *xr = x + i * ldx, *c = dm.cos + at, *sn = dm.sin + at;
    float* yr = y + i * ldy;
    int64_t j = 0;  // feature j pairs with j + half; both are read before either is written
    for (; j + 16 <= half; j += 16) {
      const v16 a = load(xr + j), b = load(xr + j + half);
      store(yr + j, a * load(c + j) - sign * b * load(sn + j));
      store(yr + j + half, b * load(c + j + half) + sign * a * load(sn + j + half));
    }
    for (; j < half; ++j) {
      const float a = xr[j], b = xr[j + half];
      yr[j] = a * c[j] - sign * b * sn[j];
      yr[j + half] = b * c[j + half] + sign * a * sn[j + half];
    }
    if (y != x)
      for (j = dm.rd; j < dm.d; ++j) yr[j] = xr[j];
  }
}

// One head's rows as the GEMMs read them: x itself (stride ld), or its rotated copy in buf (stride d).
struct Rows {
  const float* p;
  int64_t ld;
};

Rows rotated(const Dims& dm, int64_t bi, const float* x, int64_t ld, std::vector<float>& buf) {
  if (dm.rd == 0) return {x, ld};
  rotate_rows(dm, bi, 0, x, ld, buf.data(), dm.d, dm.t, 1.0f);
  return {buf.data(), dm.d};
}

// The number of keys a query block ending at row r1 can see.
inline int64_t visible_keys(const Dims& dm, int64_t r1) { return dm.causal ? r1 : dm.t; }

// Masks the scores of block rows [r0, r0 + rows) x keys [0, len) in place (to -inf).
void mask_scores(const Dims& dm, float* s, int64_t ld, int64_t r0, int64_t rows, int64_t len, const int32_t* seg) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    const int64_t qi = r0 + i;
    if (dm.causal)
      for (int64_t j = qi + 1; j < len; ++j) row[j] = kNegInf;
    if (seg) {
      const int32_t sq = seg[qi];
      const int64_t end = dm.causal ? std::min(len, qi + 1) : len;
      for (int64_t j = 0; j < end; ++j)
        if (seg[j] != sq) row[j] = kNegInf;
    }
  }
}

// Unscaled scores of query rows [r0, r0 + rows) against keys [0, len) of one head: q k^T (kt: k^T
// with leading dim ldt). The softmax scale is applied in the exp pass.
void scores(const Dims& dm, Rows q, const float* kt, int64_t ldt, float* s, int64_t ld, int64_t r0, int64_t rows,
            int64_t len) {
  gemm(rows, len, dm.d, q.p + r0 * q.ld, q.ld, 1, kt, ldt, s, ld, false);
}

// The leading dim of [*, t] scratch rows: t rounded up to 16 plus 16, so that rows are not 4 KiB
// apart (rows a power of two apart share L1 sets, and the micro-kernel reads 8 rows at once).
inline int64_t padded(int64_t t) { return (t + 15) / 16 * 16 + 16; }

// x^T of one kv head: [d, ldt] from rows of stride ld, 16 x 16 tiles at a time.
void transpose_head(const float* x, int64_t t, int64_t d, int64_t ld, float* out, int64_t ldt) {
  for (int64_t i0 = 0; i0 < t; i0 += 16)
    for (int64_t j0 = 0; j0 < d; j0 += 16)
      for (int64_t j = j0; j < std::min(j0 + 16, d); ++j)
        for (int64_t i = i0; i < std::min(i0 + 16, t); ++i) out[j * ldt + i] = x[i * ld + j];
}

struct Scratch {
  std::vector<float> kt, vt, s, dp, qr, kr;
  void fit(const Dims& dm) {
    const size_t head = static_cast<size_t>(dm.d * padded(dm.t)), blk = static_cast<size_t>(kBlock * padded(dm.t));
    kt.resize(head), vt.resize(head), s.resize(blk), dp.resize(blk), qr.resize(head), kr.resize(head);
  }
};

Scratch& scratch(const Dims& dm) {
  thread_local Scratch sc;
  sc.fit(dm);
  return sc;
}

void forward_item(const Dims& dm, int64_t item, const float* q, const float* k, const float* v, const int32_t* seg,
                  float* o, float* lse) {
  const int64_t bi = item / dm.kv, g = item % dm.kv, ld = padded(dm.t);
  Scratch& sc = scratch(dm);
  const float* kh = k + bi * dm.t * dm.ld_kv + g * dm.d;
  const float* vh = v + bi * dm.t * dm.ld_kv + g * dm.d;
  const int32_t* sg = seg ? seg + bi * dm.t : nullptr;
  const Rows kr = rotated(dm, bi, kh, dm.ld_kv, sc.kr);
  transpose_head(kr.p, dm.t, dm.d, kr.ld, sc.kt.data(), ld);
  for (int64_t hh = g * dm.group; hh < (g + 1) * dm.group; ++hh) {
    const Rows qh = rotated(dm, bi, q + bi * dm.t * dm.ld_q + hh * dm.d, dm.ld_q, sc.qr);
    float* oh = o + bi * dm.t * dm.ld_q + hh * dm.d;
    float* lh = lse + (bi * dm.h + hh) * dm.t;
    for (int64_t r0 = 0; r0 < dm.t; r0 += kBlock) {
      const int64_t rows = std::min(kBlock, dm.t - r0), len = visible_keys(dm, r0 + rows);
      float* s = sc.s.data();
      scores(dm, qh, sc.kt.data(), ld, s, ld, r0, rows, len);
      mask_scores(dm, s, ld, r0, rows, len, sg);
      float inv[kBlock];
      for (int64_t i = 0; i < rows; ++i) {
        float* row = s + i * ld;
        const float m = row_max(row, len);
        if (m == kNegInf) {  // every key masked: no output, and no gradient either
          std::fill(row, row + len, 0.0f);
          inv[i] = 0.0f, lh[r0 + i] = kNegInf;
          continue;
        }
        const float l = exp_row(row, len, dm.scale, m * dm.scale);
        inv[i] = 1.0f / l, lh[r0 + i] = m * dm.scale + std::log(l);
      }
      float* ob = oh + r0 * dm.ld_q;
      gemm(rows, dm.d, len, s, ld, 1, vh, dm.ld_kv, ob, dm.ld_q, false);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < dm.d; ++j) ob[i * dm.ld_q + j] *= inv[i];
    }
  }
}

void backward_item(const Dims& dm, int64_t item, const float* q, const float* k, const float* v, const int32_t* seg,
                   const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv) {
  const int64_t bi = item / dm.kv, g = item % dm.kv, ld = padded(dm.t);
  Scratch& sc = scratch(dm);
  const int64_t kv_off = bi * dm.t * dm.ld_kv + g * dm.d;
  const float *kh = k + kv_off, *vh = v + kv_off;
  float *dkh = dk + kv_off, *dvh = dv + kv_off;  // this item's rows only: accumulated in place
  const int32_t* sg = seg ? seg + bi * dm.t : nullptr;
  const Rows kr = rotated(dm, bi, kh, dm.ld_kv, sc.kr);
  transpose_head(kr.p, dm.t, dm.d, kr.ld, sc.kt.data(), ld);
  transpose_head(vh, dm.t, dm.d, dm.ld_kv, sc.vt.data(), ld);
  for (int64_t i = 0; i < dm.t; ++i) {
    std::fill(dkh + i * dm.ld_kv, dkh + i * dm.ld_kv + dm.d, 0.0f);
    std::fill(dvh + i * dm.ld_kv, dvh + i * dm.ld_kv + dm.d, 0.0f);
  }
  float di[kBlock];
  for (int64_t hh = g * dm.group; hh < (g + 1) * dm.group; ++hh) {
    const int64_t off = bi * dm.t * dm.ld_q + hh * dm.d;
    const Rows qh = rotated(dm, bi, q + off, dm.ld_q, sc.qr);
    const float *oh = o + off, *doh = dout + off;
    float* dqh = dq + off;
    const float* lh = lse + (bi * dm.h + hh) * dm.t;
    for (int64_t r0 = 0; r0 < dm.t; r0 += kBlock) {
      const int64_t rows = std::min(kBlock, dm.t - r0), len = visible_keys(dm, r0 + rows);
      const float* dob = doh + r0 * dm.ld_q;
      float *p = sc.s.data(), *dp = sc.dp.data();
      scores(dm, qh, sc.kt.data(), ld, p, ld, r0, rows, len);
      mask_scores(dm, p, ld, r0, rows, len, sg);
      for (int64_t i = 0; i < rows; ++i) {
        float* row = p + i * ld;
        const float l = lh[r0 + i];
        if (l == kNegInf) std::fill(row, row + len, 0.0f);
        else exp_row(row, len, dm.scale, l);
        di[i] = dot(dob + i * dm.ld_q, oh + (r0 + i) * dm.ld_q, dm.d);  // rowsum(dout * o)
      }
      // dv[:len] += p^T dout_blk ; dp = dout_blk v^T
      gemm(len, dm.d, rows, p, 1, ld, dob, dm.ld_q, dvh, dm.ld_kv, true);
      gemm(rows, len, dm.d, dob, dm.ld_q, 1, sc.vt.data(), ld, dp, ld, false);
      // ds = p * (dp - di) * scale, in dp's place
      const v16 sc16 = splat(dm.scale);
      for (int64_t i = 0; i < rows; ++i) {
        float *pr = p + i * ld, *dr = dp + i * ld;
        const v16 dii = splat(di[i]);
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) store(dr + j, load(pr + j) * (load(dr + j) - dii) * sc16);
        for (; j < len; ++j) dr[j] = pr[j] * (dr[j] - di[i]) * dm.scale;
      }
      // dq_blk = ds k[:len] ; dk[:len] += ds^T q_blk (gradients wrt the rotated q, k)
      float* dqb = dqh + r0 * dm.ld_q;
      gemm(rows, dm.d, len, dp, ld, 1, kr.p, kr.ld, dqb, dm.ld_q, false);
      gemm(len, dm.d, rows, dp, 1, ld, qh.p + r0 * qh.ld, qh.ld, dkh, dm.ld_kv, true);
      if (dm.rd) rotate_rows(dm, bi, r0, dqb, dm.ld_q, dqb, dm.ld_q, rows, -1.0f);  // wrt q as it came in
    }
  }
  if (dm.rd) rotate_rows(dm, bi, 0, dkh, dm.ld_kv, dkh, dm.ld_kv, dm.t, -1.0f);
}

using F32Buf = ffi::Buffer<ffi::F32>;

// The problem's sizes from q [b, t, h, d], k [b, t, kv, d] and the rotary tables [b, t, rd] (any
// other shape: no rotary).
ffi::Error dims_of(F32Buf& q, F32Buf& k, F32Buf& cos, F32Buf& sin, bool causal, Dims* dm) {
  auto qd = q.dimensions(), kd = k.dimensions(), cd = cos.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] || qd[2] % kd[2])
    return ffi::Error::InvalidArgument("cpu attention: q [b, t, h, d] and k/v [b, t, kv, d] with h % kv == 0");
  const bool rotary = cd.size() == 3 && cd[0] == qd[0] && cd[1] == qd[1];
  const int64_t rd = rotary ? cd[2] : 0;
  if (rd % 2 || rd > qd[3] || cos.element_count() != sin.element_count())
    return ffi::Error::InvalidArgument("cpu attention: rotary tables [b, t, rd] with rd even and <= head_dim");
  *dm = Dims{qd[0], qd[1], qd[2], kd[2], qd[3], qd[2] * qd[3], kd[2] * kd[3], qd[2] / kd[2], causal,
             1.0f / std::sqrt(static_cast<float>(qd[3])), rd, cos.typed_data(), sin.typed_data()};
  return ffi::Error::Success();
}

const int32_t* segments(ffi::Buffer<ffi::S32>& seg, const Dims& dm) {
  return seg.element_count() == static_cast<size_t>(dm.b * dm.t) ? seg.typed_data() : nullptr;
}

ffi::Error Forward(ffi::ThreadPool pool, F32Buf q, F32Buf k, F32Buf v, ffi::Buffer<ffi::S32> seg, F32Buf cos,
                   F32Buf sin, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, bool causal) {
  Dims dm;
  if (auto err = dims_of(q, k, cos, sin, causal, &dm); err.failure()) return err;
  const int32_t* sg = segments(seg, dm);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, dm.b * dm.kv, [=](int64_t item) { forward_item(dm, item, qp, kp, vp, sg, op, lp); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32Buf q, F32Buf k, F32Buf v, ffi::Buffer<ffi::S32> seg, F32Buf cos,
                    F32Buf sin, F32Buf o, F32Buf lse, F32Buf dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, bool causal) {
  Dims dm;
  if (auto err = dims_of(q, k, cos, sin, causal, &dm); err.failure()) return err;
  const int32_t* sg = segments(seg, dm);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = o.typed_data(),
              *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, dm.b * dm.kv,
               [=](int64_t item) { backward_item(dm, item, qp, kp, vp, sg, op, lp, dop, dqp, dkp, dvp); });
  return ffi::Error::Success();
}

// Both handlers' leading operands: q, k, v, segment ids, cos, sin.
auto bind_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<F32Buf>()
      .Arg<F32Buf>()
      .Arg<F32Buf>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<F32Buf>()
      .Arg<F32Buf>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhijaxAttentionForward, Forward,
                              bind_inputs().Ret<F32Buf>().Ret<F32Buf>().Attr<bool>("causal"));

// o, lse, dout -> dq, dk, dv
XLA_FFI_DEFINE_HANDLER_SYMBOL(PhijaxAttentionBackward, Backward,
                              bind_inputs()
                                  .Arg<F32Buf>()
                                  .Arg<F32Buf>()
                                  .Arg<F32Buf>()
                                  .Ret<F32Buf>()
                                  .Ret<F32Buf>()
                                  .Ret<F32Buf>()
                                  .Attr<bool>("causal"));
