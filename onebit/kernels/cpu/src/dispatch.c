/* Run-time ISA choice: which kernel tables were compiled in, and which this CPU can run. */
#include <string.h>

#include "ob.h"

#if defined(__x86_64__) || defined(__i386__)
#define OB_X86 1
extern const ob_kernels ob_kernels_avx2, ob_kernels_avx512, ob_kernels_avx512vnni;
#elif defined(__aarch64__)
#define OB_ARM64 1
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
extern const ob_kernels ob_kernels_neon, ob_kernels_neondot;
#endif
extern const ob_kernels ob_kernels_scalar;

#ifdef OB_X86
static const char *const all_isas[] = {"scalar", "avx2", "avx512", "avx512vnni", NULL};
#elif defined(OB_ARM64)
static const char *const all_isas[] = {"scalar", "neon", "neondot", NULL};
#else
static const char *const all_isas[] = {"scalar", NULL};
#endif

const char *const *ob_isa_all(void) { return all_isas; }

static const ob_kernels *table(const char *name) {
    if (!strcmp(name, "scalar")) return &ob_kernels_scalar;
#ifdef OB_X86
    if (!strcmp(name, "avx2")) return &ob_kernels_avx2;
    if (!strcmp(name, "avx512")) return &ob_kernels_avx512;
    if (!strcmp(name, "avx512vnni")) return &ob_kernels_avx512vnni;
#elif defined(OB_ARM64)
    if (!strcmp(name, "neon")) return &ob_kernels_neon;
    if (!strcmp(name, "neondot")) return &ob_kernels_neondot;
#endif
    return NULL;
}

int ob_isa_compiled(const char *name) { return table(name) != NULL; }

int ob_isa_supported(const char *name) {
    if (!table(name)) return 0;
    if (!strcmp(name, "scalar")) return 1;
#ifdef OB_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    if (!strcmp(name, "avx2")) return avx2;
    if (!strcmp(name, "avx512")) return avx512;
    if (!strcmp(name, "avx512vnni")) return avx512 && __builtin_cpu_supports("avx512vnni");
#elif defined(OB_ARM64)
    unsigned long hw = getauxval(AT_HWCAP);
    if (!strcmp(name, "neon")) return (hw & HWCAP_ASIMD) != 0;
    if (!strcmp(name, "neondot")) return (hw & HWCAP_ASIMD) && (hw & HWCAP_ASIMDDP);
#endif
    return 0;
}

const ob_kernels *ob_find_kernels(const char *name) {
    return ob_isa_supported(name) ? table(name) : NULL;
}
