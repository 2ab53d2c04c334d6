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
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define SVDSERVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
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


#if defined(SVDSERVE_AMX)
// ---- bfloat16 on AMX --------------------------------------------------------------------------------------
// Both products are tile matrix multiplies: for a block of 16 rows and 16 output columns of member j,
//   C_c = Z_c · B,  C_a = Z_a · B,   Z_c[m][i] = c_i z_i of row m,  B[i][t] = U_j's column i at output t,
// on the tile unit (TDPBF16PS: bfloat16 pairs, float32 accumulation), 16 components per tile operation. Its
// inputs are bfloat16, but c·z is a float32 (exact: a product of two bfloat16); it is split as hi + lo, two
// bfloat16 (hi = bf16(c·z), lo = bf16(c·z − hi)), and both halves are multiplied, so the product carries 16
// bits of c·z where one bfloat16 would carry 8 — as accurate as the AVX-512 tiles' float32 products, and
// more than the torch composition, which rounds c·z to bfloat16. y += C_c + o ⊙ C_a is then the AVX-512
// epilogue, rounded once. A row's result depends on its own row of Z only (padding rows are zeros): the same
// numbers alone as at any place in a batch.
//
// B is U packed once per model (`osora_pack`): [chunk of 16 components][column tile of 16][8 rows of 32
// bfloat16, component pairs interleaved (the tile unit's layout)], members' tiles one after another. It holds
// only each member's own block of U (no zeros), so it is smaller than Ublkᵀ, and a batch of rank r reads its
// first ⌈r/16⌉ chunks front to back.
constexpr int CH = 16;  // components per tile operation

struct alignas(64) TileConfig {
    uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// tmm0, tmm1: C_c, C_a (16 × 16 float32); tmm2..5: Z_c hi, Z_c lo, Z_a hi, Z_a lo (16 rows × 16 bfloat16);
// tmm6: B (8 rows of 32 bfloat16)
inline void configure() {
    TileConfig cfg;
    cfg.rows[0] = cfg.rows[1] = 16;
    cfg.colsb[0] = cfg.colsb[1] = 64;
    for (int t = 2; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 32;
    cfg.rows[6] = 8;
    cfg.colsb[6] = 64;
    _tile_loadconfig(&cfg);
}

// Linux hands a process the tile registers' state only when asked (once; oneDNN asks too)
bool amx_permitted() {
    static const bool ok = [] {
        constexpr long ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        unsigned long bits = 0;
        if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits) == 0 && (bits & (1UL << XFEATURE_XTILEDATA)))
            return true;
        return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }();
    return ok;
}

inline int64_t tiles_of(int64_t d) { return (d + 15) / 16; }

// A packed B tile is 512 bytes, eight lines. Tile loads do not seem to train the hardware prefetchers, and the
// packed factors are cold in a decode step (the weights streamed through the caches since): ask ahead.
constexpr int64_t AHEAD = 4;  // tiles
inline void prefetch_tile(const uint16_t* p) {
    for (int l = 0; l < 8; ++l) _mm_prefetch(reinterpret_cast<const char*>(p) + 64 * l, _MM_HINT_T0);
}

