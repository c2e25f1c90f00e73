// Four fp32 values as four bf16 in 8 bytes (rounded to nearest) and back (exact): the vectorised bf16 copies
// and the bf16-stored activations of the model's bf16 math.
#pragma once
#include <cuda_bf16.h>

namespace muse::cuda {

__device__ __forceinline__ uint2 narrow4(float4 v) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  return make_uint2(*reinterpret_cast<const unsigned*>(&lo), *reinterpret_cast<const unsigned*>(&hi));
}

// A bf16 is the high half of the fp32 with the same bits.
__device__ __forceinline__ float4 widen4(uint2 raw) {
  return make_float4(__uint_as_float(raw.x << 16), __uint_as_float(raw.x & 0xffff0000u), __uint_as_float(raw.y << 16),
                     __uint_as_float(raw.y & 0xffff0000u));
}

}  // namespace muse::cuda
