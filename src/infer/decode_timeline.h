// The decode step's timeline (a build with -DMUSE_DECODE_TIMELINE=ON; `muse bench --mode decode --device
// cuda --profile`). A one-stream step is a chain of short kernels that overlap through programmatic
// dependent launch, so per-kernel profilers, which run each kernel alone, cannot say where the chain spends
// its time. Instead, each kernel stamps the GPU's global clock (%globaltimer, ns) at the phases below:
// thread 0 of the first row's block 0 (the SSM block for ssm_*), or, for *_done, the latest of every
// block's thread 0. Every layer overwrites the stamps, so they describe the last layer of the last step
// and its head.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace muse::cuda::decode {

enum class Mark : int {
  input_start, input_waited, input_staged, input_normalised, input_done,
  mixer_start, mixer_waited, mixer_token_issued, mixer_bk_step, mixer_staged, mixer_norms, mixer_scores,
  mixer_max, mixer_weights, mixer_weighted_sum, mixer_attention_done,
  ssm_start, ssm_waited, ssm_staged, ssm_gate, ssm_scan, ssm_done,
  mixer_done,
  wo_start, wo_waited, wo_done,
  mix_start, mix_waited, mix_staged, mix_prologue, mix_done,
  ffn_up_start, ffn_up_waited, ffn_up_staged, ffn_up_hidden, ffn_up_done,
  ffn_down_start, ffn_down_waited, ffn_down_summed, ffn_down_done,
  head_start, head_waited, head_z_done, head_logits_start, head_logits_staged,
  head_logits_staged_last, head_logits_summed, head_done,
  count
};

// Whether this build stamps the timeline.
bool timeline_enabled();

// The stamps of the last step run, (mark name, µs after the last layer's block_input started), in Mark
// order. Throws std::logic_error in a build without the timeline.
std::vector<std::pair<std::string, double>> read_timeline();

}  // namespace muse::cuda::decode