// Z tiles of the rows of blocks [b0, b1) (rows past M: zeros) for members [j0, j1):
// out[j − j0][b − b0][chunk][c hi, c lo, a hi, a lo][16][16]. z: bfloat16 rows of e (ldz), or, where zf is
// given, the kernel's own float32 z (row m at zf + (m − 16·b0)·ldzf).
void z_tiles(uint16_t* out, const c10::BFloat16* z, int64_t ldz, const float* zf, int64_t ldzf,
             const c10::BFloat16* const* crow, int64_t lda,
             int64_t M, int64_t b0, int64_t b1, int64_t NC, int64_t n, int64_t r, int64_t j0, int64_t j1) {
    constexpr int64_t ZT = 16 * CH;
    const int64_t rn = n * r, NB = b1 - b0;
    for (int64_t m = 16 * b0; m < 16 * b1; ++m) {
        const int64_t b = m / 16 - b0, q = m % 16;
        if (m >= M) {  // padding rows of the last block
            for (int64_t j = j0; j < j1; ++j)
                for (int64_t c = 0; c < NC; ++c)
                    for (int k = 0; k < 4; ++k)
                        std::memset(out + ((((j - j0) * NB + b) * NC + c) * 4 + k) * ZT + q * CH, 0, 2 * CH);
            continue;
        }
        const uint16_t* zr = zf ? nullptr : reinterpret_cast<const uint16_t*>(z + m * ldz);
        const float* zfr = zf ? zf + (m - 16 * b0) * ldzf : nullptr;
        const uint16_t* cr = reinterpret_cast<const uint16_t*>(crow[m]);
        const uint16_t* ar = reinterpret_cast<const uint16_t*>(crow[m] + lda);
        for (int64_t c = 0; c < NC; ++c) {
            // this chunk's components of every member, component-major: [i·n + j], i < 16, zero past r
            const int64_t base = c * CH * n, len = std::min<int64_t>(CH * n, rn - base);
            alignas(64) uint16_t hc[64], lc[64], ha[64], la[64];
            for (int64_t v = 0; v < 4; ++v) {
                const int64_t off = 16 * v, cnt = std::max<int64_t>(0, std::min<int64_t>(16, len - off));
                const __mmask16 k = static_cast<__mmask16>((1u << cnt) - 1u);
                auto widen = [&](const uint16_t* p) {
                    return _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p + base + off)), 16));
                };
                const __m512 zv = zf ? _mm512_maskz_loadu_ps(k, zfr + base + off) : widen(zr), fc = _mm512_mul_ps(zv, widen(cr)), fa = _mm512_mul_ps(zv, widen(ar));
                const __m256i hcv = (__m256i)_mm512_cvtneps_pbh(fc), hav = (__m256i)_mm512_cvtneps_pbh(fa);
                auto back = [](__m256i h) {
                    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                };
                _mm256_store_si256(reinterpret_cast<__m256i*>(hc + off), hcv);
                _mm256_store_si256(reinterpret_cast<__m256i*>(ha + off), hav);
                _mm256_store_si256(reinterpret_cast<__m256i*>(lc + off),
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(fc, back(hcv))));
                _mm256_store_si256(reinterpret_cast<__m256i*>(la + off),
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(fa, back(hav))));
            }
            for (int64_t j = j0; j < j1; ++j) {
                uint16_t* t = out + (((j - j0) * NB + b) * NC + c) * 4 * ZT + q * CH;
                const uint16_t* src[4] = {hc, lc, ha, la};
                if (n <= 4) {  // member j's components i·n + j, i < 16, from the 64 lanes
                    alignas(64) uint16_t idx[32] = {};
                    for (int64_t i = 0; i < CH; ++i) idx[i] = static_cast<uint16_t>(i * n + j);
                    const __m512i iv = _mm512_load_si512(idx);
                    for (int k = 0; k < 4; ++k) {
                        const __m512i lo = _mm512_load_si512(src[k]), hi = _mm512_load_si512(src[k] + 32);
                        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + k * ZT),
                                            _mm512_castsi512_si256(_mm512_permutex2var_epi16(lo, iv, hi)));
                    }
                } else {
                    for (int k = 0; k < 4; ++k)
                        for (int64_t i = 0; i < CH; ++i) t[k * ZT + i] = i * n + j < len ? src[k][i * n + j] : 0;
                }
            }
        }
    }
}

