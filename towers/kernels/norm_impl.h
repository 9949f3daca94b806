/* ReLU -> LRN across channels -> max-pool, fused, on channels-last (NHWC) tensors.
 *
 * Included twice by norm.c, with REAL = float and REAL = double, NAME adding the suffix.
 * Work goes one sample at a time so that its intermediates stay in cache: forward reads x and
 * writes the pooled output; backward recomputes the normalisation instead of saving it.
 * Semantics are PyTorch's: LocalResponseNorm's window [c - size/2, c + (size-1)/2] with zero
 * padding and d = k + alpha * (window sum / size); max_pool2d's first maximum in row-major
 * window order receives the gradient, and NaN counts as a maximum.
 */

/* One pixel's channel vector: y = a * d^-beta, where a = relu(x) if relu else x. Fills a, d, s. */
static inline void NAME(normalise_pixel)(const REAL *x, REAL *a, REAL *d, REAL *s, REAL *padded,
                                         long C, int size, REAL alpha, REAL beta, REAL k, int relu) {
    const int lo = size / 2;
    for (long c = 0; c < C; c++) {
        REAL v = x[c];
        a[c] = (relu && !(v > 0)) ? (v != v ? v : 0) : v;
        padded[lo + c] = a[c] * a[c];
    }
    const REAL scale_sum = alpha / (REAL)size;
    for (long c = 0; c < C; c++) d[c] = padded[c];
    for (int m = 1; m < size; m++) /* window offset outermost, so the channel loop vectorises */
        for (long c = 0; c < C; c++) d[c] += padded[c + m];
    for (long c = 0; c < C; c++) d[c] = d[c] * scale_sum + k;
    if (beta == (REAL)0.75) {
        for (long c = 0; c < C; c++) {
            REAL r = (REAL)1 / SQRT(d[c]);
            s[c] = r * SQRT(r); /* d^-0.75 without pow */
        }
    } else {
        for (long c = 0; c < C; c++) s[c] = POW(d[c], -beta);
    }
}

/* y = the normalised ReLU of every pixel of one sample. */
static void NAME(normalise_sample)(const REAL *x, REAL *y, REAL *scratch, long HW, long C, int size, REAL alpha,
                                   REAL beta, REAL k, int relu) {
    REAL *a = scratch, *d = a + C, *s = d + C, *padded = s + C;
    for (long p = 0; p < HW; p++) {
        NAME(normalise_pixel)(x + p * C, a, d, s, padded, C, size, alpha, beta, k, relu);
        REAL *yp = y + p * C;
        for (long c = 0; c < C; c++) yp[c] = a[c] * s[c];
    }
}

/* best = the maximum over pooling window (ph, pw) of y, channel by channel, NaN winning. */
static inline void NAME(window_max)(const REAL *y, REAL *best, long W, long C, long ph, long pw, int pool_k,
                                    int pool_s) {
    for (long c = 0; c < C; c++) best[c] = -INFINITY;
    for (int i = 0; i < pool_k; i++)
        for (int j = 0; j < pool_k; j++) {
            const REAL *yp = y + ((ph * pool_s + i) * W + (pw * pool_s + j)) * C;
            for (long c = 0; c < C; c++) {
                REAL v = yp[c];
                best[c] = (v > best[c] || v != v) ? v : best[c];
            }
        }
}

static void NAME(forward_sample)(const REAL *x, REAL *out, REAL *y, REAL *scratch, long H, long W, long C,
                                 int size, REAL alpha, REAL beta, REAL k, int relu, int pool_k, int pool_s) {
    NAME(normalise_sample)(x, pool_k ? y : out, scratch, H * W, C, size, alpha, beta, k, relu);
    if (!pool_k) return;
    const long PH = (H - pool_k) / pool_s + 1, PW = (W - pool_k) / pool_s + 1;
    for (long ph = 0; ph < PH; ph++)
        for (long pw = 0; pw < PW; pw++) NAME(window_max)(y, out + (ph * PW + pw) * C, W, C, ph, pw, pool_k, pool_s);
}

