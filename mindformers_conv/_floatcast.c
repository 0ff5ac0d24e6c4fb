/* Casts between F32, F16 and BF16 bit patterns, for the streaming casts of tensor_ref.CastBytes.
 *
 * cast(src, dst, source, target, portable=False) converts a whole chunk in one pass with the GIL released,
 * bit-exact with dtypes.cast: round to nearest even, overflow to infinity, and NaNs keep their sign and the
 * top (widening: all) of their payload; a NaN whose kept payload is 0 gets the quiet bit. Every value goes
 * through its F32 bit pattern, which F16 and BF16 widen to exactly.
 *
 * The portable loops are branch-free integer code compilers vectorize. On x86-64 CPUs with AVX2 and F16C
 * every pair goes 8 elements at a time, F16 through the hardware conversions (several times faster); those
 * quiet signalling NaNs, so an 8-element block holding a NaN is redone by the portable code.
 * `portable=True` forces the portable loops (the tests check both against torch).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline float as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* c ? a : b for c in {0, 1}, with masks: no branch for the vectorizer to if-convert. */
static inline uint32_t pick(uint32_t c, uint32_t a, uint32_t b) { uint32_t m = 0u - c; return (a & m) | (b & ~m); }

static inline uint32_t bf16_to_f32(uint32_t b) { return b << 16; }

static inline uint32_t f16_to_f32(uint32_t h) {
    uint32_t body = (h & 0x7fff) << 13, exponent = body & 0x0f800000u;
    uint32_t normal = body + (112u << 23);  /* rebias 15 -> 127 */
    uint32_t subnormal = as_bits(as_float(body + (113u << 23)) - as_float(113u << 23));
    uint32_t out = pick(exponent == 0x0f800000u, normal + (112u << 23), pick(exponent == 0, subnormal, normal));
    return ((h & 0x8000) << 16) | out;
}

static inline uint32_t f32_to_f16(uint32_t x) {
    uint32_t a = x & 0x7fffffffu, payload = (a >> 13) & 0x3ff;
    uint32_t nan = 0x7c00 | pick(payload != 0, payload, 0x200);
    uint32_t subnormal = as_bits(as_float(a) + 0.5f) - 0x3f000000u;  /* the FPU rounds at 2^-24 */
    uint32_t normal = (a - (112u << 23) + 0xfff + ((a >> 13) & 1)) >> 13;  /* a carry may reach infinity */
    uint32_t out = pick(a > 0x7f800000u, nan, pick(a >= 0x47800000u, 0x7c00, pick(a < 0x38800000u, subnormal, normal)));
    return ((x >> 16) & 0x8000) | out;
}