void apply_amx(torch::Tensor& e, int64_t D, const torch::Tensor& ca, const torch::Tensor& o,
               const torch::Tensor& packed, const torch::Tensor& rows, int64_t n, int64_t r,
               const std::vector<int64_t>& sizes, const torch::Tensor& x, const torch::Tensor& packed_v) {
    using T = c10::BFloat16;
    constexpr int64_t ZT = 16 * CH;
    const int64_t W = e.size(-1), M = e.numel() / W, T_per = e.size(0) ? M / e.size(0) : 1;
    const int64_t NB = (M + 15) / 16, NC = (r + CH - 1) / CH, TT = packed.size(1);
    T* y = e.data_ptr<T>();
    const T* z = y + D;
    const T *cap = ca.data_ptr<T>(), *op = o.data_ptr<T>();
    const uint16_t* pk = reinterpret_cast<const uint16_t*>(packed.data_ptr<T>());
    const int64_t ldc = ca.stride(0), lda = ca.stride(1), ldo = o.stride(0);
    const int64_t* rp = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
    // z = Vᵀx here (x given): the tile unit's float32, for rank r the first ⌈n·r/16⌉ tiles of components
    const bool own_z = x.defined();
    const int64_t K = own_z ? x.size(-1) : 0, KS = (K + 15) / 16, NZ = (n * r + 15) / 16;
    const T* xp = own_z ? x.data_ptr<T>() : nullptr;
    const uint16_t* pv = own_z ? reinterpret_cast<const uint16_t*>(packed_v.data_ptr<T>()) : nullptr;
    std::vector<const T*> orow(M), crow(M);
    for (int64_t m = 0; m < M; ++m) {
        const int64_t row = rp ? rp[m / T_per] : m / T_per;
        crow[m] = cap + row * ldc;
        orow[m] = op + row * ldo;
    }
    // work items: panels of PANEL columns of one member (member, first column, end column, its first tile)
    std::vector<std::array<int64_t, 4>> items;
    for (int64_t j = 0, s = 0, t0 = 0; j < n; s += sizes[j], t0 += tiles_of(sizes[j]), ++j)
        for (int64_t t = s; t < s + sizes[j]; t += PANEL)
            items.push_back({j, t, std::min(t + PANEL, s + sizes[j]), t0 + (t - s) / 16});
    // A thread takes rows of blocks [b0, b1) over panels [i0, i1): whole row blocks over every column where
    // there are blocks enough for the threads (a decode batch of 32: a block each), so each row's o and y
    // are one run over the group and U is read front to back; else adjacent panels for every row.
    auto work = [&](int64_t b0, int64_t b1, int64_t i0, int64_t i1) {
        auto prefetch_o = [&](int64_t b) {  // block b's o rows over the columns, into L2
            for (int64_t m = 16 * b; m < std::min<int64_t>(16 * (b + 1), M); ++m)
                for (int64_t it = i0; it < i1; ++it) {
                    const char* p = reinterpret_cast<const char*>(orow[m] + items[it][1]);
                    const char* q = reinterpret_cast<const char*>(orow[m] + items[it][2]);
                    for (; p < q; p += 64) _mm_prefetch(p, _MM_HINT_T1);
                }
        };
        prefetch_o(b0);
        for (int64_t m = 16 * b0; m < std::min<int64_t>(16 * b1, M); ++m)  // the rows' c and a
            for (int64_t h = 0; h < 2; ++h)
                for (const char *p = reinterpret_cast<const char*>(crow[m] + h * lda),
                                *q = reinterpret_cast<const char*>(crow[m] + h * lda + n * r); p < q; p += 64)
                    _mm_prefetch(p, _MM_HINT_T0);
        const int64_t j0 = items[i0][0], j1 = items[i1 - 1][0] + 1, nb = b1 - b0;
        thread_local std::vector<uint16_t> zt;
        const size_t need = static_cast<size_t>((j1 - j0) * nb * NC * 4 * ZT);
        if (zt.size() < need) zt.resize(need);
        configure();
        thread_local std::vector<float> zf;
        if (own_z) {
            // rows of x copied block by block into a zero-padded [16][16·KS] buffer (tails of rows and of k)
            thread_local std::vector<uint16_t> xb;
            xb.assign(16 * 16 * KS, 0);
            if (static_cast<int64_t>(zf.size()) < nb * 16 * 16 * NZ) zf.resize(nb * 16 * 16 * NZ);
            for (int64_t b = b0; b < b1; ++b) {
                const int64_t nr = std::min<int64_t>(16, M - 16 * b);
                for (int64_t q = 0; q < 16; ++q) {
                    if (q < nr) std::memcpy(xb.data() + q * 16 * KS, xp + (16 * b + q) * K, 2 * K);
                    else std::memset(xb.data() + q * 16 * KS, 0, 2 * K);
                }
                for (int64_t ct = 0; ct < NZ; ++ct) {
                    _tile_zero(0);
                    for (int64_t ks = 0; ks < KS; ++ks) {
                        if ((ct * KS + ks + AHEAD) < NZ * KS) prefetch_tile(pv + (ct * KS + ks + AHEAD) * 256);
                        _tile_loadd(2, xb.data() + 16 * ks, 32 * KS);
                        _tile_loadd(6, pv + (ct * KS + ks) * 256, 64);
                        _tile_dpbf16ps(0, 2, 6);
                    }
                    _tile_stored(0, zf.data() + (b - b0) * 16 * 16 * NZ + 16 * ct, 64 * NZ);
                }
            }
        }
        z_tiles(zt.data(), z, W, own_z ? zf.data() : nullptr, 16 * NZ, crow.data(), lda, M, b0, b1, NC, n, r, j0, j1);
        alignas(64) float cbuf[2][16][16];
        for (int64_t b = b0; b < b1; ++b) {
            const int nr = static_cast<int>(std::min<int64_t>(16, M - 16 * b));
            if (b + 1 < b1) prefetch_o(b + 1);
            int64_t loaded = -1;  // the member whose Z tiles are in tmm2..5
            for (int64_t it = i0; it < i1; ++it) {
                const auto [j, s, e_, tile] = items[it];
                const int64_t nt = (e_ - s + 15) / 16;
                const uint16_t* zb = zt.data() + (((j - j0) * nb + b - b0) * NC) * 4 * ZT;
                if (NC == 1 && loaded != j) {
                    _tile_loadd(2, zb, 32);
                    _tile_loadd(3, zb + ZT, 32);
                    _tile_loadd(4, zb + 2 * ZT, 32);
                    _tile_loadd(5, zb + 3 * ZT, 32);
                    loaded = j;
                }
                for (int64_t t = 0; t < nt; ++t) {
                    if (tile + t + AHEAD < TT) prefetch_tile(pk + (tile + t + AHEAD) * 256);
                    _tile_zero(0);
                    _tile_zero(1);
                    for (int64_t c = 0; c < NC; ++c) {
                        if (NC > 1) {
                            const uint16_t* zc = zb + c * 4 * ZT;
                            _tile_loadd(2, zc, 32);
                            _tile_loadd(3, zc + ZT, 32);
                            _tile_loadd(4, zc + 2 * ZT, 32);
                            _tile_loadd(5, zc + 3 * ZT, 32);
                        }
                        _tile_loadd(6, pk + (c * TT + tile + t) * 256, 64);
                        _tile_dpbf16ps(0, 2, 6);
                        _tile_dpbf16ps(0, 3, 6);
                        _tile_dpbf16ps(1, 4, 6);
                        _tile_dpbf16ps(1, 5, 6);
                    }
                    _tile_stored(0, cbuf[0], 64);
                    _tile_stored(1, cbuf[1], 64);
                    const int64_t t0 = s + 16 * t, w = std::min<int64_t>(16, e_ - t0);
                    for (int q = 0; q < nr; ++q) {
                        const int64_t m = 16 * b + q;
                        T* yr = y + m * W + t0;
                        const T* orw = orow[m] + t0;
                        if (w == 16) {
                            const __m512 v = _mm512_add_ps(load16(yr), _mm512_load_ps(cbuf[0][q]));
                            store16(yr, _mm512_fmadd_ps(load16(orw), _mm512_load_ps(cbuf[1][q]), v));
                        } else {
                            for (int64_t x = 0; x < w; ++x)
                                yr[x] = c10::BFloat16(to_f(yr[x]) + cbuf[0][q][x] + to_f(orw[x]) * cbuf[1][q][x]);
                        }
                    }
                }
            }
        }
        _tile_release();
    };
    const int64_t n_items = static_cast<int64_t>(items.size());
    if (NB >= at::get_num_threads()) {
        at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) { work(b0, b1, 0, n_items); });
    } else {
        at::parallel_for(0, n_items, 1, [&](int64_t i0, int64_t i1) { work(0, NB, i0, i1); });
    }
}
#endif

