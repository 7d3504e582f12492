/*
 * decode_worker: the zygote and the decoder worker processes (see decode_pool.h).
 *
 * Both are forked, never exec'd, and never return into the daemon's code: they leave with
 * _exit() so that no atexit handler or libuv state of the daemon runs in them.
 *
 * Privileges (docs/security.md, docs/reliability.md S13): a worker owns nothing. Before it
 * reads any input it gives up its capabilities, bounding set included, and, in a root
 * daemon, switches to the unprivileged worker user (worker_drop_privileges()). The zygote
 * of a root daemon keeps only what that switch needs: CAP_SETUID, CAP_SETGID, CAP_SETPCAP.
 * The seccomp filter then denies setrlimit/prlimit64 and any signal not aimed at the worker
 * itself, so RLIMIT_CPU is a lifetime budget set once (WORKER_CPU_JOBS in decode_worker.h).
 */
#include "decode_worker.h"
#include "policy.h"

#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <malloc.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if HAVE_SECCOMP
#include <seccomp.h>
#endif

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define WORKER_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
	__has_feature(memory_sanitizer)
#define WORKER_SANITIZED 1
#endif
#endif
#ifndef WORKER_SANITIZED
#define WORKER_SANITIZED 0
#endif

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Pages pre-faulted at start in each area: the first items never pay the fault cost. */
#define WORKER_PREFAULT_BYTES (16u << 20)
/* Scratch kept by the decode context between jobs; more is returned after a large item. */
#define WORKER_KEEP_SCRATCH (64u << 20)

static void reset_signals(void)
{
	sigset_t all;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_DFL;
	for (int sig = 1; sig < NSIG; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP)
			continue;
		sigaction(sig, &sa, NULL);
	}
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
}

static void close_from(int lowfd)
{
#ifdef SYS_close_range
	if (syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0u) == 0)
		return;
#endif
	long max = sysconf(_SC_OPEN_MAX);
	if (max < 0 || max > 65536)
		max = 65536;
	for (int fd = lowfd; fd < max; fd++)
		close(fd);
}

static void set_limit(int resource, rlim_t soft, rlim_t hard)
{
	struct rlimit rl = { soft, hard };
	setrlimit(resource, &rl);
}

/* Sets the permitted and effective capability sets to `mask` (inheritable: none). */
static int set_caps(uint64_t mask)
{
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

	memset(data, 0, sizeof(data));
	data[0].permitted = data[0].effective = (uint32_t)mask;
	data[1].permitted = data[1].effective = (uint32_t)(mask >> 32);
	return syscall(SYS_capset, &hdr, data) == 0 ? 0 : -errno;
}

static int caps_are_empty(void)
{
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

	if (syscall(SYS_capget, &hdr, data) != 0)
		return -errno;
	for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++)
		if (data[i].permitted || data[i].effective || data[i].inheritable)
			return -EPERM;
	return 0;
}

int worker_drop_privileges(const struct worker_params *p, const char **what)
{
	uid_t ru, eu, su;
	gid_t rg, eg, sg;

	/* The bounding set first: dropping from it needs CAP_SETPCAP, which the uid switch
	 * takes away. EINVAL marks the end of the valid capabilities. An unprivileged daemon
	 * (systemd's User=) has no CAP_SETPCAP and its bounding set is the unit's (empty). */
	*what = "PR_CAPBSET_DROP";
	for (unsigned long cap = 0; cap < 64; cap++) {
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0)
			continue;
		if (errno == EINVAL)
			break;
		if (errno == EPERM && !p->drop_user)
			break;
		return -errno;
	}
	if (p->drop_user) {
		*what = "setgroups";
		if (setgroups(0, NULL) != 0)
			return -errno;
		*what = "setresgid";
		if (setresgid(p->worker_gid, p->worker_gid, p->worker_gid) != 0)
			return -errno;
		*what = "setresuid";
		if (setresuid(p->worker_uid, p->worker_uid, p->worker_uid) != 0)
			return -errno;
		*what = "checking the new uid and gid";
		if (getresuid(&ru, &eu, &su) != 0 || getresgid(&rg, &eg, &sg) != 0)
			return -errno;
		if (ru != p->worker_uid || eu != ru || su != ru || rg != p->worker_gid ||
		    eg != rg || sg != rg || getgroups(0, NULL) != 0 || ru == 0)
			return -EPERM;
	}
	*what = "capset";
	int r = set_caps(0);
	if (r == 0)
		r = caps_are_empty();
	if (r < 0)
		return r;
	*what = "PR_SET_NO_NEW_PRIVS";
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		return -errno;
	/* A uid change resets dumpable to fs.suid_dumpable: set it again. */
	*what = "PR_SET_DUMPABLE";
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
		return -errno;
	*what = "";
	return 0;
}

