/* ReLU -> LRN across channels -> max-pool, fused, on channels-last (NHWC) tensors.
 *
 * Included twice by norm.c, with REAL = float and REAL = double, NAME adding the suffix.
 * Work goes one sample at a time so that its intermediates stay in cache: forward reads x and
 * writes the pooled output and, per output, which element of its window was the maximum (a byte);
 * backward routes the gradient by those bytes and recomputes the normalisation instead of saving it.
 * Semantics are PyTorch's: LocalResponseNorm's window [c - size/2, c + (size-1)/2] with zero
 * padding and d = k + alpha * (window sum / size); max_pool2d's first maximum in row-major
 * window order receives the gradient, and NaN counts as a maximum (the last NaN, as max_pool2d).
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

/* out = the maximum over pooling window (ph, pw) of y, channel by channel, and arg its position in the
 * window (row-major): the first maximum, or the last NaN, exactly the element max_pool2d picks.
 * `where` is REAL scratch so that the selection loop vectorises; arg gets it as bytes at the end. */
static inline void NAME(window_max)(const REAL *y, REAL *out, unsigned char *arg, REAL *where, long W, long C,
                                    long ph, long pw, int pool_k, int pool_s) {
    for (long c = 0; c < C; c++) out[c] = -INFINITY, where[c] = 0;
    for (int i = 0; i < pool_k; i++)
        for (int j = 0; j < pool_k; j++) {
            const REAL *yp = y + ((ph * pool_s + i) * W + (pw * pool_s + j)) * C;
            const REAL here = (REAL)(i * pool_k + j);
            for (long c = 0; c < C; c++) {
                REAL v = yp[c], m = out[c];
                int take = (v > m) | (v != v);
                out[c] = take ? v : m;
                where[c] = take ? here : where[c];
            }
        }
    for (long c = 0; c < C; c++) arg[c] = (unsigned char)where[c];
}

static void NAME(forward_sample)(const REAL *x, REAL *out, unsigned char *arg, REAL *y, REAL *scratch, long H,
                                 long W, long C, int size, REAL alpha, REAL beta, REAL k, int relu, int pool_k,
                                 int pool_s) {
    NAME(normalise_sample)(x, pool_k ? y : out, scratch, H * W, C, size, alpha, beta, k, relu);
    if (!pool_k) return;
    const long PH = (H - pool_k) / pool_s + 1, PW = (W - pool_k) / pool_s + 1;
    for (long ph = 0; ph < PH; ph++)
        for (long pw = 0; pw < PW; pw++) {
            const long q = (ph * PW + pw) * C;
            NAME(window_max)(y, out + q, arg + q, scratch, W, C, ph, pw, pool_k, pool_s);
        }
}

static void NAME(backward_sample)(const REAL *x, const REAL *gout, const unsigned char *arg, REAL *gx, REAL *gy,
                                  REAL *scratch, long H, long W, long C, int size, REAL alpha, REAL beta, REAL k,
                                  int relu, int pool_k, int pool_s) {
    REAL *a = scratch, *d = a + C, *s = d + C, *padded = s + C, *sum = padded + C + size, *t = sum + C;
    const long HW = H * W;
    const REAL *g = gout;
    if (pool_k) {
        /* Route each pooled gradient to the element the forward's max picked (saved in arg). */
        for (long i = 0; i < HW * C; i++) gy[i] = 0;
        const long PH = (H - pool_k) / pool_s + 1, PW = (W - pool_k) / pool_s + 1;
        long offset[256]; /* window position -> its offset from the window's first element */
        for (int i = 0; i < pool_k; i++)
            for (int j = 0; j < pool_k; j++) offset[i * pool_k + j] = (i * W + j) * C;
        for (long ph = 0; ph < PH; ph++)
            for (long pw = 0; pw < PW; pw++) {
                const long q = (ph * PW + pw) * C;
                REAL *corner = gy + (ph * pool_s * W + pw * pool_s) * C;
                for (long c = 0; c < C; c++) corner[offset[arg[q + c]] + c] += gout[q + c];
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

/* Samples [first, last) of a batch; the caller runs chunks on its own threads. With pooling, arg receives
 * each output's position in its window, which the backward needs; without, arg is unused (NULL). */
void NAME(norm_forward)(const REAL *x, REAL *out, unsigned char *arg, long first, long last, long H, long W, long C,
                        int size, double alpha, double beta, double k, int relu, int pool_k, int pool_s) {
    const long PH = pool_k ? (H - pool_k) / pool_s + 1 : H, PW = pool_k ? (W - pool_k) / pool_s + 1 : W;
    REAL *y = pool_k ? (REAL *)malloc(sizeof(REAL) * H * W * C) : NULL;
    REAL *scratch = (REAL *)calloc(5 * C + 2 * size, sizeof(REAL));
    for (long n = first; n < last; n++)
        NAME(forward_sample)(x + n * H * W * C, out + n * PH * PW * C, arg ? arg + n * PH * PW * C : NULL, y, scratch,
                             H, W, C, size, (REAL)alpha, (REAL)beta, (REAL)k, relu, pool_k, pool_s);
    free(y);
    free(scratch);
}

void NAME(norm_backward)(const REAL *x, const REAL *gout, const unsigned char *arg, REAL *gx, long first, long last,
                         long H, long W, long C, int size, double alpha, double beta, double k, int relu, int pool_k,
                         int pool_s) {
    const long PH = pool_k ? (H - pool_k) / pool_s + 1 : H, PW = pool_k ? (W - pool_k) / pool_s + 1 : W;
    REAL *gy = pool_k ? (REAL *)malloc(sizeof(REAL) * H * W * C) : NULL;
    REAL *scratch = (REAL *)calloc(6 * C + 2 * size, sizeof(REAL));
    for (long n = first; n < last; n++)
        NAME(backward_sample)(x + n * H * W * C, gout + n * PH * PW * C, arg ? arg + n * PH * PW * C : NULL,
                              gx + n * H * W * C, gy, scratch, H, W, C, size, (REAL)alpha, (REAL)beta, (REAL)k,
                              relu, pool_k, pool_s);
    free(gy);
    free(scratch);
}
