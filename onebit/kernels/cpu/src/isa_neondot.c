/* NEON with the dot-product extension (ARMv8.2 SDOT): the NEON file compiled with OB_DOTPROD. */
#define OB_DOTPROD 1
#include "isa_neon.c"