/* CPU seconds (user + system) used by this process so far, rounded up. */
static rlim_t cpu_used(void)
{
	struct rusage ru;
	if (getrusage(RUSAGE_SELF, &ru) != 0)
		return 0;
	uint64_t us = (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u +
		      (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
	return (rlim_t)(us / 1000000u + 1);
}

#if HAVE_SECCOMP
static int install_filter(void)
{
	static const int allow[] = {
		SCMP_SYS(read), SCMP_SYS(write), SCMP_SYS(readv), SCMP_SYS(writev),
		SCMP_SYS(recvfrom), SCMP_SYS(recvmsg), SCMP_SYS(sendto), SCMP_SYS(sendmsg),
		SCMP_SYS(close), SCMP_SYS(mmap), SCMP_SYS(munmap), SCMP_SYS(mremap),
		SCMP_SYS(mprotect), SCMP_SYS(brk), SCMP_SYS(madvise), SCMP_SYS(futex),
		SCMP_SYS(exit), SCMP_SYS(exit_group), SCMP_SYS(rt_sigreturn),
		SCMP_SYS(rt_sigprocmask), SCMP_SYS(getrusage), SCMP_SYS(getrlimit),
		SCMP_SYS(clock_gettime), SCMP_SYS(clock_nanosleep), SCMP_SYS(nanosleep),
		SCMP_SYS(gettimeofday), SCMP_SYS(getpid), SCMP_SYS(gettid), SCMP_SYS(sched_yield),
		SCMP_SYS(getrandom), SCMP_SYS(lseek), SCMP_SYS(fstat), SCMP_SYS(newfstatat),
		SCMP_SYS(restart_syscall), SCMP_SYS(sched_getaffinity), SCMP_SYS(sysinfo),
		SCMP_SYS(uname), SCMP_SYS(rt_sigaction), SCMP_SYS(set_robust_list),
		SCMP_SYS(rseq), SCMP_SYS(sigaltstack),
	};
	/* Lazy file access inside a library fails cleanly instead of killing the worker. */
	static const int deny_files[] = {
		SCMP_SYS(open), SCMP_SYS(openat), SCMP_SYS(stat), SCMP_SYS(lstat),
		SCMP_SYS(access), SCMP_SYS(faccessat), SCMP_SYS(readlink), SCMP_SYS(statx),
	};
	scmp_filter_ctx f = seccomp_init(SCMP_ACT_KILL_PROCESS);
	int r = f ? 0 : -ENOMEM;
	for (size_t i = 0; r == 0 && i < sizeof(allow) / sizeof(allow[0]); i++)
		r = seccomp_rule_add(f, SCMP_ACT_ALLOW, allow[i], 0);
	for (size_t i = 0; r == 0 && i < sizeof(deny_files) / sizeof(deny_files[0]); i++)
		r = seccomp_rule_add(f, SCMP_ACT_ERRNO(EACCES), deny_files[i], 0);
	/* OpenJPEG (inside GDCM) decodes with a thread pool: threads only, no processes.
	 * clone3 passes its flags in memory, out of the filter's sight: ENOSYS makes glibc
	 * fall back to clone, whose flags are checked. */
	if (r == 0)
		r = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(clone), 1,
				     SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD));
	if (r == 0)
		r = seccomp_rule_add(f, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
	/* Limits: read its own only (prlimit64(0, res, NULL, old), glibc's getrlimit); no
	 * setrlimit, no prlimit64 that sets or aims at another process. */
	if (r == 0)
		r = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(prlimit64), 2,
				     SCMP_A0_64(SCMP_CMP_EQ, 0), SCMP_A2_64(SCMP_CMP_EQ, 0));
	/* Signals: only to itself (raise() and abort() are tgkill(getpid(), gettid(), sig)).
	 * Other workers run as the same user: kill() would otherwise reach them. */
	scmp_datum_t self = (scmp_datum_t)getpid();
	if (r == 0)
		r = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(kill), 1,
				     SCMP_A0_32(SCMP_CMP_EQ, self));
	if (r == 0)
		r = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1,
				     SCMP_A0_32(SCMP_CMP_EQ, self));
	if (r == 0)
		r = seccomp_rule_add(f, SCMP_ACT_ALLOW, SCMP_SYS(tkill), 1,
				     SCMP_A0_32(SCMP_CMP_EQ, self));
	if (r == 0)
		r = seccomp_load(f);
	seccomp_release(f);
	return r;
}
#endif

