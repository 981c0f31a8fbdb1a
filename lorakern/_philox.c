/* The dropout keep mask on the CPU, compiled: Philox4x32-10 as Triton's tl.randint4x.
 *
 * Optional: lorakern.reference falls back to its numpy generator (same bits, ~10x
 * slower) when this extension was not built. The arithmetic is the one of
 * reference._philox_np, in uint32 with 64-bit products; the keep test is
 * reference._philox_keep's unsigned range check: lane word u is kept when
 * (u - T) mod 2^32 <= 2^32 - 1 - 2T, T the integer threshold of p (1 <= T <= 2^31 - 1).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define ROUND_A 0xD2511F53u
#define ROUND_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u

/* out[4i + lane] = keep bit of `lane` of Philox at counter counter0 + i, i < n. */
static void keep_bits(uint64_t seed, uint64_t counter0, Py_ssize_t n, uint32_t threshold, uint8_t *out)
{
    const uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    const uint32_t span = 0xFFFFFFFFu - 2u * threshold;
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t counter = counter0 + (uint64_t)i;
        uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
        uint32_t k0 = key0, k1 = key1;
        for (int round = 0; round < 10; round++) {
            const uint64_t prod_a = (uint64_t)c0 * ROUND_A;
            const uint64_t prod_b = (uint64_t)c2 * ROUND_B;
            c0 = (uint32_t)(prod_b >> 32) ^ c1 ^ k0;
            c2 = (uint32_t)(prod_a >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)prod_b;
            c3 = (uint32_t)prod_a;
            k0 += KEY_A;
            k1 += KEY_B;
        }
        out[4 * i + 0] = (uint32_t)(c0 - threshold) <= span;
        out[4 * i + 1] = (uint32_t)(c1 - threshold) <= span;
        out[4 * i + 2] = (uint32_t)(c2 - threshold) <= span;
        out[4 * i + 3] = (uint32_t)(c3 - threshold) <= span;
    }
}

/* keep_bits(seed, counter0, n, threshold, out): out a writable buffer of 4n bytes. */
static PyObject *py_keep_bits(PyObject *self, PyObject *args)
{
    unsigned long long seed, counter0;
    Py_ssize_t n;
    unsigned int threshold;
    Py_buffer out;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnIw*", &seed, &counter0, &n, &threshold, &out))
        return NULL;
    if (n < 0 || out.len != 4 * n) {
        PyErr_Format(PyExc_ValueError, "keep_bits: out has %zd bytes, need 4 * n = %zd", out.len, 4 * n);
        PyBuffer_Release(&out);
        return NULL;
    }
    if (threshold < 1u || threshold > 0x7FFFFFFFu) {
        PyErr_Format(PyExc_ValueError, "keep_bits: threshold %u outside [1, 2**31 - 1]", threshold);
        PyBuffer_Release(&out);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    keep_bits(seed, counter0, n, threshold, (uint8_t *)out.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"keep_bits", py_keep_bits, METH_VARARGS,
     "keep_bits(seed, counter0, n, threshold, out): Philox4x32-10 keep bits of counters "
     "counter0 .. counter0 + n - 1 into out (4n bytes, lane-minor); releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox", NULL, -1, methods};

PyMODINIT_FUNC PyInit__philox(void) { return PyModule_Create(&module); }
