/* zoengine native CPU kernels: the noise contract (Philox4x32-10 + word -> float maps) fused
 * with the in-place ZO ops perturb_ and restore_update_.  Plain C11, no torch headers; built on
 * first use by kernels/native_ops.py and called through ctypes on tensor data pointers.
 *
 * Rounding follows kernels/reference.py exactly: fp32 arithmetic, every operation rounded on its
 * own (the build passes -ffp-contract=off, so no fused multiply-add), one rounding to the
 * parameter dtype on store (round to nearest even for fp16/bf16).  Philox words and the uniform
 * and Rademacher maps are integer-exact, so those values are bit-identical to the oracle; the
 * normal map calls logf/sinf/cosf, which the build vectorises through glibc's libmvec
 * (declare simd prototypes below), so normals agree with the oracle to a few ulp.
 *
 * Work is split into units of UNIT_ELEMS elements of one tensor; threads take units from a
 * shared counter.  Every element's result depends only on its own inputs, so the output does not
 * depend on the thread count or on which thread ran which unit.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef ZO_NO_MVEC
/* Vector variants live in libmvec (_ZGV?N?v_logf, ...); the pragma lets the loop vectoriser
 * call them.  glibc's own math.h only declares them under -ffast-math, which we must not use. */
#pragma omp declare simd notinbranch
extern float logf(float);
#pragma omp declare simd notinbranch
extern float sinf(float);
#pragma omp declare simd notinbranch
extern float cosf(float);
#else
extern float logf(float);
extern float sinf(float);
extern float cosf(float);
#endif

#define ZO_ABI_VERSION 1

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

#define TILE_BLOCKS 256       /* 1,024 elements per tile: z, x and the mask stay in L1 */
#define TILE_ELEMS (4 * TILE_BLOCKS)
#define UNIT_ELEMS (1 << 15)  /* 32,768 elements per work unit: ~100 us, fine-grained enough */

static const float TWO_PI_F32 = 0x1.921fb6p+2f; /* float(2*pi), as kernels/philox.py */
static const float SQRT3_F32 = 0x1.bb67aep+0f;  /* float(sqrt(3)) */

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { MK_NONE = 0, MK_U8 = 1, MK_F32 = 2 };
enum { D_NORMAL = 0, D_UNIFORM = 1, D_RADEMACHER = 2 };

typedef struct {
    void *data;         /* contiguous parameter storage */
    const void *mask;   /* NULL, or numel mask values (uint8 or fp32) */
    int64_t numel;
    uint32_t key;       /* tensor key: Philox counter word 2 */
    int32_t dtype;      /* DT_* */
    int32_t mask_type;  /* MK_* */
    int32_t reserved;
} zo_tensor;

int zo_abi_version(void) { return ZO_ABI_VERSION; }

/* ---- dtype conversions (bit manipulation, no dependence on compiler _Float16 support) ---- */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10::BFloat16 */
    u += 0x7fffu + ((u >> 16) & 1u);                     /* round half to even */
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return u2f(sign | 0x7f800000u | (man << 13));
    if (exp == 0) return u2f(f2u((float)man * 0x1p-24f) | sign); /* zero or subnormal: exact */
    return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;          /* NaN */
    if (a >= 0x47800000u) return sign | 0x7c00u;         /* >= 65536 (and inf): infinity */
    if (a < 0x38800000u) {                               /* below 2**-14: fp16 subnormal or 0 */
        /* adding 0.5 puts the fp16 subnormal grid (2**-24) at fp32's ulp of [0.5, 1), so the
         * fp32 addition itself rounds to nearest even; the low mantissa bits are the result */
        float t = u2f(a) + 0.5f;
        return sign | (uint16_t)(f2u(t) - 0x3f000000u);
    }
    /* normal: rebias the exponent, round the 13 dropped bits to nearest even; a carry out of
     * the mantissa bumps the exponent, and one past 65504 becomes infinity (0x7c00) */
    uint32_t odd = (a >> 13) & 1u;
    a += 0xc8000fffu + odd; /* (15 - 127) << 23 wraps to 0xc8000000 */
    return sign | (uint16_t)(a >> 13);
}

/* ---- the noise contract ---------------------------------------------------------------- */