#ifdef DECODE_TEST_HOOKS
/*
 * Test build only: an input starting with "DMCTEST:" misbehaves on purpose.
 *   spin     loop forever (a CPU bomb: the deadline or RLIMIT_CPU ends it)
 *   burn:N   use N ms of CPU, then fail
 *   sleep:N  sleep N ms, then fail (a slow decode to kill from outside)
 *   segv     crash with SIGSEGV
 *   syscall  call socket(2), which the seccomp filter forbids
 *   kill:P   kill(P, SIGKILL); tgkill:P tgkill(P, P, SIGKILL) (the filter allows only itself)
 *   setrlimit  raise its own RLIMIT_CPU; prlimit:P  lower RLIMIT_NOFILE of process P
 */
static int test_hook(const uint8_t *in, size_t len, struct worker_rep *rep)
{
	static const char tag[] = "DMCTEST:";
	char cmd[32];
	if (len < sizeof(tag) - 1 || memcmp(in, tag, sizeof(tag) - 1) != 0)
		return 0;
	size_t n = len - (sizeof(tag) - 1);
	if (n >= sizeof(cmd))
		n = sizeof(cmd) - 1;
	memcpy(cmd, in + sizeof(tag) - 1, n);
	cmd[n] = '\0';
	if (strcmp(cmd, "spin") == 0) {
		volatile uint64_t x = 0;
		for (;;)
			x = x + 1;
	}
	if (strncmp(cmd, "sleep:", 6) == 0) {
		long ms = strtol(cmd + 6, NULL, 10);
		struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
	}
	if (strcmp(cmd, "segv") == 0)
		raise(SIGSEGV);
	if (strcmp(cmd, "syscall") == 0) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd >= 0)
			close(fd);
	}
	if (strncmp(cmd, "burn:", 5) == 0) {
		long ms = strtol(cmd + 5, NULL, 10);
		struct timespec t0, t;
		clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t0);
		do
			clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
		while ((t.tv_sec - t0.tv_sec) * 1000L + (t.tv_nsec - t0.tv_nsec) / 1000000L < ms);
	}
	if (strncmp(cmd, "kill:", 5) == 0)
		kill((pid_t)strtol(cmd + 5, NULL, 10), SIGKILL);
	if (strncmp(cmd, "tgkill:", 7) == 0) {
		long pid = strtol(cmd + 7, NULL, 10);
		syscall(SYS_tgkill, pid, pid, SIGKILL);
	}
	if (strcmp(cmd, "setrlimit") == 0) {
		struct rlimit rl = { RLIM_INFINITY, RLIM_INFINITY };
		setrlimit(RLIMIT_CPU, &rl);
	}
	if (strncmp(cmd, "prlimit:", 8) == 0) {
		struct rlimit rl = { 1, 1 };
		prlimit((pid_t)strtol(cmd + 8, NULL, 10), RLIMIT_NOFILE, &rl, NULL);
	}
	rep->status = -DMC_E_DECODE_FAILED;
	snprintf(rep->err, sizeof(rep->err), "test hook '%s' finished", cmd);
	return 1;
}
#endif

