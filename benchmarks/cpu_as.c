/* Preloaded by benchmarks/cpu_as.py: makes this process and its children see a CPU without
 * the instruction sets named in $COMPRESS_CPU_AS ("avx2": no AVX-512, AVX-VNNI or AMX;
 * "avx512": no VNNI, BF16 or AMX; "avx512_vnni": no BF16 or AMX).
 *
 * CPUID is made to fault (Linux's ARCH_SET_CPUID, on CPUs with CPUID faulting) and the
 * SIGSEGV handler below runs the real instruction and clears the masked feature bits, so
 * every library that picks kernels from CPUID (onnxruntime's MLAS, oneDNN, cpuinfo in
 * PyTorch) picks what it would on that CPU. /proc/cpuinfo is served with the same flags
 * removed (lscpu, flag checks). A SIGSEGV handler the program installs itself (Python's
 * faulthandler) is kept and called for every fault that is not a CPUID. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

/* the masks: CPUID leaf 7 subleaf 0 EBX / ECX / EDX, subleaf 1 EAX / EDX */
static uint32_t m7b, m7c, m7d, m71a, m71d;
static const char *hidden[64];
static int nhidden;
static struct sigaction app;   /* the program's own SIGSEGV disposition */

static const char *AMX[] = {"amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "amx_complex",
                            "avx512_bf16", "avx512_fp16", 0};
static const char *VNNI[] = {"avx512_vnni", "avx_vnni", "avx_vnni_int8", "avx_ifma", 0};
static const char *AVX512[] = {"avx512f", "avx512dq", "avx512ifma", "avx512pf", "avx512er",
                               "avx512cd", "avx512bw", "avx512vl", "avx512vbmi",
                               "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq",
                               "avx512_4vnniw", "avx512_4fmaps", "avx512_vp2intersect", 0};

static void hide(const char **names) {
  for (; *names && nhidden < 63; names++) hidden[nhidden++] = *names;
}

static int real_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  static int (*real)(int, const struct sigaction *, struct sigaction *);
  if (!real) real = dlsym(RTLD_NEXT, "sigaction");
  return real(sig, act, old);
}

static int set_cpuid(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void on_segv(int sig, siginfo_t *si, void *ctx) {
  ucontext_t *uc = ctx;
  greg_t *r = uc->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)r[REG_RIP];
  if (si->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
    uint32_t leaf = r[REG_RAX], sub = r[REG_RCX], a, b, c, d;
    set_cpuid(1);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
    set_cpuid(0);
    if (leaf == 7 && sub == 0) { b &= ~m7b; c &= ~m7c; d &= ~m7d; }
    if (leaf == 7 && sub == 1) { a &= ~m71a; d &= ~m71d; }
    r[REG_RAX] = a; r[REG_RBX] = b; r[REG_RCX] = c; r[REG_RDX] = d;
    r[REG_RIP] += 2;
    return;
  }
  if (app.sa_flags & SA_SIGINFO) { app.sa_sigaction(sig, si, ctx); return; }
  if (app.sa_handler != SIG_DFL && app.sa_handler != SIG_IGN) { app.sa_handler(sig); return; }
  if (app.sa_handler == SIG_IGN && si->si_code <= 0) return;
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  real_sigaction(SIGSEGV, &dfl, 0);
  if (si->si_code <= 0) raise(sig);   /* sent by kill: deliver it as it was */
  /* a fault: returning re-runs the instruction, which now ends the process */
}

/* The program's SIGSEGV handler is recorded, ours stays installed. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  if (sig != SIGSEGV || !nhidden) return real_sigaction(sig, act, old);
  if (old) *old = app;
  if (act) app = *act;
  return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
  static sighandler_t (*real)(int, sighandler_t);
  if (!real) real = dlsym(RTLD_NEXT, "signal");
  if (sig != SIGSEGV || !nhidden) return real(sig, handler);
  sighandler_t old = app.sa_handler;
  memset(&app, 0, sizeof app);
  app.sa_handler = handler;
  return old;
}

static int is_hidden(const char *flag, size_t n) {
  for (int i = 0; i < nhidden; i++)
    if (strlen(hidden[i]) == n && !memcmp(hidden[i], flag, n)) return 1;
  return 0;
}

/* /proc/cpuinfo without the hidden flags, as an anonymous file. */
static int masked_cpuinfo(void) {
  static int (*real)(const char *, int, ...);
  if (!real) real = dlsym(RTLD_NEXT, "open");
  int in = real("/proc/cpuinfo", O_RDONLY);
  if (in < 0) return in;
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap), *grown;
  ssize_t got;
  while (buf && (got = read(in, buf + len, cap - len)) > 0)
    if ((len += got) == cap) {
      grown = realloc(buf, cap *= 2);
      if (!grown) free(buf);
      buf = grown;
    }
  close(in);
  int out = buf ? memfd_create("cpuinfo", 0) : -1;
  if (out < 0) {   /* no copy to serve: the file as it is */
    free(buf);
    return real("/proc/cpuinfo", O_RDONLY);
  }
  size_t n = 0;   /* filtered in place: the output never outgrows the input */
  for (size_t i = 0; i < len;) {
    size_t end = i;
    while (end < len && buf[end] != '\n') end++;
    int flagline = !strncmp(buf + i, "flags", 5);
    for (size_t j = i, w; j < end; j = w + 1) {
      for (w = j; w < end && buf[w] != ' '; w++) ;
      if (flagline && w > j && is_hidden(buf + j, w - j)) continue;   /* the word and its space */
      memmove(buf + n, buf + j, w - j + (w < end));
      n += w - j + (w < end);
    }
    if (end < len) buf[n++] = '\n';
    i = end + 1;
  }
  for (size_t done = 0; done < n;) {
    ssize_t w = write(out, buf + done, n - done);
    if (w <= 0) break;
    done += w;
  }
  free(buf);
  lseek(out, 0, SEEK_SET);
  return out;
}

