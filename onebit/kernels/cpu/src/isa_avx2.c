/* AVX2 + FMA + F16C kernels (Haswell / Zen and later).
 * Ternary int8 dot: codes q = t + 1 (0..2) come out of one 32-byte load as four planes of 32 consecutive
 * elements with a shift and a mask; maddubs(q u8, x s8) gives exact int16 pair sums (|.| <= 512), summed
 * in int16 for up to 1024 elements, then widened; sum(x) is subtracted once per group by the driver. */
#define OB_ISA avx2
#define OB_ISA_NAME "avx2"
#define OB_TB 3
#include "prims_avx2.h"
#include "kernels_impl.h"
