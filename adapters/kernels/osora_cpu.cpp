// The OSoRA update of one fused group (adapters/fused.py) in one pass, on the CPU:
//
//   y[m, s_j:e_j] += U_j (c ⊙ z_j) + o ⊙ U_j (a ⊙ z_j)        for every member j of the group
//
// where z_j[i] = z[m, i·n + j] (component-major), c = ca[row, 0, ·], a = ca[row, 1, ·], o = o[row, ·], and
// U_j's i-th column is u[i·n + j, s_j:e_j]. The torch composition of the same formula is five operators per
// group (scale, a matmul over the block-diagonal Ublkᵀ — 2/3 of it zeros for q/k/v —, add, addcmul) and three
// rounded intermediates; here each member's columns are cut into panels of 128, the panels are split over
// ATen's thread pool, and a thread runs every block of four rows through its panel: the panel's rows of U stay
// in L1, each i-th row of U feeds four rows' multiply-adds, both products accumulate in float32 for a tile
// of 32 output columns, and y is rounded once. Only U_j's own block is read, never Ublkᵀ's zeros. A row's
// result never depends on the other rows (a request gets the same numbers in a mixed batch as alone), nor on
// which rows share its block: every row runs the same sequence of float operations.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <array>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Measured on a 2-core AVX-512 Xeon over 30 layers' groups in bfloat16: 4 rows × 2 vectors (16 accumulators)
// beat 6 × 2, 8 × 1 and 3 × 4 (4.3 ms against 4.6, 6.2 and 6.2 ms a step).
constexpr int VEC = 2;                  // 16-float vectors per tile
constexpr int64_t TILE = 16 * VEC;      // output columns per tile
constexpr int RB = 4;                   // rows per block
constexpr int64_t PANEL = 128;          // columns per work item

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
    int64_t ldy, ldz, ldo, ldu, ldc, lda, n, r, rn;  // ldc: ca's row stride; lda: from c to a in a row
};

// rows m[0..NR) (their coefficient rows crow[·]) for member j, columns [s, e)
// rows m[0..NR) (coefficients cz/az: [row][r], their o rows orow[·]) for member j, columns [s, e)
template <typename T, int NR>
void block(const Args<T>& A, const int64_t* m, const T* const* orow, int64_t j, int64_t s, int64_t e,
           const float* const* cz, const float* const* az) {
    const int64_t n = A.n, r = A.r;
    int64_t t0 = s;
#if defined(__AVX512F__)
    for (; t0 + TILE <= e; t0 += TILE) {
        __m512 acc_c[NR][VEC], acc_a[NR][VEC];
        for (int q = 0; q < NR; ++q)
            for (int h = 0; h < VEC; ++h) acc_c[q][h] = acc_a[q][h] = _mm512_setzero_ps();
        for (int64_t i = 0; i < r; ++i) {
            const T* ur = A.u + (i * n + j) * A.ldu + t0;
            __m512 uv[VEC];
            for (int h = 0; h < VEC; ++h) uv[h] = load16(ur + 16 * h);
            for (int q = 0; q < NR; ++q) {
                const __m512 bc = _mm512_set1_ps(cz[q][i]), ba = _mm512_set1_ps(az[q][i]);
                for (int h = 0; h < VEC; ++h) {
                    acc_c[q][h] = _mm512_fmadd_ps(bc, uv[h], acc_c[q][h]);
                    acc_a[q][h] = _mm512_fmadd_ps(ba, uv[h], acc_a[q][h]);
                }
            }
        }
        for (int q = 0; q < NR; ++q) {
            T* yr = A.y + m[q] * A.ldy + t0;
            const T* orw = orow[q] + t0;
            for (int h = 0; h < VEC; ++h) {
                __m512 v = _mm512_add_ps(load16(yr + 16 * h), acc_c[q][h]);
                store16(yr + 16 * h, _mm512_fmadd_ps(load16(orw + 16 * h), acc_a[q][h], v));
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
            from_f(to_f(*yp) + qc + to_f(orow[q][t0]) * qa, yp);
        }
    }
}

// block<T, nr> for the nr ≤ NR rows left
template <typename T, int NR>
inline void dispatch(int nr, const Args<T>& A, const int64_t* m, const T* const* orow, int64_t j, int64_t s,
                     int64_t e, const float* const* cz, const float* const* az) {
    if (nr == NR) {
        block<T, NR>(A, m, orow, j, s, e, cz, az);
    } else if constexpr (NR > 1) {
        dispatch<T, NR - 1>(nr, A, m, orow, j, s, e, cz, az);
    }
}

template <typename T>
void apply(torch::Tensor& e, int64_t D, const torch::Tensor& ca, const torch::Tensor& o, const torch::Tensor& u,
           const torch::Tensor& rows, int64_t n, int64_t r, const std::vector<int64_t>& sizes) {
    const int64_t W = e.size(-1), M = e.numel() / W, T_per = e.size(0) ? M / e.size(0) : 1, rn = n * r;
    T* ep = e.data_ptr<T>();
    Args<T> A{ep, ep + D, ca.data_ptr<T>(), o.data_ptr<T>(), u.data_ptr<T>(), W, W, o.stride(0), u.stride(0),
              ca.stride(0), ca.stride(1), n, r, rn};
    const int64_t* rp = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
    // every row's coefficients c·z and a·z, member by member ([m][j][i]), and its o row
    std::vector<float> cz(M * rn), az(M * rn);
    std::vector<const T*> orow(M);
    for (int64_t m = 0; m < M; ++m) {
        const int64_t row = rp ? rp[m / T_per] : m / T_per;
        const T* zr = A.z + m * A.ldz;
        const T* c = A.ca + row * A.ldc;
        const T* a = c + A.lda;
        orow[m] = A.o + row * A.ldo;
        for (int64_t j = 0; j < n; ++j)
            for (int64_t i = 0; i < r; ++i) {
                const float zi = to_f(zr[i * n + j]);
                cz[(m * n + j) * r + i] = zi * to_f(c[i * n + j]);
                az[(m * n + j) * r + i] = zi * to_f(a[i * n + j]);
            }
    }
    // work items: panels of PANEL columns of one member. A thread takes whole panels, and runs every row
    // block through a panel: the panel's rows of U (r · PANEL values) stay in L1 for all rows, and each row
    // reads its y and o over the panel as one contiguous run.
    std::vector<std::array<int64_t, 3>> items;  // (member, first column, end column)
    for (int64_t j = 0, s = 0; j < n; s += sizes[j], ++j)
        for (int64_t t = s; t < s + sizes[j]; t += PANEL) items.push_back({j, t, std::min(t + PANEL, s + sizes[j])});
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
        for (int64_t it = i0; it < i1; ++it) {
            const auto [j, s, e] = items[it];
            for (int64_t b = 0; b < M; b += RB) {
                const int nr = static_cast<int>(std::min<int64_t>(RB, M - b));
                int64_t m[RB];
                const T* orw[RB];
                const float* czr[RB];
                const float* azr[RB];
                for (int q = 0; q < nr; ++q) {
                    m[q] = b + q;
                    orw[q] = orow[b + q];
                    czr[q] = cz.data() + ((b + q) * n + j) * r;
                    azr[q] = az.data() + ((b + q) * n + j) * r;
                }
#if defined(__AVX512F__)
                // o is the adapters' own data, cold in a decode step: ask for the next block's run of it now
                for (int64_t q = b + RB; q < std::min<int64_t>(b + 2 * RB, M); ++q)
                    for (const char* p = reinterpret_cast<const char*>(orow[q] + s);
                         p < reinterpret_cast<const char*>(orow[q] + e); p += 64)
                        _mm_prefetch(p, _MM_HINT_T0);
#endif
                dispatch<T, RB>(nr, A, m, orw, j, s, e, czr, azr);
            }
        }
    });
}

}  // namespace

