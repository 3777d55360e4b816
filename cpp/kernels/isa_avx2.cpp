// AVX2 (+FMA, F16C) row tables.
#define CTALIGN_ISA Isa::avx2
#define CTALIGN_ISA_TRAITS Avx2
#define CTALIGN_ISA_TARGETS CTALIGN_AVX2_TARGETS
#include "kernels/isa_tables.inc"
