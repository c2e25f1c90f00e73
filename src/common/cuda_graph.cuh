// Capturing a sequence of launches as a CUDA graph (the model's passes, the decoder's steps).
#pragma once
#include <cuda_runtime.h>

#include "common/cuda_check.cuh"

namespace muse::cuda {

// What enqueue() puts on `stream`, captured and instantiated. If enqueue throws, the capture is ended and
// dropped (with the sticky capture error cleared) and the exception goes on, so the stream stays usable.
template <class Enqueue>
cudaGraphExec_t capture_graph(cudaStream_t stream, Enqueue&& enqueue) {
  cudaGraph_t graph = nullptr;
  MUSE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    enqueue();
  } catch (...) {
    cudaStreamEndCapture(stream, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  MUSE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  MUSE_CUDA_CHECK(status);
  return exec;
}

}  // namespace muse::cuda