static void run_job(struct decode_ctx *ctx, uint8_t *region, const struct worker_params *p,
		    const struct worker_req *req, struct worker_rep *rep)
{
	struct decode_opts opts = { req->flags, req->frame, (enum decode_dtype)req->dtype };
	struct decode_opts dopts;
	uint8_t *out = region + p->in_bytes;
	char *meta = (char *)out + p->out_bytes;
	int r;

	if (req->in_len > p->in_bytes) {
		rep->status = -DMC_E_LIMIT_EXCEEDED;
		snprintf(rep->err, sizeof(rep->err), "input larger than the decode input area");
		return;
	}
#ifdef DECODE_TEST_HOOKS
	if (test_hook(region, req->in_len, rep))
		return;
#endif
	/* the decoder's options: the policy may decode with others (policy.h) */
	policy_decoder_opts(&opts, &req->pol, &dopts);
	r = policy_probe(ctx, region, req->in_len, &opts, &req->pol, &rep->desc, rep->err,
			 sizeof(rep->err));
	/* A probe writes no tensor: an item larger than the output area may still be served
	 * frame by frame. */
	if (r == 0 && !req->probe_only && rep->desc.nbytes > p->out_bytes) {
		snprintf(rep->err, sizeof(rep->err),
			 "tensor of %llu bytes does not fit the output area of %zu bytes",
			 (unsigned long long)rep->desc.nbytes, p->out_bytes);
		r = -DMC_E_LIMIT_EXCEEDED;
	}
	if (r == 0 && req->want_meta) {
		size_t mlen = 0;
		r = decode_meta(ctx, region, req->in_len, &dopts, meta, p->meta_bytes, &mlen,
				rep->err, sizeof(rep->err));
		if (r == -ENOBUFS)
			r = -DMC_E_LIMIT_EXCEEDED;
		rep->meta_len = mlen;
	}
	if (r == 0 && !req->probe_only)
		r = policy_run(ctx, region, req->in_len, &opts, &req->pol, out, p->out_bytes,
			       rep->err, sizeof(rep->err));
	rep->status = r;
}

static void worker_main(int ctl, int memfd, pid_t zygote, const struct worker_params *p)
	__attribute__((noreturn));
static void worker_main(int ctl, int memfd, pid_t zygote, const struct worker_params *p)
{
	const char *what;

	/* First of all: nothing of the input has been read yet. A uid change clears the
	 * parent-death signal, so it is set after. */
	if (worker_drop_privileges(p, &what) != 0)
		_exit(1);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != zygote)
		_exit(0);
	prctl(PR_SET_NAME, "dmcache-decode");

	size_t size = worker_region_size(p);
	uint8_t *region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	close(memfd);
	if (region == MAP_FAILED)
		_exit(1);
	size_t pre_in = p->in_bytes < WORKER_PREFAULT_BYTES ? p->in_bytes : WORKER_PREFAULT_BYTES;
	size_t pre_out = p->out_bytes < WORKER_PREFAULT_BYTES ? p->out_bytes : WORKER_PREFAULT_BYTES;
	madvise(region, pre_in & ~(size_t)4095, MADV_POPULATE_WRITE);
	madvise(region + p->in_bytes, pre_out & ~(size_t)4095, MADV_POPULATE_WRITE);

	mallopt(M_MMAP_THRESHOLD, 32 << 20);
	mallopt(M_TRIM_THRESHOLD, 256 << 20);
	mallopt(M_ARENA_MAX, 1);

	set_limit(RLIMIT_CORE, 0, 0);
	set_limit(RLIMIT_FSIZE, 0, 0);
	/* The worker's CPU for its whole life: the filter forbids raising it per job. */
	rlim_t cpu_limit = cpu_used() + (rlim_t)WORKER_CPU_JOBS * p->cpu_seconds;
	set_limit(RLIMIT_CPU, cpu_limit, cpu_limit);
	if (!WORKER_SANITIZED && p->mem_bytes)
		set_limit(RLIMIT_AS, (rlim_t)p->mem_bytes, (rlim_t)p->mem_bytes);

	/* Libraries inside GDCM print to stderr; only the daemon logs. Sanitizer builds keep
	 * stderr for their reports. */
	if (!WORKER_SANITIZED) {
		int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (nul >= 0) {
			dup2(nul, 0);
			dup2(nul, 1);
			dup2(nul, 2);
			if (nul > 2)
				close(nul);
		}
	}

	struct decode_ctx *ctx = decode_ctx_new(&p->limits);
	if (!ctx)
		_exit(1);
