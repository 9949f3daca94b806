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
