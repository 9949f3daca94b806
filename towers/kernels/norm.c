/* CPU kernels for the towers: fused ReLU -> LRN -> max-pool (see norm_impl.h). */
#include <math.h>
#include <stdlib.h>

#define REAL float
#define NAME(x) x##_f32
#define SQRT sqrtf
#define POW powf
#include "norm_impl.h"
#undef REAL
#undef NAME
#undef SQRT
#undef POW

#define REAL double
#define NAME(x) x##_f64
#define SQRT sqrt
#define POW pow
#include "norm_impl.h"

/* uint8 crops -> float pixels: out = (pixel + offset) / divisor, channel by channel, as PyTorch's
   float add and divide round them (no reciprocals: the same bits). pixels is `images` x `values`
   (height x width x 3, channels interleaved); offsets is 3 per image; divisors 3, or NULL for none.
   The channels repeat every 3 values, so a block of 48 values holds 16 whole pixels: the inner
   loop then runs on constant patterns, which the compiler vectorises. */
void crops_to_float(const unsigned char *pixels, const float *offsets, const float *divisors, float *out,
                    long images, long values)
{
    for (long i = 0; i < images; i++) {
        float off[48], div[48];
        for (int k = 0; k < 48; k++) {
            off[k] = offsets[i * 3 + k % 3];
            div[k] = divisors ? divisors[k % 3] : 1.0f;
        }
        const unsigned char *src = pixels + i * values;
        float *dst = out + i * values;
        long j = 0;
        for (; j + 48 <= values; j += 48)
            for (int k = 0; k < 48; k++)
                dst[j + k] = ((float)src[j + k] + off[k]) / div[k];
        for (; j < values; j++)
            dst[j] = ((float)src[j] + off[j % 48]) / div[j % 48];
    }
}
