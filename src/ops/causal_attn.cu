// Causal softmax attention = the windowed-attention engine (ops/local_attn.cu) with a sliding window of
// the whole sequence and the scaled dot-product score.
#include "ops/causal_attn.cuh"
#include "ops/local_attn.cuh"

namespace muse::cuda {

namespace {

detail::WindowedAttnArgs causal_args(int B, int N, int H, int D, bool alibi) {
  detail::WindowedAttnArgs a;
  a.score = detail::AttnScore::dot;
  a.B = B;
  a.N = N;
  a.H = H;
  a.D = D;
  a.window = N > 0 ? N : 1;  // window(i) = {0 … i}
  a.sliding = true;
  a.alibi = alibi;
  a.lse_bnh = false;  // lse [B, H, N]
  return a;
}

}  // namespace

void causal_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v, int B, int N, int H,
                         int D, bool alibi, cudaStream_t stream) {
  detail::windowed_attn_forward(o, lse, q, k, v, causal_args(B, N, H, D, alibi), stream);
}

void causal_attn_backward(float* dq, float* dk, float* dv, const float* do_, const float* q, const float* k,
                          const float* v, const float* o, const float* lse, int B, int N, int H, int D, bool alibi,
                          cudaStream_t stream) {
  detail::windowed_attn_backward(dq, dk, dv, nullptr, nullptr, nullptr, do_, o, lse, q, k, v,
                                 causal_args(B, N, H, D, alibi), nullptr, stream);
}

}  // namespace muse::cuda
