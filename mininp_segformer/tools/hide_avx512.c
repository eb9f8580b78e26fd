/* hide_avx512.c: a process that sees an AVX2 CPU on an AVX-512 one (built and preloaded by tools/avx2.py).

   Linux's cpuid faulting (arch_prctl ARCH_SET_CPUID, 0) makes the cpuid instruction raise SIGSEGV in this thread
   and in every thread it starts later. The handler runs the real cpuid with faulting off for that one instruction,
   clears the AVX-512 feature bits (and AMX's, and the AVX2-era VNNI/IFMA extensions a Haswell or Zen 3 lacks),
   writes the four registers back and steps over the instruction's two bytes. Preloaded (LD_PRELOAD), the
   constructor runs before the program's main, so NumPy, OpenBLAS, LLVM (numba), ONNX Runtime and torch all probe
   the CPU through the handler. Only the dynamic loader probed earlier: glibc's own string functions keep their
   choice. Any other SIGSEGV (a real fault, or one sent by kill) gets the default action: the process dies of it
   as it would have.

   Limits: a thread that blocks SIGSEGV dies at its first cpuid, and a program that installs its own SIGSEGV
   handler takes the traps away from this one (Python's faulthandler: tools/avx2.py turns it off). */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static void on_cpuid(int sig, siginfo_t *info, void *context) {
    (void)sig;
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) { /* not a trapped cpuid (0F A2) */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGSEGV, &dfl, 0);
        raise(SIGSEGV); /* pending until this handler returns, then the default action: the process dies */
        return;
    }
    unsigned leaf = (unsigned)reg[REG_RAX], sub = (unsigned)reg[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8 */
        d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        a &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23)); /* AVX_VNNI, AVX512_BF16, AMX_FP16, AVX_IFMA */
        d &= ~(BIT(4) | BIT(5) | BIT(10) | BIT(19)); /* AVX_VNNI_INT8, AVX_NE_CONVERT, AVX_VNNI_INT16, AVX10 */
    } else if (leaf == 0xd && sub == 0) {
        a &= ~(BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18)); /* XSAVE state: opmask, ZMM, AMX tiles */
    }
    reg[REG_RAX] = a;
    reg[REG_RBX] = b;
    reg[REG_RCX] = c;
    reg[REG_RDX] = d;
    reg[REG_RIP] += 2;
}

__attribute__((constructor)) static void hide_avx512(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_cpuid;
    sa.sa_flags = SA_SIGINFO;
    if (sigaction(SIGSEGV, &sa, 0) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        static const char msg[] = "hide_avx512: this machine refused cpuid faulting (arch_prctl ARCH_SET_CPUID)\n";
        ssize_t ignored = write(2, msg, sizeof msg - 1);
        (void)ignored;
        _exit(3);
    }
}
