/*
 * decode_worker: the processes behind decode_pool.c, the zygote and the decoder workers.
 *
 * The messages below travel over SOCK_SEQPACKET socketpairs between forks of one binary, so
 * they are plain structs (one message per struct), never seen by another program.
 */
#ifndef DMC_DECODE_WORKER_H
#define DMC_DECODE_WORKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "decode.h"

/* What the zygote and every worker are configured with (copied at fork). */
struct worker_params {
	size_t in_bytes, out_bytes, meta_bytes;
	uint64_t mem_bytes;   /* RLIMIT_AS */
	unsigned cpu_seconds; /* RLIMIT_CPU budget per job */
	bool seccomp;
	/* Root daemon: every worker switches to worker_uid/gid before it reads any input. */
	bool drop_user;
	uid_t worker_uid;
	gid_t worker_gid;
	struct decode_limits limits;
};

/*
 * RLIMIT_CPU is set once per worker (the seccomp filter denies setrlimit and prlimit64):
 * a budget of WORKER_CPU_JOBS x cpu_seconds. A worker left with less than cpu_seconds after
 * a job says so in its reply (WORKER_REP_RETIRE) and exits; the pool replaces it.
 */
#define WORKER_CPU_JOBS 2u

/* daemon -> zygote: fork a worker for `slot`. */
struct zygote_req {
	uint32_t slot;
};

/* zygote -> daemon, with SCM_RIGHTS [control socket, memfd, pidfd] when err == 0. */
struct zygote_rep {
	uint32_t slot;
	int32_t pid;
	int32_t err;     /* negative errno when the fork failed */
	int32_t nfds;    /* 3, or 2 without pidfd support */
};

/* daemon -> worker: decode the in_len bytes at the start of the region. */
struct worker_req {
	uint64_t seq;
	uint64_t in_len;
	uint32_t flags, frame, dtype;
	uint32_t want_meta;
	uint32_t probe_only; /* decode_probe() (and metadata) only: no pixels, no output */
	uint32_t pad_;
	struct dmc_policy pol; /* applied by policy_run() (policy.h) */
};

/* worker -> daemon. The tensor is at region + in_bytes, the metadata after the tensor area. */
#define WORKER_REP_RETIRE 1u /* the worker exits after this reply: not a crash */
struct worker_rep {
	uint64_t seq;
	int32_t status;
	uint32_t flags; /* WORKER_REP_* */
	struct decode_desc desc;
	uint64_t meta_len;
	char err[256];
};

/* The region of a worker: input, output, metadata. */
static inline size_t worker_region_size(const struct worker_params *p)
{
	return p->in_bytes + p->out_bytes + p->meta_bytes;
}

/*
 * What a worker does before it reads a byte of input, in this order: clears the capability
 * bounding set (PR_CAPBSET_DROP up to the last valid capability; needs CAP_SETPCAP, so only
 * a root daemon's workers have one to clear), then with drop_user: setgroups(0), setresgid,
 * setresuid to the worker user (checked); then empties its capability sets (capset), sets
 * no_new_privs and makes itself not dumpable. Returns 0, or a negative errno with *what
 * naming the step that failed. decode_pool_start() runs it once in a throw-away child to
 * refuse a configuration the workers could not honour.
 */
int worker_drop_privileges(const struct worker_params *p, const char **what);

/* Runs the zygote on `sock` (the daemon's end is elsewhere); `parent` is the daemon's pid.
 * Never returns. */
void zygote_main(int sock, const struct worker_params *p, pid_t parent) __attribute__((noreturn));

#endif