static inline uint32_t f32_to_bf16(uint32_t x) {
    uint32_t payload = (x >> 16) & 0x7f;
    uint32_t nan = ((x >> 16) & 0x8000) | 0x7f80 | pick(payload != 0, payload, 0x40);
    return pick((x & 0x7fffffffu) > 0x7f800000u, nan, (x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

static inline uint32_t f32_to_f32(uint32_t x) { return x; }

/* Elements are loaded and stored with memcpy: buffers may sit at any address (a tensor in a .ckpt does). */
#define PORTABLE(S, D, WIDEN, NARROW) \
    static void portable_##S##_##D(const void *src, void *dst, Py_ssize_t n) { \
        const char *in = src; char *out = dst; \
        for (Py_ssize_t i = 0; i < n; i++) { \
            S##_t v; memcpy(&v, in + i * sizeof v, sizeof v); \
            D##_t r = (D##_t)NARROW(WIDEN(v)); memcpy(out + i * sizeof r, &r, sizeof r); \
        } \
    }
typedef uint16_t f16_t, bf16_t;
typedef uint32_t f32_t;
PORTABLE(bf16, f16, bf16_to_f32, f32_to_f16)
PORTABLE(f16, bf16, f16_to_f32, f32_to_bf16)
PORTABLE(f32, f16, f32_to_f32, f32_to_f16)
PORTABLE(f32, bf16, f32_to_f32, f32_to_bf16)
PORTABLE(f16, f32, f16_to_f32, f32_to_f32)
PORTABLE(bf16, f32, bf16_to_f32, f32_to_f32)

typedef void (*loop)(const void *, void *, Py_ssize_t);

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define F16C __attribute__((target("avx2,f16c")))

F16C static inline __m256 load_bf16(const void *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
}
F16C static inline __m256 load_f16(const void *p) { return _mm256_cvtph_ps(_mm_loadu_si128(p)); }
F16C static inline __m256 load_f32(const void *p) { return _mm256_loadu_ps(p); }
F16C static inline void store_f16(void *p, __m256 x) { _mm_storeu_si128(p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }
F16C static inline void store_f32(void *p, __m256 x) { _mm256_storeu_ps(p, x); }
F16C static inline void store_bf16(void *p, __m256 x) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(p, packed);
}

/* Hardware conversions 8 elements at a time; a block with a NaN, and the tail, go through the portable loop. */
#define HARDWARE(S, D) \
    F16C static void hardware_##S##_##D(const void *src, void *dst, Py_ssize_t n) { \
        const char *in = src; char *out = dst; Py_ssize_t i = 0; \
        for (; i + 8 <= n; i += 8) { \
            const char *at = in + i * sizeof(S##_t); char *to = out + i * sizeof(D##_t); \
            __m256 x = load_##S(at); \
            store_##D(to, x); \
            if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) portable_##S##_##D(at, to, 8); \
        } \
        portable_##S##_##D(in + i * sizeof(S##_t), out + i * sizeof(D##_t), n - i); \
    }
HARDWARE(bf16, f16)
HARDWARE(f16, bf16)
HARDWARE(f32, f16)
HARDWARE(f16, f32)
HARDWARE(f32, bf16)
HARDWARE(bf16, f32)
#define HARDWARE_OR(S, D) (loop)hardware_##S##_##D
static int has_f16c(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }
#else
#define HARDWARE_OR(S, D) NULL
static int has_f16c(void) { return 0; }
#endif

static const struct {
    const char *source, *target;
    int in, out;
    loop portable, hardware;
} LOOPS[] = {
    {"BF16", "F16", 2, 2, portable_bf16_f16, HARDWARE_OR(bf16, f16)},
    {"F16", "BF16", 2, 2, portable_f16_bf16, HARDWARE_OR(f16, bf16)},
    {"F32", "F16", 4, 2, portable_f32_f16, HARDWARE_OR(f32, f16)},
    {"F16", "F32", 2, 4, portable_f16_f32, HARDWARE_OR(f16, f32)},
    {"F32", "BF16", 4, 2, portable_f32_bf16, HARDWARE_OR(f32, bf16)},
    {"BF16", "F32", 2, 4, portable_bf16_f32, HARDWARE_OR(bf16, f32)},
};

static PyObject *cast(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"src", "dst", "source", "target", "portable", NULL};
    Py_buffer src, dst;
    const char *source, *target;
    int portable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*w*ss|p", names, &src, &dst, &source, &target, &portable))
        return NULL;
    PyObject *result = NULL;
    size_t k = 0;
    while (k < sizeof LOOPS / sizeof *LOOPS && (strcmp(LOOPS[k].source, source) || strcmp(LOOPS[k].target, target)))
        k++;
    if (k == sizeof LOOPS / sizeof *LOOPS) {
        PyErr_Format(PyExc_ValueError, "no cast from %s to %s", source, target);
    } else if (src.len % LOOPS[k].in || dst.len != src.len / LOOPS[k].in * LOOPS[k].out) {
        PyErr_Format(PyExc_ValueError, "%zd bytes of %s do not fill %zd bytes of %s", src.len, source, dst.len, target);
    } else {
        loop run = LOOPS[k].hardware && !portable && has_f16c() ? LOOPS[k].hardware : LOOPS[k].portable;
        Py_BEGIN_ALLOW_THREADS
        run(src.buf, dst.buf, src.len / LOOPS[k].in);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *pairs(PyObject *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    for (size_t k = 0; out && k < sizeof LOOPS / sizeof *LOOPS; k++) {
        PyObject *pair = Py_BuildValue("(ss)", LOOPS[k].source, LOOPS[k].target);
        if (!pair || PyList_Append(out, pair)) Py_CLEAR(out);
        Py_XDECREF(pair);
    }
    return out;
}

static PyMethodDef METHODS[] = {
    {"cast", (PyCFunction)(void (*)(void))cast, METH_VARARGS | METH_KEYWORDS,
     "cast(src, dst, source, target, portable=False): dst = src's elements cast (dtype codes F32/F16/BF16)."},
    {"pairs", pairs, METH_NOARGS, "The (source, target) dtype codes cast() converts."},
    {NULL},
};
static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_floatcast", "Bit-exact float casts in C.", -1, METHODS};
PyMODINIT_FUNC PyInit__floatcast(void) { return PyModule_Create(&MODULE); }