#if HAVE_SECCOMP
	if (p->seccomp && !WORKER_SANITIZED && install_filter() != 0)
		_exit(1);
#endif
	for (;;) {
		struct worker_req req;
		struct worker_rep rep;
		ssize_t n = recv(ctl, &req, sizeof(req), 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n != (ssize_t)sizeof(req))
			_exit(0); /* the daemon closed the socket, or garbage */
		memset(&rep, 0, sizeof(rep));
		rep.seq = req.seq;
		run_job(ctx, region, p, &req, &rep);
		rep.err[sizeof(rep.err) - 1] = '\0';
		/* Too little CPU left for another job: retire, the pool forks a fresh worker. */
		bool retire = cpu_used() + p->cpu_seconds > cpu_limit;
		if (retire)
			rep.flags |= WORKER_REP_RETIRE;
		if (send(ctl, &rep, sizeof(rep), MSG_NOSIGNAL) != (ssize_t)sizeof(rep) || retire)
			_exit(0);
		decode_ctx_trim(ctx, WORKER_KEEP_SCRATCH);
	}
}

static void spawn(int sock, uint32_t slot, const struct worker_params *p)
{
	struct zygote_rep rep = { slot, 0, 0, 0 };
	int sv[2] = { -1, -1 }, memfd = -1, pidfd = -1;
	pid_t self = getpid();

	memfd = memfd_create("dmcache-decode", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, (off_t)worker_region_size(p)) != 0 ||
	    socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
		rep.err = -errno;
		goto reply;
	}
	/* _Fork: no pthread_atfork handlers. Those registered in the daemon (libuv recreates
	 * its signal lock pipe) would close descriptors that are ours by now. The zygote is
	 * single-threaded, so the child may allocate. */
	pid_t pid = _Fork();
	if (pid < 0) {
		rep.err = -errno;
		goto reply;
	}
	if (pid == 0) {
		close(sock);
		close(sv[0]);
		worker_main(sv[1], memfd, self, p);
	}
	rep.pid = pid;
#ifdef SYS_pidfd_open
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
#endif
reply:;
	int fds[3] = { sv[0], memfd, pidfd };
	rep.nfds = rep.err ? 0 : pidfd >= 0 ? 3 : 2;
	char cbuf[CMSG_SPACE(sizeof(fds))];
	struct iovec iov = { &rep, sizeof(rep) };
	struct msghdr mh;
	memset(&mh, 0, sizeof(mh));
	memset(cbuf, 0, sizeof(cbuf));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	if (rep.nfds > 0) {
		mh.msg_control = cbuf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)rep.nfds);
		struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)rep.nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)rep.nfds);
	}
	if (sendmsg(sock, &mh, MSG_NOSIGNAL) < 0)
		_exit(0);
	for (int i = 0; i < 3; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	if (sv[1] >= 0)
		close(sv[1]);
}

void zygote_main(int sock, const struct worker_params *p, pid_t parent)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(0);
	prctl(PR_SET_NAME, "dmcache-zygote");
	/* A root daemon's zygote keeps only what a worker needs to drop everything, in its
	 * bounding set too (so that not even an exec could bring the rest back). */
	if (p->drop_user) {
		uint64_t keep = (1ull << CAP_SETUID) | (1ull << CAP_SETGID) | (1ull << CAP_SETPCAP);
		for (unsigned long cap = 0; cap < 64; cap++)
			if (!(keep & (1ull << cap)) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 &&
			    errno == EINVAL)
				break;
		set_caps(keep);
		prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	}
	reset_signals();
	signal(SIGCHLD, SIG_IGN); /* workers are reaped by the kernel; kills use pidfds */
	if (sock != 3) {
		if (dup2(sock, 3) < 0)
			_exit(1);
		sock = 3;
	}
	close_from(4);
	for (;;) {
		struct zygote_req req;
		ssize_t n = recv(sock, &req, sizeof(req), 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n != (ssize_t)sizeof(req))
			_exit(0);
		spawn(sock, req.slot, p);
	}
}