static void NAME(backward_sample)(const REAL *x, const REAL *gout, REAL *gx, REAL *y, REAL *gy, REAL *scratch,
                                  long H, long W, long C, int size, REAL alpha, REAL beta, REAL k, int relu,
                                  int pool_k, int pool_s) {
    REAL *a = scratch, *d = a + C, *s = d + C, *padded = s + C, *best = padded + C + size, *taken = best + C,
         *sum = taken + C, *t = sum + C;
    const long HW = H * W;
    const REAL *g = gout;
    if (pool_k) {
        /* Route each pooled gradient to its window's maximum, exactly as max_pool2d's backward. */
        NAME(normalise_sample)(x, y, scratch, HW, C, size, alpha, beta, k, relu);
        for (long i = 0; i < HW * C; i++) gy[i] = 0;
        const long PH = (H - pool_k) / pool_s + 1, PW = (W - pool_k) / pool_s + 1;
        for (long ph = 0; ph < PH; ph++)
            for (long pw = 0; pw < PW; pw++) {
                NAME(window_max)(y, best, W, C, ph, pw, pool_k, pool_s);
                for (long c = 0; c < C; c++) taken[c] = 0;
                /* The first position in row-major order holding the maximum takes the gradient. */
                const REAL *go = gout + (ph * PW + pw) * C;
                for (int i = 0; i < pool_k; i++)
                    for (int j = 0; j < pool_k; j++) {
                        const long p = (ph * pool_s + i) * W + (pw * pool_s + j);
                        const REAL *yp = y + p * C;
                        REAL *gyp = gy + p * C;
                        for (long c = 0; c < C; c++) {
                            REAL v = yp[c], m = best[c];
                            int hit = (taken[c] == 0) & ((v == m) | ((v != v) & (m != m)));
                            gyp[c] += hit ? go[c] : 0;
                            taken[c] = hit ? 1 : taken[c];
                        }
                    }
            }
        g = gy;
    }
    /* grad_a[j] = g[j] s[j] - (2 alpha beta / size) a[j] * sum over i with j in window(i) of g[i] a[i] s[i] / d[i] */
    const int hi = (size - 1) / 2;
    const REAL coef = (REAL)2 * alpha * beta / (REAL)size;
    for (long p = 0; p < HW; p++) {
        NAME(normalise_pixel)(x + p * C, a, d, s, padded, C, size, alpha, beta, k, relu);
        const REAL *gp = g + p * C;
        for (int m = 0; m < size - 1; m++) t[m] = 0, t[C + m] = 0;
        for (long c = 0; c < C; c++) t[hi + c] = gp[c] * a[c] * s[c] / d[c];
        for (long c = 0; c < C; c++) sum[c] = t[c];
        for (int m = 1; m < size; m++)
            for (long c = 0; c < C; c++) sum[c] += t[c + m];
        const REAL *xp = x + p * C;
        REAL *gxp = gx + p * C;
        for (long c = 0; c < C; c++) {
            REAL grad = gp[c] * s[c] - coef * a[c] * sum[c];
            gxp[c] = (relu && xp[c] <= 0) ? 0 : grad;
        }
    }
}

/* Samples [first, last) of a batch; the caller runs chunks on its own threads. */
void NAME(norm_forward)(const REAL *x, REAL *out, long first, long last, long H, long W, long C, int size,
                        double alpha, double beta, double k, int relu, int pool_k, int pool_s) {
    const long PH = pool_k ? (H - pool_k) / pool_s + 1 : H, PW = pool_k ? (W - pool_k) / pool_s + 1 : W;
    REAL *y = pool_k ? (REAL *)malloc(sizeof(REAL) * H * W * C) : NULL;
    REAL *scratch = (REAL *)calloc(5 * C + 2 * size, sizeof(REAL));
    for (long n = first; n < last; n++)
        NAME(forward_sample)(x + n * H * W * C, out + n * PH * PW * C, y, scratch, H, W, C, size, (REAL)alpha,
                             (REAL)beta, (REAL)k, relu, pool_k, pool_s);
    free(y);
    free(scratch);
}

void NAME(norm_backward)(const REAL *x, const REAL *gout, REAL *gx, long first, long last, long H, long W, long C,
                         int size, double alpha, double beta, double k, int relu, int pool_k, int pool_s) {
    const long PH = pool_k ? (H - pool_k) / pool_s + 1 : H, PW = pool_k ? (W - pool_k) / pool_s + 1 : W;
    REAL *y = pool_k ? (REAL *)malloc(sizeof(REAL) * H * W * C * 2) : NULL;
    REAL *scratch = (REAL *)calloc(8 * C + 2 * size, sizeof(REAL));
    for (long n = first; n < last; n++)
        NAME(backward_sample)(x + n * H * W * C, gout + n * PH * PW * C, gx + n * H * W * C, y,
                              y ? y + H * W * C : NULL, scratch, H, W, C, size, (REAL)alpha, (REAL)beta,
                              (REAL)k, relu, pool_k, pool_s);
    free(y);
    free(scratch);
}
