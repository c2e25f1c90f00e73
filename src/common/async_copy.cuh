// Asynchronous copies from global to shared memory (cp.async, sm_80+): a thread issues them without waiting,
// so a block can have a whole tile (or row) in flight at once, or start copies before it waits for the
// previous kernel, and completes them with wait_async_copies() (then a barrier, for the other threads' copies).
#pragma once

namespace muse::cuda {

// 4 bytes, through L1.
__device__ __forceinline__ void copy_async_4(float* shared, const float* global) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(unsigned(__cvta_generic_to_shared(shared))),
               "l"(__cvta_generic_to_global(global)));
}

// 16 bytes (both addresses 16-byte aligned), through L2 only.
__device__ __forceinline__ void copy_async_16(void* shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(unsigned(__cvta_generic_to_shared(shared))),
               "l"(__cvta_generic_to_global(global)));
}

// Waits for every copy this thread issued.
__device__ __forceinline__ void wait_async_copies() { asm volatile("cp.async.wait_all;" ::: "memory"); }

}  // namespace muse::cuda
