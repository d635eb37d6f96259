/*
 * Fused element-wise passes of a MAF training step (see backprop.py), and of scoring.
 * Python reaches them only through _native.py, which checks every tensor first.
 *
 * A training step at the usual sizes (a few hundred rows, hidden layers of
 * about a hundred units) spends as much time dispatching torch's element-wise
 * operations as multiplying matrices: every operation costs microseconds of
 * overhead and a pass over memory. The matrix products stay with torch (its
 * BLAS); the element-wise work between them is done here, one pass per
 * layer and direction, on the tensors' memory:
 *
 *   affine_forward       shift and log-scale -> u, the cached factors, the log-det;
 *   affine_backward      d loss / d u -> d loss / d (shift, raw log-scale), d loss / d x,
 *                        and the output layer's bias gradient;
 *   activation_backward  through ReLU or tanh, in place, and the layer's bias gradient;
 *   gaussian_loss        the N(0, I) base: the mean negative log-likelihood
 *                        (less its constant) and d loss / d u;
 *   batch_norm_forward   batch norm with the (weighted) batch's moments, and its
 *   batch_norm_backward  gradients;
 *   adam_step            the optimizer's step on flat buffers of all the parameters:
 *                        gradient masks, clipping, L2 penalty, Adam, weight averaging;
 *
 * and two of scoring (float64, no gradients):
 *
 *   linear_relu_score    a MADE's first layer with its ReLU, for a few inputs (made.py);
 *   affine_score         a MAF layer's affine transform and log-det on feature-major rows
 *                        (AffineMADE.forward, transforms.py).
 *
 * Arguments are addresses of contiguous row-major buffers (torch's
 * data_ptr()) and sizes, checked by _native.py against each other (dtype, layout,
 * device, every size) before the call; the caller owns the memory.
 * Each training pass has a float and a double version; a "share" is each row's
 * weight in the mean: one value for every row (stride 0) or one per row
 * (stride 1). Sums over rows accumulate column by column in the tensors'
 * dtype (as torch's sums do), the loss in double.
 *
 * This module is optional: without a C compiler the package installs
 * without it and the layers run the same arithmetic as torch operations.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/*
 * exp for float32 that the compiler can vectorise (libm's expf is a call per
 * number): exp(x) = 2^n exp(r), n = round(x / log 2), r = x - n log 2 in two
 * parts (Cody and Waite), exp(r) by Cephes' minimax polynomial: within 2 ulp
 * of expf over the float range. Below -87.3 it returns about 1e-38, above
 * 88.3 about 2e38 (both of which 1 / (1 + exp(z)) rounds like expf's 0 and
 * inf); NaN stays NaN.
 */
static inline float
fast_expf(float x)
{
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + magic) - magic;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/*
 * exp for float64 that the compiler can vectorise, for scoring: exp(x) = 2^n
 * exp(r), n = round(x / log 2), r = x - n log 2 in two parts (Cody and
 * Waite), |r| <= log(2) / 2, exp(r) by its Taylor polynomial of degree 13
 * (truncation below 1e-17 relative). 2^n is built from n's bits with integer
 * operations, which AVX2 has for 64-bit lanes (it has no conversion from
 * double to int64). Within 2 ulp of exp over [-708, 709]; below, about
 * 2e-308, above about 8e307 (1 / (1 + exp(z)) rounds both like exp's 0 and
 * inf); NaN stays NaN.
 */
static inline double
fast_exp(double x)
{
    x = x < -708.0 ? -708.0 : x;
    x = x > 709.0 ? 709.0 : x;
    const double shift = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    union { double d; uint64_t u; } k, two_n;
    k.d = x * 1.4426950408889634074 + shift;
    double n = k.d - shift;
    double r = x - n * 6.93147180369123816490e-01; /* log 2, high part: n * it is exact */
    r = r - n * 1.90821492927058770002e-10;        /* low part */
    /* exp(r) = 1 + r + r^2 q(r), q(r) = sum_m r^m / (m + 2)!, m <= 11, by Estrin's scheme:
       four multiply-adds deep instead of Horner's eleven, so that the numbers of a vector
       are not waiting on one long chain of dependent operations */
    double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    double e0 = 1.0 / 2.0 + r * (1.0 / 6.0), e1 = 1.0 / 24.0 + r * (1.0 / 120.0);
    double e2 = 1.0 / 720.0 + r * (1.0 / 5040.0), e3 = 1.0 / 40320.0 + r * (1.0 / 362880.0);
    double e4 = 1.0 / 3628800.0 + r * (1.0 / 39916800.0);
    double e5 = 1.0 / 479001600.0 + r * (1.0 / 6227020800.0);
    double f0 = e0 + r2 * e1, f1 = e2 + r2 * e3, f2 = e4 + r2 * e5;
    double q = (f0 + r4 * f1) + r8 * f2;
    double p = (r + r2 * q) + 1.0;
    /* k's low bits hold n; adding the exponent bias and shifting leaves (n + 1023) << 52 */
    two_n.u = (k.u + 1023) << 52;
    return p * two_n.d;
}