#if defined(__AVX2__)
#include <immintrin.h>
/* 8 lanes of (hi, lo) = a * m in 32-bit lanes: vpmuludq on the even and the odd lanes, then
 * blends. GCC's auto-vectorised uint64 multiply widens to 4 lanes and repacks every round,
 * which made Philox the bottleneck: uniform values went from 394 to 941 M/s per CPU-second
 * (normals 294 -> 530 M/s) with this path. */
static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(a, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

static int philox_tile8(uint32_t *restrict w0, uint32_t *restrict w1, uint32_t *restrict w2,
                        uint32_t *restrict w3, uint32_t lo, uint32_t hi, uint32_t c2in,
                        uint32_t k0, uint32_t k1, int nb) {
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int i = 0;
    for (; i + 8 <= nb; i += 8) {
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(lo + (uint32_t)i)), step);
        __m256i c1 = _mm256_set1_epi32((int)hi), c2 = _mm256_set1_epi32((int)c2in);
        __m256i c3 = _mm256_setzero_si256();
        uint32_t ka = k0, kb = k1;
        for (int r = 0; r < 10; r++) {
            __m256i hi0, lo0, hi1, lo1;
            mulhilo8(c0, m0, &hi0, &lo0);
            mulhilo8(c2, m1, &hi1, &lo1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)ka));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)kb));
            c1 = lo1;
            c3 = lo0;
            ka += PHILOX_W0;
            kb += PHILOX_W1;
        }
        _mm256_storeu_si256((__m256i *)(w0 + i), c0);
        _mm256_storeu_si256((__m256i *)(w1 + i), c1);
        _mm256_storeu_si256((__m256i *)(w2 + i), c2);
        _mm256_storeu_si256((__m256i *)(w3 + i), c3);
    }
    return i;
}
#endif

/* Philox4x32-10 of counters (lo + i, hi, c2, 0), i < nb; caller guarantees lo + nb <= 2**32. */
static void philox_tile(uint32_t *restrict w0, uint32_t *restrict w1, uint32_t *restrict w2,
                        uint32_t *restrict w3, uint32_t lo, uint32_t hi, uint32_t c2in,
                        uint32_t k0, uint32_t k1, int nb) {
    int i0 = 0;
#if defined(__AVX2__)
    i0 = philox_tile8(w0, w1, w2, w3, lo, hi, c2in, k0, k1, nb);
#endif
    for (int i = i0; i < nb; i++) {
        uint32_t c0 = lo + (uint32_t)i, c1 = hi, c2 = c2in, c3 = 0, ka = k0, kb = k1;
#pragma GCC unroll 10
        for (int r = 0; r < 10; r++) {
            uint64_t p0 = (uint64_t)c0 * PHILOX_M0, p1 = (uint64_t)c2 * PHILOX_M1;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ ka;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ kb;
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
            ka += PHILOX_W0;
            kb += PHILOX_W1;
        }
        w0[i] = c0; w1[i] = c1; w2[i] = c2; w3[i] = c3;
    }
}

/* ((w >> 8) * 2 + 1) * 2**-25: an exact fp32 value in (0, 1) (the int is < 2**25) */
static inline float open_unit(uint32_t w) { return (float)(int32_t)(((w >> 8) << 1) | 1u) * 0x1p-25f; }

