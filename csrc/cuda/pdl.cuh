// Programmatic dependent launch, the device side (sm_90+; internal.h's launch_pdl sets the launch
// attribute): a kernel lets the next one in its stream start early (pdl_launch_dependents: the
// next launches once every CTA of this one has called it or exited), and waits for the previous
// one to finish and its writes to be visible (pdl_wait) before it reads what that kernel wrote or
// writes anything. Before sm_90 both are no-ops, as is pdl_wait in a kernel launched plainly.
#pragma once

namespace lowtune::cuda {

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace lowtune::cuda
