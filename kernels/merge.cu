// Size-weighted merge of tokens into their destinations: out[m] = sum_s w[s] x[s] / sum_s w[s]
// over the sources s of output token m. One block per output token (gridDim.x allows 2^31 - 1 of
// them), its threads striding over the channels; each thread walks the token's sources in a fixed
// order (sorted by destination, stable), so the result is deterministic and needs no atomics. x is
// read once and out written once, in x's own dtype; sums are float32.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__global__ void merge_tokens(const T* __restrict__ x,            // [T_in, C] sources, contiguous
                             const float* __restrict__ weight,   // [T_in] merge weight of each source
                             const long long* __restrict__ order,    // sources sorted by destination
                             const long long* __restrict__ offsets,  // [M + 1] start of each output's sources
                             T* __restrict__ out,                // [M, C]
                             float* __restrict__ total_weight,   // [M] sum of the weights merged
                             const long long num_out, const long long channels) {
    const long long m = blockIdx.x;
    if (m >= num_out) return;
    const long long begin = offsets[m], end = offsets[m + 1];
    for (long long c = threadIdx.x; c < channels; c += blockDim.x) {
        float acc = 0.0f, wsum = 0.0f;
        for (long long s = begin; s < end; ++s) {
            const long long source = order[s];
            const float w = weight[source];
            acc += w * to_float(x[source * channels + c]);
            wsum += w;
        }
        store(out + m * channels + c, acc / fmaxf(wsum, 1.17549435e-38f));
        if (c == 0) total_weight[m] = wsum;
    }
}

// Instantiations CuPy looks up by name (RawModule name_expressions) and nvcc compiles in the test.
template __global__ void merge_tokens<float>(const float*, const float*, const long long*, const long long*,
                                             float*, float*, const long long, const long long);
template __global__ void merge_tokens<__half>(const __half*, const float*, const long long*, const long long*,
                                              __half*, float*, const long long, const long long);
template __global__ void merge_tokens<__nv_bfloat16>(const __nv_bfloat16*, const float*, const long long*,
                                                     const long long*, __nv_bfloat16*, float*, const long long,
                                                     const long long);