/* z[0 .. 4*nb) = noise of Philox blocks [b, b + nb) of one stream; z[4i + lane] = element 4(b+i) + lane */
static void noise_tile(float *restrict z, uint64_t b, int nb, uint32_t tkey, uint64_t key64, int dist) {
    uint32_t w0[TILE_BLOCKS], w1[TILE_BLOCKS], w2[TILE_BLOCKS], w3[TILE_BLOCKS];
    /* A short last tile is computed to a multiple of 16 blocks (z has room for a whole tile):
     * the loops below then run only their vector iterations, so element i gets the same
     * libmvec rounding whatever the tensor's size (a scalar epilogue's logf/cosf differ by
     * 1 ulp; tests/test_large_index.py). */
    nb = (nb + 15) & ~15;
    if (nb > TILE_BLOCKS) nb = TILE_BLOCKS;
    philox_tile(w0, w1, w2, w3, (uint32_t)b, (uint32_t)(b >> 32), tkey, (uint32_t)key64,
                (uint32_t)(key64 >> 32), nb);
    if (dist == D_NORMAL) {
        float r0[TILE_BLOCKS], t0[TILE_BLOCKS], r1[TILE_BLOCKS], t1[TILE_BLOCKS];
        float c0[TILE_BLOCKS], s0[TILE_BLOCKS], c1[TILE_BLOCKS], s1[TILE_BLOCKS];
        /* Box-Muller on (w0, w1) and (w2, w3): r = sqrt(log(u) * -2), t = u' * float(2 pi).
         * cos and sin run in separate loops: in one loop GCC merges them into a scalar sincosf
         * call, which blocks vectorisation. */
        for (int i = 0; i < nb; i++) {
            r0[i] = __builtin_sqrtf(logf(open_unit(w0[i])) * -2.0f);
            t0[i] = open_unit(w1[i]) * TWO_PI_F32;
            r1[i] = __builtin_sqrtf(logf(open_unit(w2[i])) * -2.0f);
            t1[i] = open_unit(w3[i]) * TWO_PI_F32;
        }
        for (int i = 0; i < nb; i++) {
            c0[i] = r0[i] * cosf(t0[i]);
            c1[i] = r1[i] * cosf(t1[i]);
        }
        for (int i = 0; i < nb; i++) {
            s0[i] = r0[i] * sinf(t0[i]);
            s1[i] = r1[i] * sinf(t1[i]);
        }
        for (int i = 0; i < nb; i++) {
            z[4 * i] = c0[i]; z[4 * i + 1] = s0[i]; z[4 * i + 2] = c1[i]; z[4 * i + 3] = s1[i];
        }
    } else if (dist == D_UNIFORM) {
        /* ((w >> 8) * 2 + 1 - 2**24) * 2**-24 is exact; one rounding by the sqrt(3) multiply */
#define ZO_UNI(w) ((float)((int32_t)(((w) >> 8) << 1) + 1 - (1 << 24)) * 0x1p-24f * SQRT3_F32)
        for (int i = 0; i < nb; i++) {
            z[4 * i] = ZO_UNI(w0[i]); z[4 * i + 1] = ZO_UNI(w1[i]);
            z[4 * i + 2] = ZO_UNI(w2[i]); z[4 * i + 3] = ZO_UNI(w3[i]);
        }
#undef ZO_UNI
    } else {
#define ZO_RAD(w) ((float)(1 - 2 * (int32_t)((w) >> 31)))
        for (int i = 0; i < nb; i++) {
            z[4 * i] = ZO_RAD(w0[i]); z[4 * i + 1] = ZO_RAD(w1[i]);
            z[4 * i + 2] = ZO_RAD(w2[i]); z[4 * i + 3] = ZO_RAD(w3[i]);
        }
#undef ZO_RAD
    }
}

/* ---- element tiles -------------------------------------------------------------------- */

static void load_x(float *restrict xf, const void *data, int64_t off, int n, int dt) {
    if (dt == DT_F16) {
        const uint16_t *p = (const uint16_t *)data + off;
        for (int j = 0; j < n; j++) xf[j] = f16_to_f32(p[j]);
    } else {
        const uint16_t *p = (const uint16_t *)data + off;
        for (int j = 0; j < n; j++) xf[j] = bf16_to_f32(p[j]);
    }
}

static void store_x(void *data, const float *restrict xf, int64_t off, int n, int dt) {
    uint16_t *p = (uint16_t *)data + off;
    if (dt == DT_F16) {
        for (int j = 0; j < n; j++) p[j] = f32_to_f16(xf[j]);
    } else {
        for (int j = 0; j < n; j++) p[j] = f32_to_bf16(xf[j]);
    }
}

static void apply_mask(float *restrict v, const zo_tensor *t, int64_t off, int n) {
    if (t->mask_type == MK_U8) {
        const uint8_t *m = (const uint8_t *)t->mask + off;
        for (int j = 0; j < n; j++) v[j] = v[j] * (float)m[j];
    } else if (t->mask_type == MK_F32) {
        const float *m = (const float *)t->mask + off;
        for (int j = 0; j < n; j++) v[j] = v[j] * m[j];
    }
}