static int is_cpuinfo(const char *path) { return nhidden && path && !strcmp(path, "/proc/cpuinfo"); }

/* openat(fd of /proc, "cpuinfo"), as util-linux (lscpu) opens it */
static int is_cpuinfo_at(int dirfd, const char *path) {
  if (!nhidden || !path) return 0;
  if (path[0] == '/' || dirfd == AT_FDCWD) return is_cpuinfo(path);
  if (strcmp(path, "cpuinfo") && strcmp(path, "./cpuinfo")) return 0;
  char link[64], dir[16];
  snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
  ssize_t n = readlink(link, dir, sizeof dir - 1);
  return n == 5 && !memcmp(dir, "/proc", 5);
}

static mode_t mode_of(int flags, va_list ap) {
  return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

int open(const char *path, int flags, ...) {
  static int (*real)(const char *, int, ...);
  if (!real) real = dlsym(RTLD_NEXT, "open");
  va_list ap; va_start(ap, flags); mode_t mode = mode_of(flags, ap); va_end(ap);
  return is_cpuinfo(path) ? masked_cpuinfo() : real(path, flags, mode);
}

int open64(const char *path, int flags, ...) {
  va_list ap; va_start(ap, flags); mode_t mode = mode_of(flags, ap); va_end(ap);
  return open(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) {
  static int (*real)(int, const char *, int, ...);
  if (!real) real = dlsym(RTLD_NEXT, "openat");
  va_list ap; va_start(ap, flags); mode_t mode = mode_of(flags, ap); va_end(ap);
  return is_cpuinfo_at(dirfd, path) ? masked_cpuinfo() : real(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) {
  va_list ap; va_start(ap, flags); mode_t mode = mode_of(flags, ap); va_end(ap);
  return openat(dirfd, path, flags, mode);
}

/* what _FORTIFY_SOURCE builds call instead */
int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open(path, flags); }
int __openat_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }
int __openat64_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }

FILE *fopen(const char *path, const char *mode) {
  static FILE *(*real)(const char *, const char *);
  if (!real) real = dlsym(RTLD_NEXT, "fopen");
  return is_cpuinfo(path) ? fdopen(masked_cpuinfo(), "r") : real(path, mode);
}

FILE *fopen64(const char *path, const char *mode) { return fopen(path, mode); }

__attribute__((constructor)) static void init(void) {
  const char *as = getenv("COMPRESS_CPU_AS");
  if (!as || !*as) return;
  /* everything above the named kind is hidden */
  m7d = BIT(22) | BIT(23) | BIT(24) | BIT(25);           /* AMX-BF16, AVX512-FP16, AMX tiles, AMX-INT8 */
  m71a = BIT(5) | BIT(21) | BIT(22);                     /* AVX512-BF16, AMX-FP16, AMX-complex (EDX 8) */
  m71d = BIT(8);
  hide(AMX);
  if (strcmp(as, "avx512_vnni")) {
    m7c |= BIT(11);                                      /* AVX512-VNNI */
    m71a |= BIT(4) | BIT(23);                            /* AVX-VNNI, AVX-IFMA */
    m71d |= BIT(4);                                      /* AVX-VNNI-INT8 */
    hide(VNNI);
  }
  if (!strcmp(as, "avx2")) {
    m7b |= BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
    m7c |= BIT(1) | BIT(6) | BIT(12) | BIT(14);
    m7d |= BIT(2) | BIT(3) | BIT(8);
    hide(AVX512);
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  real_sigaction(SIGSEGV, &sa, 0);
  if (set_cpuid(0)) {
    fprintf(stderr, "cpu_as: this CPU or kernel cannot make CPUID fault (no cpuid_fault flag)\n");
    _exit(2);
  }
}