/*
 * Scoring, float64 without gradients: one MAF layer on feature-major rows,
 * as MADE._forward_inference lays them out (_native.affine_score). shift and
 * raw (the MADE's raw log-scale) are (d, n), x has d rows of n numbers
 * x_stride apart; writes u (d, n) and log_det (n):
 * m = 2 bound sigmoid(-2 raw / bound) - bound, u = (x - shift) exp(m), log_det = sum m.
 * Each number is computed alone, in the same operations whether it falls in a
 * vector or in the loop's remainder, so that this pass's result for a row does
 * not depend on the other rows scored with it (tests/test_fused.py).
 */
#define DEFINE_SCORE_PASS(SUFFIX, ATTR)                                                          \
    ATTR static void affine_score_##SUFFIX(Py_ssize_t n, Py_ssize_t d, double bound,             \
                                           const double *shift_, const double *raw_,              \
                                           const double *x,                                       \
                                           Py_ssize_t x_stride, double *restrict u,               \
                                           double *restrict log_det)                              \
    {                                                                                            \
        const double gain = 2.0 / bound, two_bound = 2.0 * bound;                                 \
        for (Py_ssize_t j = 0; j < n; ++j)                                                       \
            log_det[j] = 0.0;                                                                    \
        for (Py_ssize_t i = 0; i < d; ++i) {                                                     \
            const double *shift = shift_ + i * n, *raw = raw_ + i * n;                           \
            const double *xi = x + i * x_stride;                                                 \
            double *restrict ui = u + i * n;                                                     \
            /* two loops of one exp each: more numbers in flight than one loop of two */        \
            for (Py_ssize_t j = 0; j < n; ++j) {                                                 \
                double m = two_bound / (1.0 + fast_exp(gain * raw[j])) - bound;                  \
                ui[j] = m;                                                                       \
                log_det[j] += m;                                                                 \
            }                                                                                    \
            for (Py_ssize_t j = 0; j < n; ++j)                                                   \
                ui[j] = (xi[j] - shift[j]) * fast_exp(ui[j]);                                    \
        }                                                                                        \
    }

DEFINE_SCORE_PASS(f64, )

/*
 * Scoring, float64: a MADE's first layer, out = relu(weight @ x), for a few
 * inputs (the features, after a row of ones for the bias). weight is (m, k)
 * row-major, x has k rows of n numbers x_stride apart, out m rows
 * out_stride apart. With k ~ 9, MKL's product runs at half its rate on a
 * chunk of rows, and the ReLU is another pass over the (m, n) result; here
 * blocks of 4 units by 8 rows stay in registers over the k inputs and are
 * written once, rectified. AVX2 and FMA only: the baseline's version is
 * the reference loop, which torch outruns (the caller checks avx2()).
 *
 * Every number is the sum over the inputs in order, one fused multiply-add
 * at a time, in the blocks and in the remainders alike, so a row's result
 * does not depend on the others; the ReLU keeps NaN (max(0, NaN) is NaN).
 */
#define LINEAR_SCORE_REFERENCE(FMA)                                                                \
    for (Py_ssize_t u = 0; u < m; ++u) {                                                           \
        const double *w = weight + u * k;                                                          \
        for (Py_ssize_t j = u < m_blocked ? n_blocked : 0; j < n; ++j) {                           \
            double acc = 0.0;                                                                      \
            for (Py_ssize_t i = 0; i < k; ++i)                                                     \
                acc = FMA(w[i], x[i * x_stride + j], acc);                                         \
            out[u * out_stride + j] = acc < 0.0 ? 0.0 : acc;                                       \
        }                                                                                          \
    }

static inline double
multiply_add(double a, double b, double c)
{
    return a * b + c;
}

