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
	struct decode_limits limits;
};

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
};

/* worker -> daemon. The tensor is at region + in_bytes, the metadata after the tensor area. */
struct worker_rep {
	uint64_t seq;
	int32_t status;
	uint32_t pad_;
	struct decode_desc desc;
	uint64_t meta_len;
	char err[256];
};

/* The region of a worker: input, output, metadata. */
static inline size_t worker_region_size(const struct worker_params *p)
{
	return p->in_bytes + p->out_bytes + p->meta_bytes;
}

/* Runs the zygote on `sock` (the daemon's end is elsewhere); `parent` is the daemon's pid.
 * Never returns. */
void zygote_main(int sock, const struct worker_params *p, pid_t parent) __attribute__((noreturn));

#endif
