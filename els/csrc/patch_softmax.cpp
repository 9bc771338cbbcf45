// Python binding of the kernel in patch_softmax.h (see there).
#include <torch/extension.h>

#include "patch_softmax.h"

using namespace els_kernel;

// xq [B, C, H + 2h, W + 2h] padded queries; y [N, C, Hy, Wy] training images zero-padded, pixel
// (r, c) at (r + yo, c + xo); cn [N, H, Wn] squared norms of the k x k candidate patches at every
// centre (Wn >= W + 16); blocks [nb, 12] int64 (Q, R, D rectangles as r0 r1 c0 c1, inclusive);
// stats: 0 the mean only, 1 and n_eff, 2 and the dominant candidate (Stats in patch_softmax.h).
std::vector<torch::Tensor> patch_softmax(torch::Tensor xq, torch::Tensor y, torch::Tensor cn,
                                         torch::Tensor blocks, int64_t k, int64_t yo, int64_t xo,
                                         double alpha, double beta, int64_t stats,
                                         int64_t threads) {
  TORCH_CHECK(xq.device().is_cpu() && y.device().is_cpu() && cn.device().is_cpu(), "CPU tensors");
  TORCH_CHECK(xq.scalar_type() == y.scalar_type() && y.scalar_type() == cn.scalar_type(),
              "one dtype");
  TORCH_CHECK(stats >= kNoStats && stats <= kSources, "stats is 0, 1 or 2");
  TORCH_CHECK(xq.is_contiguous() && y.is_contiguous() && cn.is_contiguous(), "contiguous");
  const int64_t B = xq.size(0), C = xq.size(1), H = cn.size(1), W = xq.size(3) - 2 * (k / 2);
  TORCH_CHECK(y.size(1) == C && y.size(2) >= H + yo + k / 2 && yo >= k / 2 && cn.size(2) >= W + 16,
              "padding of y / cn");
  auto bl = blocks.to(torch::kLong).contiguous();
  std::vector<Block> bs(bl.size(0));
  const int64_t* bp = bl.data_ptr<int64_t>();
  for (int64_t i = 0; i < bl.size(0); ++i) {
    const int64_t* v = bp + 12 * i;
    bs[i] = {{v[0], v[1], v[2], v[3]}, {v[4], v[5], v[6], v[7]}, {v[8], v[9], v[10], v[11]}};
    const auto reach = xq.scalar_type() == torch::kFloat ? column_reach<float>(bs[i], k)
                                                         : column_reach<double>(bs[i], k);
    TORCH_CHECK(reach.first + xo >= 0 && reach.second + xo < y.size(3),
                "y's column padding does not cover columns ", reach.first, "..", reach.second);
  }
  auto opts = xq.options();
  auto mean = torch::zeros({B, C, H, W}, opts);
  auto best_w = torch::zeros({B, H, W}, opts), n_eff = torch::zeros({B, H, W}, opts);
  auto lopts = opts.dtype(torch::kLong);
  auto bj = torch::zeros({B, H, W}, lopts), br = torch::zeros({B, H, W}, lopts),
       bc = torch::zeros({B, H, W}, lopts);
  Outputs out{mean.data_ptr(), best_w.data_ptr(), n_eff.data_ptr(), bj.data_ptr<int64_t>(),
              br.data_ptr<int64_t>(), bc.data_ptr<int64_t>()};
  AT_DISPATCH_FLOATING_TYPES(xq.scalar_type(), "patch_softmax", [&] {
    Inputs<scalar_t> in{xq.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), cn.data_ptr<scalar_t>(),
                        y.size(0), C, H, W, xq.size(2), xq.size(3), y.size(2), y.size(3),
                        cn.size(2), k, yo, xo, scalar_t(alpha), scalar_t(beta)};
    run<scalar_t>(in, out, B, bs, Stats(stats), int(threads));
  });
  return {mean, best_w, n_eff, bj, br, bc};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("patch_softmax", &patch_softmax, "streaming softmax over displaced training patches");
}
