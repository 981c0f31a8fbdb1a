/* The dropout keep mask on the CPU, compiled: Philox4x32-10 as Triton's tl.randint4x.
 *
 * Optional: lorakern.reference falls back to its numpy generator (same bits, ~10x
 * slower) when this extension was not built. The arithmetic is the one of
 * reference._philox_np, in uint32 with 64-bit products; the keep test is
 * reference._philox_keep's unsigned range check: lane word u is kept when
 * (u - T) mod 2^32 <= 2^32 - 1 - 2T, T the integer threshold of p (1 <= T <= 2^31 - 1).
 * keep_bits writes the mask as bytes; keep_values as bytes, float32 or float64 1 / 0 (the
 * float32 one with AVX2 where the CPU has it, checked when the module is imported).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u

/* out[4i + lane] = keep value (1 or 0) of `lane` of Philox at counter counter0 + i, i < n,
 * one function per output type (uint8, float, double): a float mask is what the reference
 * multiplies by, so writing it here saves a conversion pass. Two counters per step, their
 * rounds interleaved: the two multiply chains overlap (the rounds are latency-bound). */
#define ROUND(c0, c1, c2, c3, k0, k1)                                                                  \
    do {                                                                                               \
        const uint64_t prod_a = (uint64_t)c0 * ROUND_A;                                                \
        const uint64_t prod_b = (uint64_t)c2 * ROUND_B;                                                \
        c0 = (uint32_t)(prod_b >> 32) ^ c1 ^ k0;                                                       \
        c2 = (uint32_t)(prod_a >> 32) ^ c3 ^ k1;                                                       \
        c1 = (uint32_t)prod_b;                                                                         \
        c3 = (uint32_t)prod_a;                                                                         \
    } while (0)
#define STORE(TYPE, out, i, c0, c1, c2, c3)                                                            \
    do {                                                                                               \
        out[4 * (i) + 0] = (TYPE)((uint32_t)(c0 - threshold) <= span);                                 \
        out[4 * (i) + 1] = (TYPE)((uint32_t)(c1 - threshold) <= span);                                 \
        out[4 * (i) + 2] = (TYPE)((uint32_t)(c2 - threshold) <= span);                                 \
        out[4 * (i) + 3] = (TYPE)((uint32_t)(c3 - threshold) <= span);                                 \
    } while (0)
#define KEEP_FUNCTION(NAME, TYPE)                                                                      \
    static void NAME(uint64_t seed, uint64_t counter0, Py_ssize_t n, uint32_t threshold, TYPE *out)   \
    {                                                                                                  \
        const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);                           \
        const uint32_t span = 0xFFFFFFFFu - 2u * threshold;                                            \
        Py_ssize_t i = 0;                                                                              \
        for (; i + 1 < n; i += 2) {                                                                    \
            const uint64_t ca = counter0 + (uint64_t)i, cb = ca + 1;                                   \
            uint32_t a0 = (uint32_t)ca, a1 = (uint32_t)(ca >> 32), a2 = 0, a3 = 0;                     \
            uint32_t b0 = (uint32_t)cb, b1 = (uint32_t)(cb >> 32), b2 = 0, b3 = 0;                     \
            uint32_t k0 = key0, k1 = key1;                                                             \
            for (int round = 0; round < 10; round++) {                                                 \
                ROUND(a0, a1, a2, a3, k0, k1);                                                         \
                ROUND(b0, b1, b2, b3, k0, k1);                                                         \
                k0 += KEY_A;                                                                           \
                k1 += KEY_B;                                                                           \
            }                                                                                          \
            STORE(TYPE, out, i, a0, a1, a2, a3);                                                       \
            STORE(TYPE, out, i + 1, b0, b1, b2, b3);                                                   \
        }                                                                                              \
        for (; i < n; i++) {                                                                           \
            const uint64_t ca = counter0 + (uint64_t)i;                                                \
            uint32_t a0 = (uint32_t)ca, a1 = (uint32_t)(ca >> 32), a2 = 0, a3 = 0;                     \
            uint32_t k0 = key0, k1 = key1;                                                             \
            for (int round = 0; round < 10; round++) {                                                 \
                ROUND(a0, a1, a2, a3, k0, k1);                                                         \
                k0 += KEY_A;                                                                           \
                k1 += KEY_B;                                                                           \
            }                                                                                          \
            STORE(TYPE, out, i, a0, a1, a2, a3);                                                       \
        }                                                                                              \
    }