typedef struct {
    int kind; /* 0 perturb, 1 restore_update */
    int dist;
    int n_samples, restore;
    int has_wd;
    float scale, eps, lr, wd;
    const uint64_t *key64s; /* perturb: key64s[0] */
    const float *grads;
} op_args;

/* one tile: elements [pos, pos + n) of tensor t, whose z starts at zoff in the tile buffers */
static void perturb_tile(const zo_tensor *t, const op_args *a, int64_t pos, int n, float *z) {
    apply_mask(z, t, pos, n);
    const float scale = a->scale;
    if (t->dtype == DT_F32) {
        float *restrict x = (float *)t->data + pos;
        for (int j = 0; j < n; j++) x[j] = x[j] + z[j] * scale;
    } else {
        float xf[TILE_ELEMS];
        load_x(xf, t->data, pos, n, t->dtype);
        for (int j = 0; j < n; j++) xf[j] = xf[j] + z[j] * scale;
        store_x(t->data, xf, pos, n, t->dtype);
    }
}

static void restore_tile(const zo_tensor *t, const op_args *a, int64_t pos, int n,
                         float *restrict zr, float *restrict acc) {
    apply_mask(zr, t, pos, n);
    apply_mask(acc, t, pos, n);
    const float eps = a->eps, lr = a->lr, wd = a->wd;
    float xbuf[TILE_ELEMS];
    float *restrict x = t->dtype == DT_F32 ? (float *)t->data + pos : xbuf;
    if (t->dtype != DT_F32) load_x(xbuf, t->data, pos, n, t->dtype);
    if (a->has_wd) {
        /* the decay term is masked too: a masked element gets no update at all */
        float th[TILE_ELEMS], tw[TILE_ELEMS];
        for (int j = 0; j < n; j++) {
            th[j] = x[j] + zr[j] * eps;
            tw[j] = th[j] * wd;
        }
        apply_mask(tw, t, pos, n);
        for (int j = 0; j < n; j++) x[j] = th[j] - (acc[j] + tw[j]) * lr;
    } else {
        for (int j = 0; j < n; j++) {
            float theta = x[j] + zr[j] * eps;
            x[j] = theta - acc[j] * lr;
        }
    }
    if (t->dtype != DT_F32) store_x(t->data, xbuf, pos, n, t->dtype);
}

/* elements [s, e) of tensor t, tile by tile */
static void run_range(const zo_tensor *t, const op_args *a, int64_t s, int64_t e) {
    float zbuf[TILE_ELEMS], zk[TILE_ELEMS], acc[TILE_ELEMS];
    int64_t pos = s;
    while (pos < e) {
        uint64_t b = (uint64_t)pos >> 2;
        int lead = (int)(pos - (int64_t)(b << 2));
        uint64_t want = (((uint64_t)e - (b << 2)) + 3) >> 2;
        uint64_t room = 0x100000000ull - (b & 0xffffffffull); /* counter word 0 must not wrap */
        int nb = (int)(want < TILE_BLOCKS ? want : TILE_BLOCKS);
        if ((uint64_t)nb > room) nb = (int)room;
        int n = 4 * nb - lead;
        if ((int64_t)n > e - pos) n = (int)(e - pos);
        if (a->kind == 0) {
            noise_tile(zbuf, b, nb, t->key, a->key64s[0], a->dist);
            perturb_tile(t, a, pos, n, zbuf + lead);
        } else {
            const int r = a->restore;
            noise_tile(zbuf, b, nb, t->key, a->key64s[r], a->dist);
            const float *zr = zbuf + lead;
            for (int k = 0; k < a->n_samples; k++) {
                const float *zz = zr;
                if (k != r) {
                    noise_tile(zk, b, nb, t->key, a->key64s[k], a->dist);
                    zz = zk + lead;
                }
                const float g = a->grads[k];
                if (k == 0) {
                    for (int j = 0; j < n; j++) acc[j] = zz[j] * g;
                } else {
                    for (int j = 0; j < n; j++) acc[j] = acc[j] + zz[j] * g;
                }
            }
            restore_tile(t, a, pos, n, zbuf + lead, acc);
        }
        pos += n;
    }
}

/* ---- threading ------------------------------------------------------------------------- */

