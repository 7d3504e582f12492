/*
 * decode_pool: sandboxed decoder worker processes on the daemon's libuv loop.
 *
 * Decoders (decode.h) run in pre-forked worker processes, never in the daemon: a crash,
 * a hang or a memory bomb costs one worker, which is killed and replaced within a second;
 * the job gets DMC_E_DECODE_FAILED naming the resource, other jobs go on.
 *
 * Processes
 *   decode_pool_start() forks a *zygote*: a small single-threaded process that forks every
 *   worker, the first ones and the replacements. The zygote is forked from the daemon at
 *   start, so REQUIREMENT: call decode_pool_start() before the daemon holds any secret
 *   (API keys, client data): everything the daemon has in memory at that moment is copied
 *   into the zygote and every worker. Replacements forked later come from the zygote, whose
 *   memory never sees a secret. The zygote closes every inherited descriptor but stdio.
 *   If the daemon dies, the zygote dies (PR_SET_PDEATHSIG), and the workers with it.
 *
 * A worker
 *   - owns one memfd region [input | output | metadata], mapped once in the worker and once
 *     in the daemon, reused for every job: the daemon copies the encoded bytes in, the
 *     worker decodes straight into the output area, the daemon reads the tensor from there.
 *     Nothing bulky crosses the control socket (a SOCK_SEQPACKET pair with fixed-size
 *     request and reply structs: both ends are forks of one binary);
 *   - owns nothing: before it reads any input it empties its capability sets and bounding
 *     set and, when the daemon runs as root (drop_user), switches to an unprivileged user
 *     (setgroups(0), setresgid, setresuid); no_new_privs, not dumpable;
 *   - runs with RLIMIT_AS (address space), RLIMIT_CPU (a budget of WORKER_CPU_JOBS jobs'
 *     cpu_seconds, set once: a worker short of cpu_seconds after a job retires and is
 *     replaced), RLIMIT_FSIZE 0, RLIMIT_CORE 0, and a seccomp allow-list (HAVE_SECCOMP)
 *     that also denies setrlimit/prlimit64 and signals to any other process; sanitizer
 *     builds skip RLIMIT_AS and the filter, whose runtimes need address space and
 *     syscalls a decoder does not;
 *   - tunes glibc malloc for large buffers (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD
 *     256 MiB, M_ARENA_MAX 1): freed image buffers are reused instead of being unmapped
 *     and faulted in again (measured: up to 3x on GDCM decodes).
 *
 * Failure detection (documented choice): no SIGCHLD handling. A worker's death shows as
 * end-of-file on its control socket (uv_poll); the per-job deadline is a uv_timer; kills go
 * through a pidfd (pidfd_send_signal), so a recycled pid is never signalled.
 *
 * Bad inputs: a job whose worker crashed or timed out counts one failure against its
 * resource key. The job fails at once (no silent retry); a later submission of the same
 * key is tried once more, and after two failures decode_pool_submit() refuses the key with
 * -DMC_E_DECODE_FAILED ("retried at most once"). The table is bounded (oldest forgotten).
 *
 * Threads: every function must be called on the loop's thread.
 */
#ifndef DMC_DECODE_POOL_H
#define DMC_DECODE_POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <uv.h>

#include "decode.h"
#include "hist.h"