KEEP_FUNCTION(keep_u8, uint8_t)
KEEP_FUNCTION(keep_f32, float)
KEEP_FUNCTION(keep_f64, double)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* float32 masks with AVX2 (checked at run time; the scalar keep_f32 otherwise), 2.6x the
 * scalar loop's speed on one EPYC core: 16 counters per step as two blocks of 8 lanes, the
 * 32x32 -> 64-bit products from _mm256_mul_epu32 on even and odd lanes. The same words and
 * the same keep test as the scalar code, bit for bit (tests/test_reference.py compares them). */
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

__attribute__((target("avx2"))) static inline void mulhilo(__m256i a, __m256i m, __m256i *hi, __m256i *lo)
{
    const __m256i even = _mm256_mul_epu32(a, m);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

/* The counters base .. base + 7: low words in c0, high words in c1. */
__attribute__((target("avx2"))) static inline void block_counters(uint64_t base, __m256i *c0, __m256i *c1)
{
    *c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    *c1 = _mm256_set1_epi32((int)(uint32_t)(base >> 32));
    if ((uint32_t)base > 0xFFFFFFFFu - 7u) { /* the low word wraps inside the block */
        uint32_t high[8];
        for (int j = 0; j < 8; j++)
            high[j] = (uint32_t)((base + (uint64_t)j) >> 32);
        *c1 = _mm256_loadu_si256((const __m256i *)high);
    }
}

/* 1.0f where (word - T) mod 2^32 <= span (unsigned: min(x, span) == x), else 0.0f. */
__attribute__((target("avx2"))) static inline __m256 keep_lanes(__m256i word, __m256i t, __m256i span)
{
    const __m256i x = _mm256_sub_epi32(word, t);
    const __m256i le = _mm256_cmpeq_epi32(_mm256_min_epu32(x, span), x);
    return _mm256_and_ps(_mm256_castsi256_ps(le), _mm256_set1_ps(1.0f));
}

/* The 8 counters' 4 words each as out[4j + lane]: a 4 x 8 transpose. */
__attribute__((target("avx2"))) static inline void block_store(float *out, __m256i c0, __m256i c1, __m256i c2, __m256i c3,
                                                               __m256i t, __m256i span)
{
    const __m256 v0 = keep_lanes(c0, t, span), v1 = keep_lanes(c1, t, span);
    const __m256 v2 = keep_lanes(c2, t, span), v3 = keep_lanes(c3, t, span);
    const __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1);
    const __m256 t2 = _mm256_unpacklo_ps(v2, v3), t3 = _mm256_unpackhi_ps(v2, v3);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

__attribute__((target("avx2"))) static void keep_f32_avx2(uint64_t seed, uint64_t counter0, Py_ssize_t n, uint32_t threshold,
                                                          float *out)
{
    const __m256i round_a = _mm256_set1_epi32((int)ROUND_A), round_b = _mm256_set1_epi32((int)ROUND_B);
    const __m256i t = _mm256_set1_epi32((int)threshold), span = _mm256_set1_epi32((int)(0xFFFFFFFFu - 2u * threshold));
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i a0, a1, b0, b1;
        block_counters(counter0 + (uint64_t)i, &a0, &a1);
        block_counters(counter0 + (uint64_t)i + 8, &b0, &b1);
        __m256i a2 = _mm256_setzero_si256(), a3 = a2, b2 = a2, b3 = a2;
        uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
        for (int round = 0; round < 10; round++) {
            const __m256i key0 = _mm256_set1_epi32((int)k0), key1 = _mm256_set1_epi32((int)k1);
            __m256i hi_a0, lo_a0, hi_a2, lo_a2, hi_b0, lo_b0, hi_b2, lo_b2;
            mulhilo(a0, round_a, &hi_a0, &lo_a0);
            mulhilo(b0, round_a, &hi_b0, &lo_b0);
            mulhilo(a2, round_b, &hi_a2, &lo_a2);
            mulhilo(b2, round_b, &hi_b2, &lo_b2);
            a0 = _mm256_xor_si256(_mm256_xor_si256(hi_a2, a1), key0);
            b0 = _mm256_xor_si256(_mm256_xor_si256(hi_b2, b1), key0);
            a2 = _mm256_xor_si256(_mm256_xor_si256(hi_a0, a3), key1);
            b2 = _mm256_xor_si256(_mm256_xor_si256(hi_b0, b3), key1);
            a1 = lo_a2;
            a3 = lo_a0;
            b1 = lo_b2;
            b3 = lo_b0;
            k0 += KEY_A;
            k1 += KEY_B;
        }
        block_store(out + 4 * i, a0, a1, a2, a3, t, span);
        block_store(out + 4 * i + 32, b0, b1, b2, b3, t, span);
    }
    keep_f32(seed, counter0 + (uint64_t)i, n - i, threshold, out + 4 * i); /* the last < 16 counters */
}
#endif

