/* Portable C kernels: the baseline every machine can run. */
#define OB_ISA scalar
#define OB_ISA_NAME "scalar"
#include "kernels_impl.h"
