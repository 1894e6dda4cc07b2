// One decoder layer's decode step in one call: norms, projections, rotary, cache write and
// attention, gated MLP, residuals.
//
// A decode step of one layer is a dozen kernels (the products, attention, the row-wise layers)
// and as many views, splits and adds around them. From Python each costs an operator call and
// each module a __call__: about 0.2 ms per layer on a Zen 5 core, 4-5 ms per step of a 26-layer
// Gemma 2 2B, a fifth of a 2-layer q4 step's time. Here the same kernels run in the same order
// from C++ (each through the dispatcher, so this file needs none of their code), so the result
// is bit for bit the Python path's (swattn/models/transformer.py's Block.forward, which stays the
// definition; tests compare the two).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace swattn {
namespace {

// How a projection multiplies (see swattn/ops/linear.py, which picks it): our few-row dense
// kernel, oneDNN's product (a prepacked or plain weight), PyTorch's F.linear, or the quantized
// kernel with 8- or 4-bit weights, or the panel kernel on a prepacked bf16 weight's memory.
constexpr int64_t kDenseKernel = 0, kOneDNN = 1, kTorch = 2, kPanelKernel = 3, kQ4 = 4, kQ8 = 8;

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one) {
  static const auto op = typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, bool)>("swattn::rms_norm");
  return op.call(x.contiguous(), w, eps, plus_one);
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  static const auto op = typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("swattn::rotary");
  return op.call(x, cos, sin);
}