static void
linear_relu_score_f64(Py_ssize_t n, Py_ssize_t m, Py_ssize_t k, const double *weight, const double *x,
                      Py_ssize_t x_stride, double *out, Py_ssize_t out_stride)
{
    const Py_ssize_t m_blocked = 0, n_blocked = 0;
    LINEAR_SCORE_REFERENCE(multiply_add)
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static void
linear_relu_score_f64_avx2(Py_ssize_t n, Py_ssize_t m, Py_ssize_t k, const double *weight, const double *x,
                           Py_ssize_t x_stride, double *out, Py_ssize_t out_stride)
{
    const Py_ssize_t m_blocked = m - m % 4, n_blocked = n - n % 8;
    const __m256d zero = _mm256_setzero_pd();
    for (Py_ssize_t h = 0; h < m_blocked; h += 4) {
        const double *w = weight + h * k;
        for (Py_ssize_t j = 0; j < n_blocked; j += 8) {
            __m256d a[4][2];
            for (int r = 0; r < 4; ++r)
                a[r][0] = a[r][1] = zero;
            for (Py_ssize_t i = 0; i < k; ++i) {
                const double *xi = x + i * x_stride + j;
                __m256d x0 = _mm256_loadu_pd(xi), x1 = _mm256_loadu_pd(xi + 4);
                for (int r = 0; r < 4; ++r) {
                    __m256d wr = _mm256_broadcast_sd(w + r * k + i);
                    a[r][0] = _mm256_fmadd_pd(wr, x0, a[r][0]);
                    a[r][1] = _mm256_fmadd_pd(wr, x1, a[r][1]);
                }
            }
            for (int r = 0; r < 4; ++r) {
                double *o = out + (h + r) * out_stride + j;
                _mm256_storeu_pd(o, _mm256_max_pd(zero, a[r][0])); /* NaN, the second operand, stays */
                _mm256_storeu_pd(o + 4, _mm256_max_pd(zero, a[r][1]));
            }
        }
    }
    LINEAR_SCORE_REFERENCE(fma)
}
#endif

#define DEFINE_PASSES(T, EXP, LOG, SQRT, SUFFIX, ATTR)                                                          \
    /* u = (x - shift) exp(m), m = 2 bound sigmoid(-2 raw / bound) - bound; log_det += sum m.    \
       In flat loops over contiguous buffers, which the compiler vectorises (rows of d numbers    \
       are too short to); u, sig and scale must not overlap the inputs. */                        \
    ATTR static void affine_forward_##SUFFIX(Py_ssize_t n, Py_ssize_t d, double bound,             \
                                        const T *out, const T *x, T *restrict u,               \
                                        T *restrict sig, T *restrict scale, T *log_det)        \
    {                                                                                          \
        const T gain = (T)(2.0 / bound), two_bound = (T)(2.0 * bound), b = (T)bound;           \
        const Py_ssize_t size = n * d;                                                         \
        for (Py_ssize_t r = 0; r < n; ++r)                                                     \
            for (Py_ssize_t i = 0; i < d; ++i)                                                 \
                sig[r * d + i] = out[r * 2 * d + d + i];                                       \
        for (Py_ssize_t k = 0; k < size; ++k) {                                                \
            T s = (T)1 / ((T)1 + EXP(gain * sig[k]));                                          \
            sig[k] = s;                                                                        \
            scale[k] = EXP(two_bound * s - b);                                                 \
        }                                                                                      \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            T total = 0;                                                                       \
            for (Py_ssize_t i = 0; i < d; ++i) {                                               \
                u[r * d + i] = (x[r * d + i] - out[r * 2 * d + i]) * scale[r * d + i];         \
                total += sig[r * d + i];                                                       \
            }                                                                                  \
            total = two_bound * total - (T)d * b; /* sum of m */                               \
            log_det[r] += total;                                                               \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* grad_x = grad_u c; d / d shift = -grad_x;                                               \
       d / d raw = 4 (share - grad_u u) s (1 - s); bias_grad = column sums of both blocks */   \
    ATTR static void affine_backward_##SUFFIX(Py_ssize_t n, Py_ssize_t d, const T *grad_u,         \
                                         const T *scale, const T *u, const T *sig,             \
                                         const T *share, Py_ssize_t share_stride,              \
                                         T *grad_out, T *grad_x, T *bias_grad, T *sums)        \
    {                                                                                          \
        for (Py_ssize_t i = 0; i < 2 * d; ++i)                                                 \
            sums[i] = 0;                                                                       \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            const T p = share[r * share_stride];                                               \
            const T *g = grad_u + r * d, *c = scale + r * d, *ur = u + r * d, *s = sig + r * d; \
            T *go = grad_out + r * 2 * d, *gx = grad_x + r * d;                                 \
            for (Py_ssize_t i = 0; i < d; ++i) {                                               \
                T gxi = g[i] * c[i];                                                           \
                T graw = (T)4 * (p - g[i] * ur[i]) * (s[i] - s[i] * s[i]);                     \
                gx[i] = gxi;                                                                   \
                go[i] = -gxi;                                                                  \
                go[d + i] = graw;                                                              \
                sums[i] -= gxi;                                                                \
                sums[d + i] += graw;                                                           \
            }                                                                                  \
        }                                                                                      \
        for (Py_ssize_t i = 0; i < 2 * d; ++i)                                                 \
            bias_grad[i] = sums[i];                                                            \
    }                                                                                          \
                                                                                               \
    /* grad *= f'(pre-activation), given the activation's output h; bias_grad = column sums */ \
    ATTR static void activation_backward_##SUFFIX(Py_ssize_t n, Py_ssize_t k, int tanh_,           \
                                             T *grad, const T *h, T *bias_grad, T *sums)       \
    {                                                                                          \
        for (Py_ssize_t j = 0; j < k; ++j)                                                     \
            sums[j] = 0;                                                                       \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            T *g = grad + r * k;                                                               \
            const T *hr = h + r * k;                                                           \
            if (tanh_) {                                                                       \
                for (Py_ssize_t j = 0; j < k; ++j) {                                           \
                    g[j] *= (T)1 - hr[j] * hr[j];                                              \
                    sums[j] += g[j];                                                           \
                }                                                                              \
            } else {                                                                           \
                for (Py_ssize_t j = 0; j < k; ++j) {                                           \
                    g[j] = hr[j] > (T)0 ? g[j] : (T)0;                                         \
                    sums[j] += g[j];                                                           \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        for (Py_ssize_t j = 0; j < k; ++j)                                                     \
            bias_grad[j] = sums[j];                                                            \
    }                                                                                          \
                                                                                               \
    /* loss = sum_r share_r (|u_r|^2 / 2 - log_det_r); grad_u = share u */                    \
    ATTR static void gaussian_loss_##SUFFIX(Py_ssize_t n, Py_ssize_t d, const T *u,                \
                                       const T *log_det, const T *share,                       \
                                       Py_ssize_t share_stride, T *grad_u, T *loss)            \
    {                                                                                          \
        double total = 0.0;                                                                    \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            const T p = share[r * share_stride];                                               \
            const T *ur = u + r * d;                                                           \
            T *g = grad_u + r * d;                                                             \
            T squares = 0;                                                                     \
            for (Py_ssize_t i = 0; i < d; ++i) {                                               \
                squares += ur[i] * ur[i];                                                      \
                g[i] = p * ur[i];                                                              \
            }                                                                                  \
            total += (double)p * ((double)squares * 0.5 - (double)log_det[r]);                 \
        }                                                                                      \
        *loss = (T)total;                                                                      \
    }                                                                                          \
                                                                                               \
    /* Batch norm in training mode, rows weighted by share: the moments (two passes), the     \
       running averages, y = beta + (x - mean) scale with scale = exp(log_gamma) / sqrt(var +  \
       eps); writes centred and, per feature, var + eps, scale; adds sum log scale to log_det. */ \
    ATTR static void batch_norm_forward_##SUFFIX(Py_ssize_t n, Py_ssize_t d, const T *x,      \
                                                 const T *share, Py_ssize_t share_stride,      \
                                                 const T *log_gamma, const T *beta,            \
                                                 T *running_mean, T *running_var,              \
                                                 double momentum, double eps, T *y,            \
                                                 T *centred, T *var_eps, T *scale, T *log_det, \
                                                 T *mean)                                      \
    {                                                                                          \
        for (Py_ssize_t j = 0; j < d; ++j)                                                     \
            mean[j] = 0;                                                                       \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            const T p = share[r * share_stride];                                               \
            for (Py_ssize_t j = 0; j < d; ++j)                                                 \
                mean[j] += p * x[r * d + j];                                                   \
        }                                                                                      \
        for (Py_ssize_t j = 0; j < d; ++j)                                                     \
            var_eps[j] = 0;                                                                    \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            const T p = share[r * share_stride];                                               \
            for (Py_ssize_t j = 0; j < d; ++j) {                                               \
                T c = x[r * d + j] - mean[j];                                                  \
                centred[r * d + j] = c;                                                        \
                var_eps[j] += p * c * c;                                                       \
            }                                                                                  \
        }                                                                                      \
        T total = 0;                                                                           \
        for (Py_ssize_t j = 0; j < d; ++j) {                                                   \
            running_mean[j] += (T)momentum * (mean[j] - running_mean[j]);                      \
            running_var[j] += (T)momentum * (var_eps[j] - running_var[j]);                     \
            var_eps[j] += (T)eps;                                                              \
            T log_scale = log_gamma[j] - (T)0.5 * LOG(var_eps[j]);                             \
            scale[j] = EXP(log_scale);                                                         \
            total += log_scale;                                                                \
        }                                                                                      \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            for (Py_ssize_t j = 0; j < d; ++j)                                                 \
                y[r * d + j] = beta[j] + centred[r * d + j] * scale[j];                        \
            log_det[r] += total;                                                               \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* Its gradients: d / d log_gamma = scale sum grad_y centred - 1, d / d beta = sum grad_y; \
       grad_x = scale (grad_y - p sum grad_y) - p centred (d / d log_gamma) / (var + eps). */    \
    ATTR static void batch_norm_backward_##SUFFIX(Py_ssize_t n, Py_ssize_t d, const T *grad_y, \
                                                  const T *centred, const T *var_eps,          \
                                                  const T *scale, const T *share,              \
                                                  Py_ssize_t share_stride, T *grad_log_gamma,  \
                                                  T *grad_beta, T *grad_x, T *grad_var)        \
    {                                                                                          \
        for (Py_ssize_t j = 0; j < d; ++j)                                                     \
            grad_log_gamma[j] = grad_beta[j] = 0;                                              \
        for (Py_ssize_t r = 0; r < n; ++r)                                                     \
            for (Py_ssize_t j = 0; j < d; ++j) {                                               \
                grad_log_gamma[j] += grad_y[r * d + j] * centred[r * d + j];                   \
                grad_beta[j] += grad_y[r * d + j];                                             \
            }                                                                                  \
        for (Py_ssize_t j = 0; j < d; ++j) {                                                   \
            grad_log_gamma[j] = grad_log_gamma[j] * scale[j] - (T)1;                           \
            grad_var[j] = grad_log_gamma[j] / var_eps[j];                                      \
        }                                                                                      \
        if (grad_x == NULL)                                                                    \
            return;                                                                            \
        for (Py_ssize_t r = 0; r < n; ++r) {                                                   \
            const T p = share[r * share_stride];                                               \
            for (Py_ssize_t j = 0; j < d; ++j)                                                 \
                grad_x[r * d + j] = (grad_y[r * d + j] - p * grad_beta[j]) * scale[j]          \
                                    - p * centred[r * d + j] * grad_var[j];                    \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* One optimizer step on flat buffers (see adam_step below); returns the gradient's norm. */ \
    ATTR static double adam_step_##SUFFIX(Py_ssize_t n, T *restrict param, const T *grad,          \
                                     const T *mask, const T *decay, T *restrict exp_avg,      \
                                     T *restrict exp_avg_sq, T *restrict average,              \
                                     T *clip_average, int clip_first, double clip_factor,      \
                                     double clip_momentum, double lr, double beta1,            \
                                     double beta2, double eps, double bias_correction1,        \
                                     double bias_correction2, double average_weight)           \
    {                                                                                          \
        /* eight running sums: one would be a chain of dependent additions */                \
        double sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                             \
        Py_ssize_t i = 0;                                                                      \
        for (; i + 8 <= n; i += 8)                                                             \
            for (int j = 0; j < 8; ++j) {                                                      \
                double g = (double)(grad[i + j] * mask[i + j]);                                \
                sums[j] += g * g;                                                              \
            }                                                                                  \
        for (; i < n; ++i) {                                                                   \
            double g = (double)(grad[i] * mask[i]);                                            \
            sums[0] += g * g;                                                                  \
        }                                                                                      \
        double squares = 0.0;                                                                  \
        for (int j = 0; j < 8; ++j)                                                            \
            squares += sums[j];                                                                \
        double norm = sqrt(squares), scale = 1.0;                                              \
        if (clip_average != NULL) {                                                            \
            double running = clip_first ? norm : (double)*clip_average;                        \
            double limit = running * clip_factor;                                              \
            double floor_ = norm > DBL_MIN ? norm : DBL_MIN;                                   \
            scale = limit / floor_ < 1.0 ? limit / floor_ : 1.0;                               \
            double kept = norm < limit ? norm : limit;                                         \
            *clip_average = (T)(running + clip_momentum * (kept - running));                   \
        }                                                                                      \
        const T s = (T)scale, b1 = (T)beta1, b2 = (T)beta2, one_b1 = (T)(1.0 - beta1);          \
        const T one_b2 = (T)(1.0 - beta2), step_size = (T)(lr / bias_correction1);             \
        const T root_bc2 = (T)sqrt(bias_correction2), e = (T)eps, w = (T)average_weight;       \
        for (i = 0; i < n; ++i) {                                                              \
            T g = grad[i] * mask[i] * s + decay[i] * param[i];                                 \
            T m = exp_avg[i] + one_b1 * (g - exp_avg[i]);                                      \
            T v = b2 * exp_avg_sq[i] + one_b2 * g * g;                                         \
            T p = param[i] - step_size * m / (SQRT(v) / root_bc2 + e);                         \
            exp_avg[i] = m;                                                                    \
            exp_avg_sq[i] = v;                                                                 \
            param[i] = p;                                                                      \
            if (average != NULL)                                                               \
                average[i] += w * (p - average[i]);                                            \
        }                                                                                      \
        (void)b1;                                                                              \
        return norm;                                                                           \
    }

DEFINE_PASSES(float, fast_expf, logf, sqrtf, f32, )
DEFINE_PASSES(double, exp, log, sqrt, f64, )

/*
 * The same passes compiled for AVX2 and FMA, chosen at import where the CPU
 * has them (GCC and Clang on x86-64): twice the width of the baseline's SSE2
 * vectors, which halves the time of the square roots and divisions of the
 * optimizer's step and of the exponentials (measured: adam_step on 63,000
 * float32 parameters, 70-100 us against 170-190 us).
 */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define HAVE_AVX2_PASSES 1
DEFINE_PASSES(float, fast_expf, logf, sqrtf, f32_avx2, __attribute__((target("avx2,fma"))))
DEFINE_PASSES(double, exp, log, sqrt, f64_avx2, __attribute__((target("avx2,fma"))))
DEFINE_SCORE_PASS(f64_avx2, __attribute__((target("avx2,fma"))))
#endif

static int use_avx2 = 0;

#ifdef HAVE_AVX2_PASSES
#define PICK(name, suffix) (use_avx2 ? name##_##suffix##_avx2 : name##_##suffix)
#else
#define PICK(name, suffix) name##_##suffix
#endif

/* ---------------------------------------------------------------- Python bindings */

/* Reads args[first:first + count] as addresses (Python ints). */
static int
addresses(PyObject *const *args, Py_ssize_t first, Py_ssize_t count, void **out)
{
    for (Py_ssize_t i = 0; i < count; ++i) {
        out[i] = PyLong_AsVoidPtr(args[first + i]);
        if (out[i] == NULL && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static int
sizes(PyObject *const *args, Py_ssize_t first, Py_ssize_t count, Py_ssize_t *out)
{
    for (Py_ssize_t i = 0; i < count; ++i) {
        out[i] = PyLong_AsSsize_t(args[first + i]);
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
        if (out[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "sizes must be non-negative");
            return -1;
        }
    }
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, expected, nargs);
        return -1;
    }
    return 0;
}

/* The first argument of every function: 0 for float32, 1 for float64. */
static int
is_double(PyObject *arg, int *out)
{
    long code = PyLong_AsLong(arg);
    if (code == -1 && PyErr_Occurred())
        return -1;
    if (code != 0 && code != 1) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0 (float32) or 1 (float64)");
        return -1;
    }
    *out = (int)code;
    return 0;
}

/* affine_forward(dtype, n, d, bound, out, x, u, sig, scale, log_det) */
static PyObject *
py_affine_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dbl;
    Py_ssize_t nd[2];
    void *p[6];
    if (check_nargs("affine_forward", nargs, 10) || is_double(args[0], &dbl) || sizes(args, 1, 2, nd))
        return NULL;
    double bound = PyFloat_AsDouble(args[3]);
    if (bound == -1.0 && PyErr_Occurred())
        return NULL;
    if (addresses(args, 4, 6, p))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        PICK(affine_forward, f64)(nd[0], nd[1], bound, p[0], p[1], p[2], p[3], p[4], p[5]);
    else
        PICK(affine_forward, f32)(nd[0], nd[1], bound, p[0], p[1], p[2], p[3], p[4], p[5]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* affine_backward(dtype, n, d, grad_u, scale, u, sig, share, share_stride, grad_out, grad_x, bias_grad) */
static PyObject *
py_affine_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dbl;
    Py_ssize_t nd[2], stride;
    void *p[5], *q[3];
    if (check_nargs("affine_backward", nargs, 12) || is_double(args[0], &dbl) || sizes(args, 1, 2, nd)
        || addresses(args, 3, 5, p) || sizes(args, 8, 1, &stride) || addresses(args, 9, 3, q))
        return NULL;
    double *sums = malloc(sizeof(double) * (size_t)(2 * nd[1] + 1));
    if (sums == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        PICK(affine_backward, f64)(nd[0], nd[1], p[0], p[1], p[2], p[3], p[4], stride, q[0], q[1], q[2], (void *)sums);
    else
        PICK(affine_backward, f32)(nd[0], nd[1], p[0], p[1], p[2], p[3], p[4], stride, q[0], q[1], q[2], (void *)sums);
    Py_END_ALLOW_THREADS
    free(sums);
    Py_RETURN_NONE;
}

/* activation_backward(dtype, n, k, tanh, grad, h, bias_grad) */
static PyObject *
py_activation_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dbl;
    Py_ssize_t nk[2];
    void *p[3];
    if (check_nargs("activation_backward", nargs, 7) || is_double(args[0], &dbl) || sizes(args, 1, 2, nk))
        return NULL;
    int tanh_ = PyObject_IsTrue(args[3]);
    if (tanh_ < 0 || addresses(args, 4, 3, p))
        return NULL;
    double *sums = malloc(sizeof(double) * (size_t)(nk[1] + 1));
    if (sums == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        PICK(activation_backward, f64)(nk[0], nk[1], tanh_, p[0], p[1], p[2], (void *)sums);
    else
        PICK(activation_backward, f32)(nk[0], nk[1], tanh_, p[0], p[1], p[2], (void *)sums);
    Py_END_ALLOW_THREADS
    free(sums);
    Py_RETURN_NONE;
}

/* gaussian_loss(dtype, n, d, u, log_det, share, share_stride, grad_u, loss) */
static PyObject *
py_gaussian_loss(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dbl;
    Py_ssize_t nd[2], stride;
    void *p[3], *q[2];
    if (check_nargs("gaussian_loss", nargs, 9) || is_double(args[0], &dbl) || sizes(args, 1, 2, nd)
        || addresses(args, 3, 3, p) || sizes(args, 6, 1, &stride) || addresses(args, 7, 2, q))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        PICK(gaussian_loss, f64)(nd[0], nd[1], p[0], p[1], p[2], stride, q[0], q[1]);
    else
        PICK(gaussian_loss, f32)(nd[0], nd[1], p[0], p[1], p[2], stride, q[0], q[1]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* batch_norm_forward(dtype, n, d, x, share, share_stride, log_gamma, beta, running_mean, running_var,
 *                    momentum, eps, y, centred, var_eps, scale, log_det) */
static PyObject *
py_batch_norm_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dbl;
    Py_ssize_t nd[2], stride;
    void *p[2], *q[4], *r[5];
    double v[2];
    if (check_nargs("batch_norm_forward", nargs, 17) || is_double(args[0], &dbl) || sizes(args, 1, 2, nd)
        || addresses(args, 3, 2, p) || sizes(args, 5, 1, &stride) || addresses(args, 6, 4, q))
        return NULL;
    for (int i = 0; i < 2; ++i) {
        v[i] = PyFloat_AsDouble(args[10 + i]);
        if (v[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    if (addresses(args, 12, 5, r))
        return NULL;
    double *mean = malloc(sizeof(double) * (size_t)(nd[1] + 1));
    if (mean == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        PICK(batch_norm_forward, f64)(nd[0], nd[1], p[0], p[1], stride, q[0], q[1], q[2], q[3], v[0], v[1],
                                      r[0], r[1], r[2], r[3], r[4], (void *)mean);
    else
        PICK(batch_norm_forward, f32)(nd[0], nd[1], p[0], p[1], stride, q[0], q[1], q[2], q[3], v[0], v[1],
                                      r[0], r[1], r[2], r[3], r[4], (void *)mean);
    Py_END_ALLOW_THREADS
    free(mean);
    Py_RETURN_NONE;
}

/* batch_norm_backward(dtype, n, d, grad_y, centred, var_eps, scale, share, share_stride, grad_log_gamma,
 *                     grad_beta, grad_x) -- grad_x may be 0 (not needed) */
static PyObject *
py_batch_norm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dbl;
    Py_ssize_t nd[2], stride;
    void *p[5], *q[3];
    if (check_nargs("batch_norm_backward", nargs, 12) || is_double(args[0], &dbl) || sizes(args, 1, 2, nd)
        || addresses(args, 3, 5, p) || sizes(args, 8, 1, &stride) || addresses(args, 9, 3, q))
        return NULL;
    double *grad_var = malloc(sizeof(double) * (size_t)(nd[1] + 1));
    if (grad_var == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        PICK(batch_norm_backward, f64)(nd[0], nd[1], p[0], p[1], p[2], p[3], p[4], stride, q[0], q[1], q[2],
                                       (void *)grad_var);
    else
        PICK(batch_norm_backward, f32)(nd[0], nd[1], p[0], p[1], p[2], p[3], p[4], stride, q[0], q[1], q[2],
                                       (void *)grad_var);
    Py_END_ALLOW_THREADS
    free(grad_var);
    Py_RETURN_NONE;
}

/* adam_step(dtype, n, param, grad, mask, decay, exp_avg, exp_avg_sq, average, clip_average, clip_first,
 *           clip_factor, clip_momentum, lr, beta1, beta2, eps, bias_correction1, bias_correction2,
 *           average_weight) -> the norm of the masked gradient, before clipping
 *
 * Masks the gradient (grad * mask), scales it to at most clip_factor times the
 * running norm at *clip_average (which it updates; clip_first: start it at this
 * norm; address 0: no clipping), adds the L2 term decay * param, takes torch's Adam
 * step, and moves the running average of the parameters (address 0: none) by
 * average_weight towards them. average and clip_average may be 0. */
static PyObject *
py_adam_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int dbl;
    Py_ssize_t n;
    void *p[8];
    double v[9];
    if (check_nargs("adam_step", nargs, 20) || is_double(args[0], &dbl) || sizes(args, 1, 1, &n)
        || addresses(args, 2, 8, p))
        return NULL;
    int clip_first = PyObject_IsTrue(args[10]);
    if (clip_first < 0)
        return NULL;
    for (int i = 0; i < 9; ++i) {
        v[i] = PyFloat_AsDouble(args[11 + i]);
        if (v[i] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    for (int i = 0; i < 6; ++i)
        if (p[i] == NULL) {
            PyErr_SetString(PyExc_ValueError, "adam_step: a required buffer has address 0");
            return NULL;
        }
    double norm;
    Py_BEGIN_ALLOW_THREADS
    if (dbl)
        norm = PICK(adam_step, f64)(n, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], clip_first, v[0], v[1],
                             v[2], v[3], v[4], v[5], v[6], v[7], v[8]);
    else
        norm = PICK(adam_step, f32)(n, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], clip_first, v[0], v[1],
                             v[2], v[3], v[4], v[5], v[6], v[7], v[8]);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(norm);
}

/* affine_score(n, d, bound, shift, raw, x, x_stride, u, log_det): float64 only */
static PyObject *
py_affine_score(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t nd[2], stride;
    void *p[3], *q[2];
    if (check_nargs("affine_score", nargs, 9) || sizes(args, 0, 2, nd))
        return NULL;
    double bound = PyFloat_AsDouble(args[2]);
    if ((bound == -1.0 && PyErr_Occurred()) || addresses(args, 3, 3, p) || sizes(args, 6, 1, &stride)
        || addresses(args, 7, 2, q))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    PICK(affine_score, f64)(nd[0], nd[1], bound, p[0], p[1], p[2], stride, q[0], q[1]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* linear_relu_score(n, m, k, weight, x, x_stride, out, out_stride): float64 only */
static PyObject *
py_linear_relu_score(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t nmk[3], strides[2];
    void *p[3];
    if (check_nargs("linear_relu_score", nargs, 8) || sizes(args, 0, 3, nmk) || addresses(args, 3, 2, p)
        || sizes(args, 5, 1, &strides[0]) || addresses(args, 6, 1, &p[2]) || sizes(args, 7, 1, &strides[1]))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    PICK(linear_relu_score, f64)(nmk[0], nmk[1], nmk[2], p[0], p[1], strides[0], p[2], strides[1]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* avx2() -> whether the AVX2 passes run */
static PyObject *
py_avx2(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(use_avx2);
}

/* set_avx2(flag) -> the previous setting: run the AVX2 passes (where the CPU has them) or the baseline's */
static PyObject *
py_set_avx2(PyObject *self, PyObject *arg)
{
    int flag = PyObject_IsTrue(arg), previous = use_avx2;
    if (flag < 0)
        return NULL;
#ifdef HAVE_AVX2_PASSES
    if (flag && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
        PyErr_SetString(PyExc_ValueError, "this CPU has no AVX2 and FMA");
        return NULL;
    }
#else
    if (flag) {
        PyErr_SetString(PyExc_ValueError, "the module was built without the AVX2 passes");
        return NULL;
    }
#endif
    use_avx2 = flag;
    return PyBool_FromLong(previous);
}

static PyMethodDef methods[] = {
    {"avx2", py_avx2, METH_NOARGS, "avx2() -> whether the AVX2 passes run"},
    {"set_avx2", py_set_avx2, METH_O,
     "set_avx2(flag) -> previous: use the AVX2 passes (where the CPU has them) or the baseline's (for tests)"},
    {"affine_forward", (PyCFunction)(void (*)(void))py_affine_forward, METH_FASTCALL,
     "affine_forward(dtype, n, d, bound, out, x, u, sig, scale, log_det)"},
    {"affine_backward", (PyCFunction)(void (*)(void))py_affine_backward, METH_FASTCALL,
     "affine_backward(dtype, n, d, grad_u, scale, u, sig, share, share_stride, grad_out, grad_x, bias_grad)"},
    {"activation_backward", (PyCFunction)(void (*)(void))py_activation_backward, METH_FASTCALL,
     "activation_backward(dtype, n, k, tanh, grad, h, bias_grad)"},
    {"gaussian_loss", (PyCFunction)(void (*)(void))py_gaussian_loss, METH_FASTCALL,
     "gaussian_loss(dtype, n, d, u, log_det, share, share_stride, grad_u, loss)"},
    {"batch_norm_forward", (PyCFunction)(void (*)(void))py_batch_norm_forward, METH_FASTCALL,
     "batch_norm_forward(dtype, n, d, x, share, share_stride, log_gamma, beta, running_mean, running_var, "
     "momentum, eps, y, centred, var_eps, scale, log_det)"},
    {"batch_norm_backward", (PyCFunction)(void (*)(void))py_batch_norm_backward, METH_FASTCALL,
     "batch_norm_backward(dtype, n, d, grad_y, centred, var_eps, scale, share, share_stride, "
     "grad_log_gamma, grad_beta, grad_x)"},
    {"affine_score", (PyCFunction)(void (*)(void))py_affine_score, METH_FASTCALL,
     "affine_score(n, d, bound, shift, raw, x, x_stride, u, log_det): a MAF layer in scoring, float64, feature-major"},
    {"linear_relu_score", (PyCFunction)(void (*)(void))py_linear_relu_score, METH_FASTCALL,
     "linear_relu_score(n, m, k, weight, x, x_stride, out, out_stride): relu(weight @ x), float64, few inputs"},
    {"adam_step", (PyCFunction)(void (*)(void))py_adam_step, METH_FASTCALL,
     "adam_step(dtype, n, param, grad, mask, decay, exp_avg, exp_avg_sq, average, clip_average, clip_first, "
     "clip_factor, clip_momentum, lr, beta1, beta2, eps, bias_correction1, bias_correction2, average_weight)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fused",
    "Fused element-wise passes of a MAF training step and of scoring, on raw buffers (see backprop.py).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__fused(void)
{
#ifdef HAVE_AVX2_PASSES
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return PyModule_Create(&module);
}