// e [B, (T,) W]: the fused matmul's output, contiguous; its first D columns are y (updated in place), the
// next n·r are z. ca [rows, 2, ≥ n·r] (c then a; only the innermost dimension contiguous: the model passes
// its group's columns of the whole slot table); o [rows, D] (rows strided); u [≥ n·r, D] (Ublkᵀ); rows: [B]
// long, which ca/o row each of e's B leading rows reads (the rows' slots, built by the runtime, in range), or
// None (row b reads row b). The T tokens of a leading row share its coefficients. r ≤ 64.
void osora_apply(torch::Tensor e, int64_t D, torch::Tensor ca, torch::Tensor o, torch::Tensor u,
                 c10::optional<torch::Tensor> rows, int64_t n, int64_t r, std::vector<int64_t> sizes) {
    TORCH_CHECK(e.device().is_cpu() && e.dim() >= 2 && e.is_contiguous() && ca.dim() == 3 && o.dim() == 2 &&
                u.dim() == 2, "osora_apply: CPU tensors of the documented ranks, e contiguous");
    TORCH_CHECK(o.stride(1) == 1 && u.stride(1) == 1 && ca.stride(2) == 1, "osora_apply: inner dimensions must be contiguous");
    const auto dt = e.scalar_type();
    TORCH_CHECK(ca.scalar_type() == dt && o.scalar_type() == dt && u.scalar_type() == dt, "osora_apply: one dtype");
    TORCH_CHECK(r >= 1 && r <= 64 && n >= 1 && static_cast<int64_t>(sizes.size()) == n, "osora_apply: bad n, r or sizes");
    int64_t sum = 0;
    for (auto d : sizes) sum += d;
    TORCH_CHECK(sum == D && D + n * r <= e.size(-1) && ca.size(1) == 2 && ca.size(2) >= n * r &&
                u.size(0) >= n * r && u.size(1) == D && o.size(1) == D && o.size(0) == ca.size(0),
                "osora_apply: shapes do not match");
    torch::Tensor idx = rows.has_value() ? rows->contiguous() : torch::Tensor();
    if (idx.defined()) {
        TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.numel() == e.size(0), "osora_apply: bad rows");
    } else {
        TORCH_CHECK(e.size(0) <= ca.size(0), "osora_apply: fewer coefficient rows than rows");
    }
    if (dt == torch::kFloat) {
        apply<float>(e, D, ca, o, u, idx, n, r, sizes);
    } else if (dt == torch::kBFloat16) {
        apply<c10::BFloat16>(e, D, ca, o, u, idx, n, r, sizes);
    } else {
        TORCH_CHECK(false, "osora_apply: float32 or bfloat16 only");
    }
}

// Whether the tiles run on AVX-512. Without it every column takes the scalar loop, slower than the torch
// composition, so the loader serves with that instead.
bool vectorized() {
#if defined(__AVX512F__)
    return true;
#else
    return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("osora_apply", &osora_apply, "OSoRA update of one fused group, in place (CPU)");
    m.def("vectorized", &vectorized, "whether the build has the AVX-512 tiles");
}
