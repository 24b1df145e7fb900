/* AVX-512 with VNNI: the AVX-512 file compiled with OB_VNNI. */
#define OB_VNNI 1
#include "isa_avx512.c"