// Vᵀ rows of W_ext (component-major, [n·R, k]) in B tiles for z = Vᵀx: [⌈n·R/16⌉ tiles of 16 components]
// [⌈k/16⌉ steps of 16 inputs][8][32], zeros past n·R and past k
torch::Tensor pack_v(const torch::Tensor& v, int64_t rn) {
    const int64_t K = v.size(1), NT = (rn + 15) / 16, KS = (K + 15) / 16;
    auto out = torch::zeros({NT, KS, 256}, v.options());
    const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>());
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
    const int64_t ldv = v.stride(0);
    for (int64_t ct = 0; ct < NT; ++ct)
        for (int64_t ks = 0; ks < KS; ++ks)
            for (int64_t kk = 0; kk < 8; ++kk)
                for (int64_t p = 0; p < 2; ++p) {
                    const int64_t col = 16 * ks + 2 * kk + p;
                    if (col >= K) continue;
                    for (int64_t x = 0; x < 16 && 16 * ct + x < rn; ++x)
                        dst[((ct * KS + ks) * 8 + kk) * 32 + 2 * x + p] = vp[(16 * ct + x) * ldv + col];
                }
    return out;
}

// U in B tiles (see above): [⌈R/16⌉ chunks][Σ_j ⌈d_j/16⌉ tiles][8][32], from Ublkᵀ u [n·R, D]
torch::Tensor pack(const torch::Tensor& u, int64_t n, int64_t R, const std::vector<int64_t>& sizes) {
    int64_t TT = 0;
    for (auto d : sizes) TT += (d + 15) / 16;
    const int64_t NCP = (R + 15) / 16;
    auto out = torch::zeros({NCP, TT, 256}, u.options());
    const uint16_t* up = reinterpret_cast<const uint16_t*>(u.data_ptr<c10::BFloat16>());
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
    const int64_t ldu = u.stride(0);
    for (int64_t c = 0; c < NCP; ++c)
        for (int64_t j = 0, s = 0, t0 = 0; j < n; s += sizes[j], t0 += (sizes[j] + 15) / 16, ++j)
            for (int64_t t = 0; t < (sizes[j] + 15) / 16; ++t)
                for (int64_t kk = 0; kk < 8; ++kk)
                    for (int64_t p = 0; p < 2; ++p) {
                        const int64_t i = 16 * c + 2 * kk + p;
                        if (i >= R) continue;
                        for (int64_t x = 0; x < 16 && 16 * t + x < sizes[j]; ++x)
                            dst[((c * TT + t0 + t) * 8 + kk) * 32 + 2 * x + p] = up[(i * n + j) * ldu + s + 16 * t + x];
                    }
    return out;
}

}  // namespace

