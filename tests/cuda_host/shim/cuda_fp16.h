// See cuda_bf16.h: one set of stand-ins for both CUDA headers.
#pragma once
#include "cuda_bf16.h"
