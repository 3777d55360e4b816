// AVX-512 (F, BW, DQ, VL) row tables.
#define CTALIGN_ISA Isa::avx512
#define CTALIGN_ISA_TRAITS Avx512
#define CTALIGN_ISA_TARGETS CTALIGN_AVX512_TARGETS
#include "kernels/isa_tables.inc"
