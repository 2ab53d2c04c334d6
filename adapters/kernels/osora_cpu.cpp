// The OSoRA update of one fused group (adapters/fused.py) in one pass, on the CPU:
//
//   y[m, s_j:e_j] += U_j (c ⊙ z_j) + o ⊙ U_j (a ⊙ z_j)        for every member j of the group
//
// where z_j[i] = z[m, i·n + j] (component-major), c = ca[row, 0, ·], a = ca[row, 1, ·], o = o[row, ·], and
// U_j's i-th column is u[i·n + j, s_j:e_j]. The torch composition of the same formula is five operators per
// group (scale, a matmul over the block-diagonal Ublkᵀ — 2/3 of it zeros for q/k/v —, add, addcmul) and three
// rounded intermediates; here the rows are taken four at a time, each i-th row of U_j is read once per block
// of rows, both products accumulate in float32 for a tile of 32 output columns, and y is rounded once.
// Row blocks are split over ATen's thread pool. A row's result never depends on the other rows (a request
// gets the same numbers in a mixed batch as alone), nor on which rows share its block: every row runs the
// same sequence of float operations.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 32;  // output columns per tile: two 16-float vectors
constexpr int RB = 4;         // rows per block

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) {
    uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
inline void from_f(float f, float* out) { *out = f; }
inline void from_f(float f, c10::BFloat16* out) { *out = c10::BFloat16(f); }  // round to nearest even

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
#if defined(__AVX512BF16__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
    alignas(64) float f[16];
    _mm512_store_ps(f, v);
    for (int t = 0; t < 16; ++t) p[t] = c10::BFloat16(f[t]);
#endif
}
#endif

template <typename T>
struct Args {
    T* y; const T* z; const T* ca; const T* o; const T* u;
    int64_t ldy, ldz, ldo, ldu, n, r, rn;
};

// rows m[0..NR) (their coefficient rows crow[·]) for member j, columns [s, e)
template <typename T, int NR>
void block(const Args<T>& A, const int64_t* m, const int64_t* crow, int64_t j, int64_t s, int64_t e,
           float (*cz)[64], float (*az)[64]) {
    const int64_t n = A.n, r = A.r;
    for (int q = 0; q < NR; ++q) {
        const T* zr = A.z + m[q] * A.ldz;
        const T* c = A.ca + crow[q] * 2 * A.rn;
        const T* a = c + A.rn;
        for (int64_t i = 0; i < r; ++i) {
            const float zi = to_f(zr[i * n + j]);
            cz[q][i] = zi * to_f(c[i * n + j]);
            az[q][i] = zi * to_f(a[i * n + j]);
        }
    }
    int64_t t0 = s;
#if defined(__AVX512F__)
    // o is the adapters' own data, cold in a decode step (each row its own 1-6 KB, pages apart): ask for the
    // block's lines now, they are first read after the first tile's multiply-adds
    for (int q = 0; q < NR; ++q) {
        const char* p = reinterpret_cast<const char*>(A.o + crow[q] * A.ldo + s);
        const char* end = reinterpret_cast<const char*>(A.o + crow[q] * A.ldo + e);
        for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T0);
    }
    for (; t0 + TILE <= e; t0 += TILE) {
        __m512 acc_c[NR][2], acc_a[NR][2];
        for (int q = 0; q < NR; ++q)
            acc_c[q][0] = acc_c[q][1] = acc_a[q][0] = acc_a[q][1] = _mm512_setzero_ps();
        for (int64_t i = 0; i < r; ++i) {
            const T* ur = A.u + (i * n + j) * A.ldu + t0;
            const __m512 u0 = load16(ur), u1 = load16(ur + 16);
            for (int q = 0; q < NR; ++q) {
                const __m512 bc = _mm512_set1_ps(cz[q][i]), ba = _mm512_set1_ps(az[q][i]);
                acc_c[q][0] = _mm512_fmadd_ps(bc, u0, acc_c[q][0]);
                acc_c[q][1] = _mm512_fmadd_ps(bc, u1, acc_c[q][1]);
                acc_a[q][0] = _mm512_fmadd_ps(ba, u0, acc_a[q][0]);
                acc_a[q][1] = _mm512_fmadd_ps(ba, u1, acc_a[q][1]);
            }
        }
        for (int q = 0; q < NR; ++q) {
            T* yr = A.y + m[q] * A.ldy + t0;
            const T* orow = A.o + crow[q] * A.ldo + t0;
            for (int h = 0; h < 2; ++h) {
                __m512 v = _mm512_add_ps(load16(yr + 16 * h), acc_c[q][h]);
                store16(yr + 16 * h, _mm512_fmadd_ps(load16(orow + 16 * h), acc_a[q][h], v));
            }
        }
    }