// e [B, (T,) W]: the fused matmul's output, contiguous; its first D columns are y (updated in place), the
// next n·r are z. ca [rows, 2, ≥ n·r] (c then a; only the innermost dimension contiguous: the model passes
// its group's columns of the whole slot table); o [rows, D] (rows strided); u [≥ n·r, D] (Ublkᵀ); rows: [B]
// long, which ca/o row each of e's B leading rows reads (the rows' slots, built by the runtime, in range), or
// None (row b reads row b). The T tokens of a leading row share its coefficients. r ≤ 64.
// bfloat16 on AMX (see `amx()`): packed = `osora_pack(Ublkᵀ)` of this group. With it, x [B, (T,) k]
// (contiguous) and packed_v = `osora_pack_v(Vᵀ rows)` make the kernel compute z = Vᵀx itself, in float32,
// so e need hold y only (W ≥ D): the matmul before it is then the base model's own, x · W0ᵀ.
void osora_apply(torch::Tensor e, int64_t D, torch::Tensor ca, torch::Tensor o, torch::Tensor u,
                 c10::optional<torch::Tensor> rows, int64_t n, int64_t r, std::vector<int64_t> sizes,
                 c10::optional<torch::Tensor> packed, c10::optional<torch::Tensor> x,
                 c10::optional<torch::Tensor> packed_v) {
    TORCH_CHECK(e.device().is_cpu() && e.dim() >= 2 && e.is_contiguous() && ca.dim() == 3 && o.dim() == 2 &&
                u.dim() == 2, "osora_apply: CPU tensors of the documented ranks, e contiguous");
    TORCH_CHECK(o.stride(1) == 1 && u.stride(1) == 1 && ca.stride(2) == 1, "osora_apply: inner dimensions must be contiguous");
    const auto dt = e.scalar_type();
    TORCH_CHECK(ca.scalar_type() == dt && o.scalar_type() == dt && u.scalar_type() == dt, "osora_apply: one dtype");
    TORCH_CHECK(r >= 1 && r <= 64 && n >= 1 && static_cast<int64_t>(sizes.size()) == n, "osora_apply: bad n, r or sizes");
    const bool own_z = x.has_value();
    TORCH_CHECK(!own_z || (packed.has_value() && packed_v.has_value()), "osora_apply: x needs packed and packed_v");
    int64_t sum = 0;
    for (auto d : sizes) sum += d;
    TORCH_CHECK(sum == D && (own_z ? D : D + n * r) <= e.size(-1) && ca.size(1) == 2 && ca.size(2) >= n * r &&
                u.size(0) >= n * r && u.size(1) == D && o.size(1) == D && o.size(0) == ca.size(0),
                "osora_apply: shapes do not match");
    torch::Tensor idx = rows.has_value() ? rows->contiguous() : torch::Tensor();
    if (idx.defined()) {
        TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.numel() == e.size(0), "osora_apply: bad rows");
    } else {
        TORCH_CHECK(e.size(0) <= ca.size(0), "osora_apply: fewer coefficient rows than rows");
    }
    torch::Tensor xt, pv;
    if (own_z) {
        xt = *x;
        pv = *packed_v;
        TORCH_CHECK(xt.scalar_type() == dt && xt.is_contiguous() && xt.dim() == e.dim() &&
                    xt.numel() / xt.size(-1) == e.numel() / e.size(-1) && xt.size(0) == e.size(0),
                    "osora_apply: x must be contiguous, with e's rows");
        TORCH_CHECK(pv.scalar_type() == dt && pv.is_contiguous() && pv.dim() == 3 && pv.size(0) * 16 >= n * r &&
                    pv.size(1) == (xt.size(-1) + 15) / 16 && pv.size(2) == 256,
                    "osora_apply: packed_v is not osora_pack_v's for this group");
    }
    if (packed.has_value()) {
        int64_t TT = 0;
        for (auto d : sizes) TT += (d + 15) / 16;
        TORCH_CHECK(dt == torch::kBFloat16 && packed->scalar_type() == dt && packed->is_contiguous() &&
                    packed->dim() == 3 && packed->size(0) * 16 >= r && packed->size(1) == TT &&
                    packed->size(2) == 256, "osora_apply: packed is not osora_pack's for this group");
#if defined(SVDSERVE_AMX)
        TORCH_CHECK(amx_permitted(), "osora_apply: packed given, but this CPU or process has no AMX");
        return apply_amx(e, D, ca, o, *packed, idx, n, r, sizes, xt, pv);
#else
        TORCH_CHECK(false, "osora_apply: packed given, but the kernel was built without AMX");
#endif
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

// Whether bfloat16 can run on the AMX tile unit (built for a CPU with it, and granted by the OS).
bool amx() {
#if defined(SVDSERVE_AMX)
    return amx_permitted();
#else
    return false;
#endif
}

// u: a group's Ublkᵀ [n·R, D] (bfloat16, rows contiguous), component-major as FusedLinear lays it out
torch::Tensor osora_pack(torch::Tensor u, int64_t n, int64_t R, std::vector<int64_t> sizes) {
    TORCH_CHECK(u.device().is_cpu() && u.dim() == 2 && u.scalar_type() == torch::kBFloat16 && u.stride(1) == 1,
                "osora_pack: a CPU bfloat16 matrix with contiguous rows");
    TORCH_CHECK(n >= 1 && R >= 1 && static_cast<int64_t>(sizes.size()) == n && u.size(0) >= n * R,
                "osora_pack: bad n, R or sizes");
    int64_t sum = 0;
    for (auto d : sizes) sum += d;
    TORCH_CHECK(sum == u.size(1), "osora_pack: sizes do not add up to u's columns");
    return pack(u, n, R, sizes);
}

// v: a group's Vᵀ rows of W_ext [≥ n·R, k] (bfloat16, rows contiguous), component-major
torch::Tensor osora_pack_v(torch::Tensor v, int64_t n, int64_t R) {
    TORCH_CHECK(v.device().is_cpu() && v.dim() == 2 && v.scalar_type() == torch::kBFloat16 && v.stride(1) == 1 &&
                n >= 1 && R >= 1 && v.size(0) >= n * R, "osora_pack_v: a CPU bfloat16 matrix of ≥ n·R rows");
    return pack_v(v, n * R);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("osora_apply", &osora_apply, "OSoRA update of one fused group, in place (CPU)", py::arg("e"),
          py::arg("D"), py::arg("ca"), py::arg("o"), py::arg("u"), py::arg("rows"), py::arg("n"), py::arg("r"),
          py::arg("sizes"), py::arg("packed") = py::none(), py::arg("x") = py::none(),
          py::arg("packed_v") = py::none());
    m.def("vectorized", &vectorized, "whether the build has the AVX-512 tiles");
    m.def("amx", &amx, "whether bfloat16 can run on the AMX tile unit");
    m.def("osora_pack", &osora_pack, "Ublkᵀ of a fused group packed into AMX tiles (bfloat16)");
    m.def("osora_pack_v", &osora_pack_v, "the Vᵀ rows of a fused group packed into AMX tiles (bfloat16)");
}