static int use_avx2 = 0; /* set at import when the CPU has AVX2 */

static void keep_values(uint64_t seed, uint64_t counter0, Py_ssize_t n, uint32_t threshold, void *out, int itemsize)
{
    if (itemsize == 1)
        keep_u8(seed, counter0, n, threshold, (uint8_t *)out);
    else if (itemsize == 4) {
#ifdef HAVE_AVX2_PATH
        if (use_avx2) {
            keep_f32_avx2(seed, counter0, n, threshold, (float *)out);
            return;
        }
#endif
        keep_f32(seed, counter0, n, threshold, (float *)out);
    } else
        keep_f64(seed, counter0, n, threshold, (double *)out);
}

static PyObject *keep_into(PyObject *args, int itemsize_arg)
{
    unsigned long long seed, counter0;
    Py_ssize_t n;
    unsigned int threshold;
    int itemsize = 1;
    Py_buffer out;
    if (itemsize_arg) {
        if (!PyArg_ParseTuple(args, "KKnIw*i", &seed, &counter0, &n, &threshold, &out, &itemsize))
            return NULL;
    } else if (!PyArg_ParseTuple(args, "KKnIw*", &seed, &counter0, &n, &threshold, &out)) {
        return NULL;
    }
    if (itemsize != 1 && itemsize != 4 && itemsize != 8) {
        PyErr_Format(PyExc_ValueError, "keep_values: itemsize must be 1, 4 or 8, got %d", itemsize);
        PyBuffer_Release(&out);
        return NULL;
    }
    if (n < 0 || out.len != 4 * n * itemsize) {
        PyErr_Format(PyExc_ValueError, "keep_bits: out has %zd bytes, need 4 * n * itemsize = %zd", out.len, 4 * n * itemsize);
        PyBuffer_Release(&out);
        return NULL;
    }
    if (threshold < 1u || threshold > 0x7FFFFFFFu) {
        PyErr_Format(PyExc_ValueError, "keep_bits: threshold %u outside [1, 2**31 - 1]", threshold);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    keep_values(seed, counter0, n, threshold, out.buf, itemsize);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* keep_bits(seed, counter0, n, threshold, out): out a writable buffer of 4n bytes. */
static PyObject *py_keep_bits(PyObject *self, PyObject *args)
{
    (void)self;
    return keep_into(args, 0);
}

/* keep_values(seed, counter0, n, threshold, out, itemsize): out 4n items of 1 (uint8), 4
 * (float) or 8 (double) bytes. */
static PyObject *py_keep_values(PyObject *self, PyObject *args)
{
    (void)self;
    return keep_into(args, 1);
}

static PyMethodDef methods[] = {
    {"keep_bits", py_keep_bits, METH_VARARGS,
     "keep_bits(seed, counter0, n, threshold, out): Philox4x32-10 keep bits of counters "
     "counter0 .. counter0 + n - 1 into out (4n bytes, lane-minor); releases the GIL."},
    {"keep_values", py_keep_values, METH_VARARGS,
     "keep_values(seed, counter0, n, threshold, out, itemsize): as keep_bits, the keep values "
     "written as 1 / 0 uint8 (itemsize 1), float32 (4) or float64 (8) into out (4n items)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox", NULL, -1, methods};

PyMODINIT_FUNC PyInit__philox(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") != 0;
#endif
    /* AVX2: whether float32 masks take the vector path (tests compare it with the scalar one). */
    if (PyModule_AddIntConstant(m, "AVX2", use_avx2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
