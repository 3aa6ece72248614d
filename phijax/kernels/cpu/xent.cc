// The softmax cross-entropy of one chunk of LM-head logits and its gradient, in one pass per row,
// as an XLA FFI handler for XLA:CPU; phijax/loss.py calls it between the chunk's GEMMs (with
// loss_kernel='cpu'). A row of the vocabulary stays in L1 across its passes (max, sum of exp,
// scale), where XLA's fusions stream the chunk through memory several times.
//
// logits [r, v] (the GEMM's output, without the bias), bias [v], targets [r] (int32; outside
// [0, v): no target), weights [r] ->
//   d [r, v] = (softmax(logits + bias) - onehot(target)) * weight: the gradient of the weighted NLL
//   nll [r] = logsumexp(logits + bias) - (logits + bias)[target], unweighted
//   db [v] = sum of d over the rows (the bias gradient), added up while each row is in L1.

#include <vector>

#include "common.h"

namespace {

using namespace phijax_cpu;

constexpr int64_t kRowsPerItem = 32;

void xent_row(const float* x, const float* bias, int64_t v, int32_t target, float weight, float* d, float* nll) {
  int64_t j = 0;
  for (; j + 16 <= v; j += 16) store(d + j, load(x + j) + load(bias + j));
  for (; j < v; ++j) d[j] = x[j] + bias[j];
  const float mx = row_max(d, v), s = exp_row(d, v, 1.0f, mx);
  const bool has_target = target >= 0 && target < v;
  *nll = mx + std::log(s) - (has_target ? x[target] + bias[target] : 0.0f);
  const float scale = weight / s;
  const v16 sc = splat(scale);
  for (j = 0; j + 16 <= v; j += 16) store(d + j, load(d + j) * sc);
  for (; j < v; ++j) d[j] *= scale;
  if (has_target) d[target] -= weight;
}

// sum[j] += x[j] for j < v
void add_row(const float* x, int64_t v, float* sum) {
  int64_t j = 0;
  for (; j + 16 <= v; j += 16) store(sum + j, load(sum + j) + load(x + j));
  for (; j < v; ++j) sum[j] += x[j];
}

ffi::Error Xent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> bias,
                ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> d,
                ffi::ResultBuffer<ffi::F32> nll, ffi::ResultBuffer<ffi::F32> db) {
  const int64_t v = bias.element_count(), rows = targets.element_count();
  if (logits.element_count() != static_cast<size_t>(rows * v) || weights.element_count() != static_cast<size_t>(rows))
    return ffi::Error::InvalidArgument("cpu xent: logits [r, v], bias [v], targets [r], weights [r]");
  const float *lp = logits.typed_data(), *bp = bias.typed_data(), *wp = weights.typed_data();
  const int32_t* tp = targets.typed_data();
  float *dp = d->typed_data(), *np = nll->typed_data(), *dbp = db->typed_data();
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  std::vector<float> partial(items * v, 0.0f);  // each item's share of db, summed in item order below
  float* pp = partial.data();
  parallel_for(pool, items, [=](int64_t item) {
    for (int64_t r = item * kRowsPerItem; r < std::min(rows, (item + 1) * kRowsPerItem); ++r) {
      xent_row(lp + r * v, bp, v, tp[r], wp[r], dp + r * v, np + r);
      add_row(dp + r * v, v, pp + item * v);
    }
  });
  std::fill(dbp, dbp + v, 0.0f);
  for (int64_t item = 0; item < items; ++item) add_row(pp + item * v, v, dbp);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PhijaxXent, Xent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