#ifdef __cplusplus
extern "C" {
#endif

struct decode_pool_config {
	unsigned workers;          /* 0: one per online CPU */
	size_t in_bytes;           /* input area per worker; 0: 256 MiB */
	size_t out_bytes;          /* output area per worker; 0: limits.max_decode_bytes */
	size_t meta_bytes;         /* metadata area per worker; 0: limits.max_meta_bytes */
	uint64_t mem_bytes;        /* RLIMIT_AS per worker; 0: region + 2 x max_decode + 512 MiB */
	unsigned cpu_seconds;      /* RLIMIT_CPU per job; 0: 10 */
	uint64_t timeout_ms;       /* wall-clock deadline per job; 0: 10000 */
	unsigned quarantine_max;   /* remembered bad resource keys; 0: 4096 */
	bool no_seccomp;           /* leave the filter out (debugging only) */
	/* A root daemon's workers switch to this uid and gid (resolved by the caller, never
	 * in a worker; uid 0 is refused). Without drop_user they keep the daemon's uid. */
	bool drop_user;
	uid_t worker_uid;
	gid_t worker_gid;
	struct decode_limits limits; /* zero fields: defaults */
};

struct decode_job;
typedef void (*decode_done_cb)(struct decode_job *job);

/*
 * One decode request. The caller owns the struct, fills the "in" fields and keeps it (and
 * `in` and `resource`) alive and unchanged until on_done has been called.
 */
struct decode_job {
	/* in */
	const void *in;            /* borrowed: the encoded resource */
	size_t in_len;
	struct decode_opts opts;
	struct dmc_policy pol;     /* the uniformity policy (policy.h); zero: none */
	bool want_meta;
	/*
	 * Probe only: the worker runs decode_probe() (and decode_meta() with want_meta) and
	 * decodes no pixels; desc comes back filled (src_frames: the item's frame count, for
	 * frame-by-frame serving; nbytes: what a decode with these opts would write, which
	 * may exceed the output area) and out stays NULL. Same sandbox, limits, deadline,
	 * quarantine and crash handling as a decode. Cost: headers only for JPEG, PNG and
	 * .nii; DICOM is parsed by GDCM without decoding pixels; a .nii.gz is inflated whole
	 * (its length is checked against the header).
	 */
	bool probe_only;
	const char *resource;      /* borrowed: names the input in errors; the quarantine key */
	void *data;                /* the caller's */

	/* out, valid inside on_done */
	int status;                /* 0, or a negated enum dmc_error / errno */
	struct decode_desc desc;   /* when status == 0 */
	const void *out;           /* the tensor (desc.nbytes), in the worker's region; NULL
				    * for probe_only */
	const char *meta;          /* NUL-terminated JSON (want_meta), in the worker's region */
	size_t meta_len;
	char err[320];             /* "'resource': reason" when status < 0 */
	unsigned failures;         /* crashes and timeouts this resource has caused so far */
	pid_t worker_pid;          /* the worker that ran the job (tests) */

	/* private */
	struct decode_job *next_;
	decode_done_cb on_done_;
	uint64_t seq_;
	void *worker_;
	uint64_t started_ns_; /* uv_hrtime() when it went to a worker; 0 while queued */
};

struct decode_pool;

/* Fills *cfg with the defaults (every field as documented above, limits included). */
void decode_pool_config_default(struct decode_pool_config *cfg);

/*
 * Forks the zygote and the workers, and registers the pool on `loop`. Returns 0 with
 * *ret_pool set, or a negative errno (nothing left behind). Workers become ready
 * asynchronously; jobs submitted meanwhile wait in the queue.
 */
int decode_pool_start(uv_loop_t *loop, const struct decode_pool_config *cfg,
		      struct decode_pool **ret_pool);
/* The same, with a message in `err` when it fails (a worker user that cannot be used). */
int decode_pool_start_err(uv_loop_t *loop, const struct decode_pool_config *cfg,
			  struct decode_pool **ret_pool, char *err, size_t errlen);

/*
 * Queues `job`; on_done is called exactly once, later, on the loop. Returns 0, or refuses
 * the job at once (on_done not called): -DMC_E_DECODE_FAILED for a quarantined resource,
 * -DMC_E_LIMIT_EXCEEDED when the input does not fit the input area, -DMC_E_CANCELLED when
 * the pool is stopping; job->err says why.
 */
int decode_pool_submit(struct decode_pool *pool, struct decode_job *job, decode_done_cb on_done);

/*
 * Stops the pool: queued and running jobs end with -DMC_E_CANCELLED (their on_done runs
 * from here), workers and the zygote are killed, and the pool frees itself once its
 * handles are closed (keep running the loop). `pool` must not be used afterwards.
 */
void decode_pool_stop(struct decode_pool *pool);

struct decode_pool_stats {
	unsigned workers, idle, busy, spawning;
	uint64_t queued, done, failed, crashes, timeouts, respawns, refused;
};
void decode_pool_stats(const struct decode_pool *pool, struct decode_pool_stats *ret);

/*
 * Time in a worker of the decodes that succeeded (probes are not decodes), from the job's
 * dispatch to its reply on the loop, by the format and codec the worker found (hist.h).
 * NULL for a format or codec out of range. Loop thread.
 */
const struct hist *decode_pool_hist(const struct decode_pool *pool, enum decode_format format,
				    enum decode_codec codec);

/* The pids of the live workers (for tests and status). Returns how many were written. */
unsigned decode_pool_worker_pids(const struct decode_pool *pool, pid_t *pids, unsigned max);

#ifdef __cplusplus
}
#endif

#endif