at::Tensor onednn(const at::Tensor& x, const at::Tensor& w) {
  // boxed: the op's C++ signature (string views, a list of optional scalars) varies between releases
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, w, c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<c10::optional<at::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

// x (rows..., K) times projection p's weight: (rows..., N).
at::Tensor project(const at::Tensor& x, int64_t kind, const c10::optional<at::Tensor>& a,
                   const c10::optional<at::Tensor>& b, int64_t n) {
  static const auto dense = typed<at::Tensor(const at::Tensor&, const at::Tensor&)>("swattn::dense_linear");
  static const auto quant = typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>(
      "swattn::quant_linear");
  static const auto panel = typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>("swattn::panel_linear");
  TORCH_CHECK(a.has_value(), "a projection without its weight");
  switch (kind) {
    case kDenseKernel: return dense.call(x.contiguous(), *a);
    case kPanelKernel: return panel.call(x.contiguous(), *a, n);
    case kQ8:
    case kQ4:
      TORCH_CHECK(b.has_value(), "a quantized projection without its scales");
      return quant.call(x.contiguous(), *a, *b, kind, n);
    case kOneDNN:
    case kTorch: {
      // as rows (F.linear on a 3-d input takes a batched path that copies the weight)
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = n;
      const at::Tensor rows = x.reshape({-1, x.size(-1)});
      return (kind == kOneDNN ? onednn(rows, *a) : at::linear(rows, *a)).view(shape);
    }
    default: TORCH_CHECK(false, "unknown projection kind ", kind);
  }
}

// x: (B, 1, hidden). norms: input, post-attention, then (gemma) pre- and post-feedforward, then
// (qk_norm) q and k norms. Projections in order q/k/v (one fused or three), o, gate/up (one fused
// or two), down: weights[2i], weights[2i+1] (scales or None), kinds[i], features[i]. cos, sin:
// (B, 1, 1, head_dim) fp32. The cache arguments are decode_attention's. Gives (B, 1, hidden).
at::Tensor decode_block(const at::Tensor& x, at::TensorList norms, const c10::List<c10::optional<at::Tensor>>& weights,
                        at::IntArrayRef kinds, at::IntArrayRef features, int64_t qkv_parts, int64_t gate_up_parts,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor cache_k, at::Tensor cache_v,
                        const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                        at::Tensor slot_pos, at::Tensor last_pos, const at::Tensor& pos, int64_t window, bool ring,
                        int64_t used, double softcap, double scale, int64_t heads, int64_t heads_kv, int64_t head_dim,
                        double eps, bool gemma, bool qk_norm, bool silu) {
  static const auto attend =
      typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor, at::Tensor,
                       const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, at::Tensor, at::Tensor,
                       const at::Tensor&, int64_t, bool, int64_t, double, double)>("swattn::decode_attention");
  static const auto gelu_mul = typed<at::Tensor(at::Tensor, const at::Tensor&)>("swattn::gelu_tanh_mul_");
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "x must be (batch, 1, hidden)");
  TORCH_CHECK(qkv_parts == 1 || qkv_parts == 3, "q/k/v come in 1 or 3 projections");
  TORCH_CHECK(gate_up_parts == 1 || gate_up_parts == 2, "gate/up come in 1 or 2 projections");
  const int64_t projections = qkv_parts + 1 + gate_up_parts + 1;
  TORCH_CHECK(static_cast<int64_t>(kinds.size()) == projections && static_cast<int64_t>(features.size()) == projections &&
                  static_cast<int64_t>(weights.size()) == 2 * projections,
              "kinds, features and weights must describe ", projections, " projections");
  const int64_t norm_count = (gemma ? 4 : 2) + (qk_norm ? 2 : 0);
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == norm_count, "expected ", norm_count, " norms");
  const int64_t B = x.size(0);
  int64_t next = 0;
  auto proj = [&](const at::Tensor& in) {
    const int64_t i = next++;
    return project(in, kinds[i], weights.get(2 * i), weights.get(2 * i + 1), features[i]);
  };

  // attention: the same steps as Attention.forward and _LayerCache._decode
  const at::Tensor h_in = rms_norm(x, norms[0], eps, gemma);
  at::Tensor q, k, v;
  if (qkv_parts == 1) {
    const auto parts = proj(h_in).split_with_sizes({heads * head_dim, heads_kv * head_dim, heads_kv * head_dim}, -1);
    q = parts[0], k = parts[1], v = parts[2];
  } else {
    q = proj(h_in), k = proj(h_in), v = proj(h_in);
  }
  q = q.reshape({B, 1, heads, head_dim}).transpose(1, 2);  // (B, heads, 1, head_dim)
  k = k.reshape({B, 1, heads_kv, head_dim}).transpose(1, 2);
  v = v.reshape({B, 1, heads_kv, head_dim}).transpose(1, 2);
  if (qk_norm) {
    const int64_t at = gemma ? 4 : 2;
    q = rms_norm(q, norms[at], eps, gemma), k = rms_norm(k, norms[at + 1], eps, gemma);
  }
  q = rotary(q, cos, sin), k = rotary(k, cos, sin);
  const at::Tensor out = attend.call(q.contiguous(), k.contiguous(), v.contiguous(), cache_k, cache_v, k_scale, v_scale,
                                     slot_pos, last_pos, pos, window, ring, used, softcap, scale);
  const at::Tensor attn = proj(out.transpose(1, 2).reshape({B, 1, -1}));

  // residual and MLP: Block.forward and MLP._forward
  at::Tensor h, mlp_in;
  if (gemma) {
    h = x + rms_norm(attn, norms[1], eps, gemma);
    mlp_in = rms_norm(h, norms[2], eps, gemma);
  } else {
    h = x + attn;
    mlp_in = rms_norm(h, norms[1], eps, gemma);
  }
  at::Tensor gate, up;
  if (gate_up_parts == 1) {
    const auto parts = proj(mlp_in).chunk(2, -1);
    gate = parts[0], up = parts[1];
  } else {
    gate = proj(mlp_in), up = proj(mlp_in);
  }
  at::Tensor act;
  if (silu) {
    act = at::silu_(gate).mul_(up);
  } else {
    act = gelu_mul.call(gate, up);
  }
  const at::Tensor down = proj(act);
  return gemma ? h + rms_norm(down, norms[3], eps, gemma) : h + down;
}

}  // namespace
}  // namespace swattn

TORCH_LIBRARY_FRAGMENT(swattn, m) {
  m.def("decode_block(Tensor x, Tensor[] norms, Tensor?[] weights, int[] kinds, int[] features, int qkv_parts, "
        "int gate_up_parts, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor(c!)? k_scale, "
        "Tensor(d!)? v_scale, Tensor(e!) slot_pos, Tensor(f!) last_pos, Tensor pos, int window, bool ring, int used, "
        "float softcap, float scale, int heads, int heads_kv, int head_dim, float eps, bool gemma, bool qk_norm, "
        "bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(swattn, CPU, m) { m.impl("decode_block", &swattn::decode_block); }
// prepacked weights are oneDNN tensors, which dispatch by their own key
TORCH_LIBRARY_IMPL(swattn, MkldnnCPU, m) { m.impl("decode_block", &swattn::decode_block); }