typedef struct {
    const zo_tensor *ts;
    const int64_t *first_unit; /* first_unit[i]: global index of tensor i's first unit; [n] = total */
    int64_t n_tensors;
    const op_args *args;
    int64_t next; /* shared unit counter */
} job;

static void *worker(void *p) {
    job *jb = (job *)p;
    int64_t ti = 0;
    for (;;) {
        int64_t u = __atomic_fetch_add(&jb->next, 1, __ATOMIC_RELAXED);
        if (u >= jb->first_unit[jb->n_tensors]) break;
        /* units are taken in increasing order, so this thread's cursor only moves forward */
        while (jb->first_unit[ti + 1] <= u) ti++;
        const zo_tensor *t = &jb->ts[ti];
        int64_t s = (u - jb->first_unit[ti]) * (int64_t)UNIT_ELEMS;
        int64_t e = s + UNIT_ELEMS < t->numel ? s + UNIT_ELEMS : t->numel;
        run_range(t, jb->args, s, e);
    }
    return NULL;
}

static int run_job(const zo_tensor *ts, int64_t n_tensors, const op_args *a, int nthreads) {
    int64_t *first = (int64_t *)malloc((size_t)(n_tensors + 1) * sizeof(int64_t));
    if (!first) return -1;
    first[0] = 0;
    for (int64_t i = 0; i < n_tensors; i++)
        first[i + 1] = first[i] + (ts[i].numel + UNIT_ELEMS - 1) / UNIT_ELEMS;
    job jb = {ts, first, n_tensors, a, 0};
    int64_t units = first[n_tensors];
    if (nthreads > units) nthreads = (int)units;
    if (nthreads > 256) nthreads = 256;
    pthread_t tids[256];
    int started = 0;
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&tids[started], NULL, worker, &jb) != 0) break; /* run with fewer */
        started++;
    }
    worker(&jb);
    for (int i = 0; i < started; i++) pthread_join(tids[i], NULL);
    free(first);
    return 0;
}

/* ---- entry points ---------------------------------------------------------------------- */

int zo_perturb(const zo_tensor *ts, int64_t n_tensors, uint64_t key64, int dist, float scale,
               int nthreads) {
    if (dist < 0 || dist > 2) return -2;
    op_args a = {0};
    a.kind = 0; a.dist = dist; a.scale = scale; a.key64s = &key64;
    return run_job(ts, n_tensors, &a, nthreads);
}

int zo_restore_update(const zo_tensor *ts, int64_t n_tensors, const uint64_t *key64s,
                      const float *grads, int n_samples, int restore, float eps, float lr,
                      float wd, int has_wd, int dist, int nthreads) {
    if (dist < 0 || dist > 2) return -2;
    if (n_samples < 1 || restore < 0 || restore >= n_samples) return -3;
    op_args a = {0};
    a.kind = 1; a.dist = dist; a.n_samples = n_samples; a.restore = restore;
    a.eps = eps; a.lr = lr; a.wd = wd; a.has_wd = has_wd; a.key64s = key64s; a.grads = grads;
    return run_job(ts, n_tensors, &a, nthreads);
}

/* noise only, for tests and benchmarks: out[i] = element offset + i of one stream, fp32 */
int zo_noise(float *out, int64_t numel, int64_t offset, uint32_t tkey, uint64_t key64, int dist) {
    if (dist < 0 || dist > 2) return -2;
    float zbuf[TILE_ELEMS];
    int64_t pos = offset, e = offset + numel;
    while (pos < e) {
        uint64_t b = (uint64_t)pos >> 2;
        int lead = (int)(pos - (int64_t)(b << 2));
        uint64_t want = (((uint64_t)e - (b << 2)) + 3) >> 2;
        uint64_t room = 0x100000000ull - (b & 0xffffffffull);
        int nb = (int)(want < TILE_BLOCKS ? want : TILE_BLOCKS);
        if ((uint64_t)nb > room) nb = (int)room;
        int n = 4 * nb - lead;
        if ((int64_t)n > e - pos) n = (int)(e - pos);
        noise_tile(zbuf, b, nb, tkey, key64, dist);
        memcpy(out + (pos - offset), zbuf + lead, (size_t)n * sizeof(float));
        pos += n;
    }
    return 0;
}