#endif
    for (; t0 < e; ++t0) {  // columns left over (or every column without AVX-512)
        for (int q = 0; q < NR; ++q) {
            float qc = 0.f, qa = 0.f;
            for (int64_t i = 0; i < r; ++i) {
                const float f = to_f(A.u[(i * n + j) * A.ldu + t0]);
                qc += cz[q][i] * f;
                qa += az[q][i] * f;
            }
            T* yp = A.y + m[q] * A.ldy + t0;
            from_f(to_f(*yp) + qc + to_f(A.o[crow[q] * A.ldo + t0]) * qa, yp);
        }
    }
}

template <typename T>
void apply(torch::Tensor& y, const torch::Tensor& z, const torch::Tensor& ca, const torch::Tensor& o,
           const torch::Tensor& u, const torch::Tensor& rows, int64_t n, int64_t r, int64_t T_per,
           const std::vector<int64_t>& sizes) {
    Args<T> A{y.data_ptr<T>(), z.data_ptr<T>(), ca.data_ptr<T>(), o.data_ptr<T>(), u.data_ptr<T>(),
              y.stride(0), z.stride(0), o.stride(0), u.stride(0), n, r, n * r};
    const int64_t M = y.size(0);
    const int64_t* rp = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
    std::vector<int64_t> starts(n + 1, 0);
    for (int64_t j = 0; j < n; ++j) starts[j + 1] = starts[j] + sizes[j];
    const int64_t blocks = (M + RB - 1) / RB;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        float cz[RB][64], az[RB][64];
        for (int64_t b = b0; b < b1; ++b) {
            int64_t m[RB], crow[RB];
            const int nr = static_cast<int>(std::min<int64_t>(RB, M - b * RB));
            for (int q = 0; q < nr; ++q) {
                m[q] = b * RB + q;
                crow[q] = rp ? rp[m[q] / T_per] : m[q] / T_per;
            }
            for (int64_t j = 0; j < n; ++j) {
                const int64_t s = starts[j], e = starts[j + 1];
                switch (nr) {
                    case 4: block<T, 4>(A, m, crow, j, s, e, cz, az); break;
                    case 3: block<T, 3>(A, m, crow, j, s, e, cz, az); break;
                    case 2: block<T, 2>(A, m, crow, j, s, e, cz, az); break;
                    default: block<T, 1>(A, m, crow, j, s, e, cz, az); break;
                }
            }
        }
    });
}

}  // namespace

// y [M, D] (rows strided, columns contiguous) is updated in place. z [M, ≥ n·r]; ca [rows, 2, n·r] contiguous;
// o [rows, D]; u [≥ n·r, D] (Ublkᵀ); rows: [M / T_per] long, which ca/o row each leading-dim row reads (checked
// by the caller), or None (row m reads row m / T_per). r ≤ 64.
void osora_apply(torch::Tensor y, torch::Tensor z, torch::Tensor ca, torch::Tensor o, torch::Tensor u,
                 c10::optional<torch::Tensor> rows, int64_t n, int64_t r, int64_t T_per, std::vector<int64_t> sizes) {
    TORCH_CHECK(y.device().is_cpu() && y.dim() == 2 && z.dim() == 2 && ca.dim() == 3 && o.dim() == 2 && u.dim() == 2,
                "osora_apply: CPU tensors of the documented ranks");
    TORCH_CHECK(y.stride(1) == 1 && z.stride(1) == 1 && o.stride(1) == 1 && u.stride(1) == 1 && ca.is_contiguous(),
                "osora_apply: inner dimensions must be contiguous");
    const auto dt = y.scalar_type();
    TORCH_CHECK(z.scalar_type() == dt && ca.scalar_type() == dt && o.scalar_type() == dt && u.scalar_type() == dt,
                "osora_apply: one dtype");
    TORCH_CHECK(r >= 1 && r <= 64 && n >= 1 && T_per >= 1 && static_cast<int64_t>(sizes.size()) == n,
                "osora_apply: bad n, r or sizes");
    int64_t D = 0;
    for (auto d : sizes) D += d;
    TORCH_CHECK(D == y.size(1) && ca.size(1) == 2 && ca.size(2) == n * r && z.size(1) >= n * r &&
                u.size(0) >= n * r && u.size(1) == D && o.size(1) == D && z.size(0) == y.size(0) &&
                o.size(0) == ca.size(0), "osora_apply: shapes do not match");
    torch::Tensor idx = rows.has_value() ? rows->contiguous() : torch::Tensor();
    if (idx.defined()) {
        TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.numel() * T_per == y.size(0), "osora_apply: bad rows");
    } else {
        TORCH_CHECK(y.size(0) <= ca.size(0) * T_per, "osora_apply: fewer coefficient rows than rows");
    }
    if (dt == torch::kFloat) {
        apply<float>(y, z, ca, o, u, idx, n, r, T_per, sizes);
    } else if (dt == torch::kBFloat16) {
        apply<c10::BFloat16>(y, z, ca, o, u, idx, n, r, T_per, sizes);
    } else {
        TORCH_CHECK(false, "osora_apply: float32 or bfloat16 only");
    }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("osora_apply", &osora_apply, "OSoRA update of one fused group, in place (CPU)");
}
