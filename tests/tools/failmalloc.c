/*
 * failmalloc: an LD_PRELOAD shim that makes a share of one process's allocations fail,
 * for docs/reliability.md O3 (b), the whole daemon under random allocation failure.
 *
 *   FAILMALLOC_PPM   failures per million calls while failing (10000 = 1 %)
 *   FAILMALLOC_SEED  seeds the draw (default 1)
 *
 * Off at start, so that the process can start and be made ready first: SIGUSR1 turns
 * failing on, SIGUSR2 off. Only the process that loaded it fails: children it forks (the
 * daemon's decoder workers) allocate normally. malloc, calloc, realloc, the aligned
 * allocators and the C++ operators' malloc all come here; the real allocators are glibc's
 * __libc_* entry points, so no dlsym is needed (it allocates).
 *
 * Allocations made under libcurl (a frame of the stack in libcurl.so) are spared:
 * libcurl 7.88.1 (Debian 12) destroys a socket's transfer hash after a failed insert and
 * later divides by zero in it (multi.c, singlesocket()), its own bug, which would end any
 * run that draws a failure there. FAILMALLOC_SPARE_CURL=0 fails those too.
 *
 * Why not libfiu (fiu-run -x): its remote control starts a thread before main, and a
 * process that forks its workers (the daemon's zygote) inherits that thread's locks; the
 * workers then hang in its wrappers. A signal needs no thread.
 */
#include <errno.h>
#include <execinfo.h>
#include <link.h>
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
extern void *__libc_memalign(size_t align, size_t n);

static volatile sig_atomic_t failing;
static pid_t owner;
static uint32_t ppm;
static uint64_t seed = 1;
static _Thread_local uint64_t state;
static _Thread_local int inside; /* in backtrace(): its own allocations do not fail */
/* libcurl's executable segments (spared; see above) */
static uintptr_t curl_lo[4], curl_hi[4];
static int curl_n;

static int find_curl(struct dl_phdr_info *info, size_t size, void *data)
{
	(void)size;
	(void)data;
	if (!info->dlpi_name || !strstr(info->dlpi_name, "libcurl.so"))
		return 0;
	for (int i = 0; i < info->dlpi_phnum && curl_n < 4; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X))
			continue;
		curl_lo[curl_n] = info->dlpi_addr + ph->p_vaddr;
		curl_hi[curl_n] = curl_lo[curl_n] + ph->p_memsz;
		curl_n++;
	}
	return 0;
}

/* Whether the current stack goes through libcurl. */
static int under_curl(void)
{
	void *frames[48];
	int n;

	if (!curl_n)
		return 0;
	inside = 1;
	n = backtrace(frames, 48);
	inside = 0;
	for (int i = 0; i < n; i++)
		for (int k = 0; k < curl_n; k++)
			if ((uintptr_t)frames[i] >= curl_lo[k] && (uintptr_t)frames[i] < curl_hi[k])
				return 1;
	return 0;
}

static void on_usr(int sig)
{
	failing = sig == SIGUSR1;
}

/* A crash while failing: its stack on stderr (addr2line -e dmcached turns the offsets
 * into lines), then the default action, so that the test sees the signal. */
static void on_crash(int sig)
{
	void *frames[64];
	int n = backtrace(frames, 64);
	static const char head[] = "failmalloc: crashed; the stack:\n";

	(void)!write(2, head, sizeof(head) - 1);
	backtrace_symbols_fd(frames, n, 2);
	signal(sig, SIG_DFL);
	raise(sig);
}

__attribute__((constructor)) static void init(void)
{
	const char *p = getenv("FAILMALLOC_PPM"), *s = getenv("FAILMALLOC_SEED");
	const char *spare = getenv("FAILMALLOC_SPARE_CURL");
	struct sigaction sa;

	owner = getpid();
	ppm = p ? (uint32_t)strtoul(p, NULL, 10) : 10000;
	if (s)
		seed = strtoull(s, NULL, 10) | 1;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	{
		void *warm[1];
		backtrace(warm, 1); /* loads what backtrace() needs now, not in a handler */
	}
	if (!spare || strcmp(spare, "0") != 0)
		dl_iterate_phdr(find_curl, NULL);
	signal(SIGSEGV, on_crash);
	signal(SIGBUS, on_crash);
	signal(SIGABRT, on_crash);
	signal(SIGFPE, on_crash);
	signal(SIGILL, on_crash);
}

static int fail_now(void)
{
	uint64_t x;

	if (!failing || inside || getpid() != owner)
		return 0;
	if (!state)
		state = seed ^ ((uint64_t)(uintptr_t)&state * 0x9e3779b97f4a7c15ull);
	x = state; /* xorshift64 */
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	state = x;
	if (x % 1000000u >= ppm || under_curl())
		return 0;
	errno = ENOMEM;
	return 1;
}

void *malloc(size_t n)
{
	return fail_now() ? NULL : __libc_malloc(n);
}

void *calloc(size_t n, size_t size)
{
	return fail_now() ? NULL : __libc_calloc(n, size);
}

void *realloc(void *p, size_t n)
{
	if (p && n == 0)
		return __libc_realloc(p, n); /* a free */
	return fail_now() ? NULL : __libc_realloc(p, n);
}

void *memalign(size_t align, size_t n)
{
	return fail_now() ? NULL : __libc_memalign(align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
	return fail_now() ? NULL : __libc_memalign(align, n);
}

int posix_memalign(void **out, size_t align, size_t n)
{
	void *p;

	if (align < sizeof(void *) || (align & (align - 1)))
		return EINVAL;
	if (fail_now())
		return ENOMEM;
	p = __libc_memalign(align, n);
	if (!p)
		return ENOMEM;
	*out = p;
	return 0;
}
