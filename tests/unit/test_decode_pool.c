/*
 * Unit tests of the decoder worker pool (daemon/decode_pool.c, decode_worker.c), linked with
 * the test-hook build: inputs "DMCTEST:spin", "DMCTEST:sleep:N", "DMCTEST:segv" and
 * "DMCTEST:syscall" make a worker hang, stall, crash or break the seccomp filter on purpose.
 * Covers docs/reliability.md X2 (size bombs end in < 1 s) and X3 (crash/hang: the job gets
 * DMC_E_DECODE_FAILED, the worker is replaced within 1 s, other jobs succeed).
 */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <uv.h>

#include "config.h"
#include "decode.h"
#include "decode_pool.h"
#include "task.h"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- a tiny NIfTI-1 image as a known-good input ---- */

static uint8_t *nifti(int nx, int ny, size_t *ret_len)
{
	size_t len = 352 + (size_t)nx * ny * 2;
	uint8_t *p = calloc(1, len);
	uint32_t hs = 348;
	memcpy(p, &hs, 4);
	int16_t dim[8] = { 2, (int16_t)nx, (int16_t)ny, 1, 1, 1, 1, 1 };
	memcpy(p + 40, dim, sizeof(dim));
	int16_t dt = 4, bp = 16;
	memcpy(p + 70, &dt, 2);
	memcpy(p + 72, &bp, 2);
	float vox = 352;
	memcpy(p + 108, &vox, 4);
	memcpy(p + 344, "n+1", 4);
	for (int i = 0; i < nx * ny; i++) {
		int16_t v = (int16_t)(i * 7 - 100);
		memcpy(p + 352 + 2 * i, &v, 2);
	}
	*ret_len = len;
	return p;
}

/* ---- a multi-frame DICOM (explicit VR little endian), uint16 MONOCHROME2 ---- */

struct buf {
	uint8_t *p;
	size_t len;
};

static void put(struct buf *b, const void *v, size_t n)
{
	uint8_t *p = realloc(b->p, b->len + n + 1);
	if (!p)
		abort();
	b->p = p;
	memcpy(b->p + b->len, v, n);
	b->len += n;
}

static void put16(struct buf *b, uint16_t v)
{
	uint8_t x[2] = { (uint8_t)v, (uint8_t)(v >> 8) };
	put(b, x, 2);
}

static void put32(struct buf *b, uint32_t v)
{
	put16(b, (uint16_t)v);
	put16(b, (uint16_t)(v >> 16));
}

/* One element; n must be even (callers pad their strings). */
static void elem(struct buf *b, uint16_t g, uint16_t e, const char *vr, const void *v,
		 uint32_t n)
{
	put16(b, g);
	put16(b, e);
	put(b, vr, 2);
	if (!strcmp(vr, "OB") || !strcmp(vr, "OW")) {
		put16(b, 0);
		put32(b, n);
	} else {
		put16(b, (uint16_t)n);
	}
	put(b, v, n);
}

static void elem_us(struct buf *b, uint16_t e, uint16_t v)
{
	uint8_t x[2] = { (uint8_t)v, (uint8_t)(v >> 8) };
	elem(b, 0x0028, e, "US", x, 2);
}

static uint8_t *dicom_frames(uint16_t frames, uint16_t rows, uint16_t cols, size_t *ret_len)
{
	static const char ts[] = "1.2.840.10008.1.2.1"; /* 20 bytes with the NUL pad */
	static const char sop[] = "1.2.840.10008.5.1.4.1.1.7"; /* 26 bytes */
	struct buf b = { NULL, 0 }, meta = { NULL, 0 };
	uint8_t pre[128] = { 0 };
	char nf[8];
	put(&b, pre, sizeof(pre));
	put(&b, "DICM", 4);
	elem(&meta, 0x0002, 0x0010, "UI", ts, sizeof(ts));
	uint8_t gl[4] = { (uint8_t)meta.len, (uint8_t)(meta.len >> 8), 0, 0 };
	elem(&b, 0x0002, 0x0000, "UL", gl, 4);
	put(&b, meta.p, meta.len);
	free(meta.p);
	elem(&b, 0x0008, 0x0016, "UI", sop, sizeof(sop));
	elem_us(&b, 0x0002, 1);
	elem(&b, 0x0028, 0x0004, "CS", "MONOCHROME2 ", 12);
	int n = snprintf(nf, sizeof(nf), "%u", frames);
	if (n & 1)
		nf[n++] = ' ';
	elem(&b, 0x0028, 0x0008, "IS", nf, (uint32_t)n);
	elem_us(&b, 0x0010, rows);
	elem_us(&b, 0x0011, cols);
	elem_us(&b, 0x0100, 16);
	elem_us(&b, 0x0101, 16);
	elem_us(&b, 0x0102, 15);
	elem_us(&b, 0x0103, 0);
	size_t npx = (size_t)frames * rows * cols;
	uint16_t *px = malloc(npx * 2);
	if (!px)
		abort();
	for (size_t i = 0; i < npx; i++)
		px[i] = (uint16_t)(i * 31 + 7);
	elem(&b, 0x7fe0, 0x0010, "OW", px, (uint32_t)(npx * 2));
	free(px);
	*ret_len = b.len;
	return b.p;
}

/* ---- the loop ---- */

struct done {
	int calls;
	int status;
	char err[320];
	double t;
	struct decode_desc desc;
	uint8_t out[4096];
	size_t out_len;
	unsigned failures;
	bool meta_ok;
	bool out_null;
	long long meta_frames;
};

static void on_done(struct decode_job *job)
{
	struct done *d = job->data;
	d->calls++;
	d->status = job->status;
	d->t = now_s();
	d->failures = job->failures;
	memcpy(d->err, job->err, sizeof(d->err));
	if (job->status == 0) {
		d->desc = job->desc;
		d->out_null = job->out == NULL;
		if (job->out) {
			d->out_len = job->desc.nbytes < sizeof(d->out) ? (size_t)job->desc.nbytes : 0;
			memcpy(d->out, job->out, d->out_len);
		}
		if (job->meta) {
			json_t *j = json_loads(job->meta, 0, NULL);
			d->meta_ok = j && json_is_object(json_object_get(j, "header"));
			d->meta_frames = json_integer_value(json_object_get(j, "frames"));
			json_decref(j);
		}
	}
}

static void on_tick(uv_timer_t *t)
{
	(void)t;
}

/* Runs the loop until pred() or `secs` pass; returns whether pred() held. */
/*
 * Wall-time bounds here never measure speed: each tells the mechanism under test from the
 * slower one it must beat (a job's own sleep, a far deadline, the CPU limit). LOADED(t) is
 * half of that slower time, room for a machine loaded by the other suites.
 */
#define LOADED(slower_s) ((slower_s) / 2)

static bool run_until(uv_loop_t *loop, bool (*pred)(void *), void *arg, double secs)
{
	uv_timer_t tick;
	uv_timer_init(loop, &tick);
	uv_timer_start(&tick, on_tick, 5, 5);
	double end = now_s() + secs;
	bool ok;
	while (!(ok = pred(arg)) && now_s() < end)
		uv_run(loop, UV_RUN_ONCE);
	uv_close((uv_handle_t *)&tick, NULL);
	uv_run(loop, UV_RUN_NOWAIT);
	return ok;
}

static struct decode_pool *g_pool;

static bool all_idle(void *arg)
{
	struct decode_pool_stats st;
	(void)arg;
	decode_pool_stats(g_pool, &st);
	return st.idle == st.workers;
}

static bool done_pred(void *arg)
{
	return ((struct done *)arg)->calls > 0;
}

struct many {
	struct done *d;
	int n;
};

static bool all_done(void *arg)
{
	struct many *m = arg;
	for (int i = 0; i < m->n; i++)
		if (m->d[i].calls == 0)
			return false;
	return true;
}

static int start_out(uv_loop_t *loop, unsigned workers, uint64_t timeout_ms, unsigned cpu_s,
		     size_t out_bytes)
{
	struct decode_pool_config cfg;
	decode_pool_config_default(&cfg);
	cfg.workers = workers;
	cfg.in_bytes = 1u << 20;
	cfg.out_bytes = out_bytes;
	cfg.meta_bytes = 64u << 10;
	cfg.limits.max_decode_bytes = 8u << 20;
	cfg.limits.max_meta_bytes = 60u << 10;
	cfg.timeout_ms = timeout_ms;
	cfg.cpu_seconds = cpu_s;
	uv_loop_init(loop);
	int r = decode_pool_start(loop, &cfg, &g_pool);
	if (r == 0 && !run_until(loop, all_idle, NULL, 5.0))
		r = -ETIMEDOUT;
	return r;
}

static int start(uv_loop_t *loop, unsigned workers, uint64_t timeout_ms, unsigned cpu_s)
{
	return start_out(loop, workers, timeout_ms, cpu_s, 8u << 20);
}

static void stop(uv_loop_t *loop)
{
	decode_pool_stop(g_pool);
	uv_run(loop, UV_RUN_DEFAULT);
	uv_loop_close(loop);
	g_pool = NULL;
}

static void job_init(struct decode_job *job, struct done *d, const void *in, size_t len,
		     const char *resource)
{
	memset(job, 0, sizeof(*job));
	memset(d, 0, sizeof(*d));
	job->in = in;
	job->in_len = len;
	job->resource = resource;
	job->data = d;
}

#define HOOK(s) s, sizeof(s) - 1

/* ---- tests ---- */

TEST(decodes_like_in_process)
{
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 2, 5000, 10), 0);
	size_t len;
	uint8_t *in = nifti(9, 7, &len);
	struct decode_job job;
	struct done d;
	job_init(&job, &d, in, len, "res-ok");
	job.want_meta = true;
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, 0);
	ASSERT(d.meta_ok);
	ASSERT_GT(job.worker_pid, 0);
	ASSERT_NE(job.worker_pid, getpid());

	/* The same bytes as an in-process decode. */
	struct decode_ctx *ctx = decode_ctx_new(NULL);
	struct decode_desc dd;
	uint8_t ref[4096];
	char err[256];
	ASSERT_EQ(decode_probe(ctx, in, len, NULL, &dd, err, sizeof(err)), 0);
	ASSERT_EQ(decode_run(ctx, in, len, NULL, ref, sizeof(ref), err, sizeof(err)), 0);
	ASSERT_UINT_EQ(d.desc.nbytes, dd.nbytes);
	ASSERT_EQ(d.out_len, dd.nbytes);
	ASSERT_MEM_EQ(d.out, ref, dd.nbytes);
	decode_ctx_free(ctx);

	/* A corrupt input is an ordinary failure, no crash and no quarantine. */
	in[40] = 9; /* dim[0] */
	job_init(&job, &d, in, len, "res-bad");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
	ASSERT(strstr(d.err, "'res-bad'") != NULL);
	ASSERT_EQ(d.failures, 0);
	struct decode_pool_stats st;
	decode_pool_stats(g_pool, &st);
	ASSERT_EQ(st.crashes, 0);
	free(in);
	stop(&loop);
}

static pid_t g_old_pid;

static bool replaced(void *arg)
{
	pid_t pids[8];
	(void)arg;
	unsigned n = decode_pool_worker_pids(g_pool, pids, 8);
	struct decode_pool_stats st;
	decode_pool_stats(g_pool, &st);
	if (n != st.workers || st.idle != st.workers)
		return false;
	for (unsigned i = 0; i < n; i++)
		if (pids[i] == g_old_pid)
			return false;
	return true;
}

TEST(killed_worker_is_replaced)
{
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 2, 10000, 10), 0);
	int sigs[2] = { SIGKILL, SIGSEGV };
	for (int k = 0; k < 2; k++) {
		struct decode_job job;
		struct done d;
		job_init(&job, &d, HOOK("DMCTEST:sleep:5000"), "res-killed");
		ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
		ASSERT_GT(job.worker_pid, 0);
		g_old_pid = job.worker_pid;
		usleep(50000);
		double t0 = now_s();
		ASSERT_EQ(kill(job.worker_pid, sigs[k]), 0);
		ASSERT(run_until(&loop, done_pred, &d, 2.5));
		ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
		ASSERT(strstr(d.err, "'res-killed'") != NULL);
		ASSERT(strstr(d.err, "crashed") != NULL);
		/* well before the job's own 5 s end (LOADED below) */
		ASSERT_LT(d.t - t0, LOADED(5.0));
		ASSERT(run_until(&loop, replaced, NULL, 2.5));
		ASSERT_LT(now_s() - t0, LOADED(5.0));
	}
	/* The next jobs succeed. */
	size_t len;
	uint8_t *in = nifti(4, 4, &len);
	struct decode_job jobs[4];
	struct done ds[4];
	for (int i = 0; i < 4; i++) {
		job_init(&jobs[i], &ds[i], in, len, "res-next");
		ASSERT_EQ(decode_pool_submit(g_pool, &jobs[i], on_done), 0);
	}
	struct many m = { ds, 4 };
	ASSERT(run_until(&loop, all_done, &m, 5.0));
	for (int i = 0; i < 4; i++)
		ASSERT_EQ(ds[i].status, 0);
	/* Two crashes of one resource: refused from now on ("retried at most once"). */
	struct decode_job job;
	struct done d;
	job_init(&job, &d, HOOK("DMCTEST:segv"), "res-killed");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), -DMC_E_DECODE_FAILED);
	ASSERT_EQ(job.failures, 2);
	ASSERT(strstr(job.err, "not retried") != NULL);
	ASSERT_EQ(d.calls, 0);
	struct decode_pool_stats st;
	decode_pool_stats(g_pool, &st);
	ASSERT_EQ(st.crashes, 2);
	ASSERT_EQ(st.refused, 1);
	free(in);
	stop(&loop);
}

TEST(hang_is_killed_at_deadline_others_unaffected)
{
	/* The deadline is every job's: 1 s, so that a fine job on a loaded machine (a CI run's
	 * other tests beside it) does not reach it too (300 ms once did) */
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 2, 1000, 10), 0);
	size_t len;
	uint8_t *in = nifti(16, 16, &len);
	struct decode_job spin, jobs[6];
	struct done dspin, ds[6];
	job_init(&spin, &dspin, HOOK("DMCTEST:spin"), "res-spin");
	double t0 = now_s();
	ASSERT_EQ(decode_pool_submit(g_pool, &spin, on_done), 0);
	g_old_pid = spin.worker_pid;
	for (int i = 0; i < 6; i++) {
		job_init(&jobs[i], &ds[i], in, len, "res-fine");
		ASSERT_EQ(decode_pool_submit(g_pool, &jobs[i], on_done), 0);
	}
	struct many m = { ds, 6 };
	ASSERT(run_until(&loop, all_done, &m, 5.0));
	for (int i = 0; i < 6; i++) {
		if (ds[i].status != 0)
			printf("# fine job %d: %s\n", i, ds[i].err);
		ASSERT_EQ(ds[i].status, 0);
	}
	ASSERT(run_until(&loop, done_pred, &dspin, 5.0));
	double took = dspin.t - t0;
	ASSERT_EQ(dspin.status, -DMC_E_DECODE_FAILED);
	ASSERT(strstr(dspin.err, "longer than 1000 ms") != NULL);
	ASSERT(took >= 0.99);
	ASSERT(took < LOADED(10.0)); /* the 1 s deadline, not the 10 s CPU limit */
	ASSERT_EQ(dspin.failures, 1);
	ASSERT(run_until(&loop, replaced, NULL, 2.5));
	struct decode_pool_stats st;
	decode_pool_stats(g_pool, &st);
	ASSERT_EQ(st.timeouts, 1);
	free(in);
	stop(&loop);
}

TEST(cpu_limit_ends_a_cpu_bomb)
{
	/* The wall-clock deadline is far; RLIMIT_CPU (1 s per job) kills the worker first. */
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 1, 20000, 1), 0);
	struct decode_job job;
	struct done d;
	job_init(&job, &d, HOOK("DMCTEST:spin"), "res-cpu");
	double t0 = now_s();
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 15.0));
	ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
	/* RLIMIT_CPU (SIGKILL at the worker's budget of WORKER_CPU_JOBS x 1 s), not the 20 s
	 * deadline; CPU time is 2-3 s, wall time depends on the load. */
	ASSERT(strstr(d.err, "crashed") != NULL);
	ASSERT(d.t - t0 < 15.0);
	stop(&loop);
}

TEST(size_bomb_and_oversized_input)
{
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 1, 5000, 10), 0);
	size_t len;
	uint8_t *in = nifti(4, 4, &len);
	int16_t big = 32767;
	memcpy(in + 42, &big, 2);
	memcpy(in + 44, &big, 2);
	struct decode_job job;
	struct done d;
	job_init(&job, &d, in, len, "res-bomb");
	double t0 = now_s();
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 2.5));
	ASSERT_EQ(d.status, -DMC_E_LIMIT_EXCEEDED);
	ASSERT_LT(d.t - t0, LOADED(5.0)); /* refused, not ended by the 5 s deadline */
	free(in);

	uint8_t *huge = calloc(1, (2u << 20));
	job_init(&job, &d, huge, 2u << 20, "res-huge");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), -DMC_E_LIMIT_EXCEEDED);
	free(huge);
	stop(&loop);
}

TEST(seccomp_filter_kills_forbidden_syscalls)
{
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 1, 5000, 10), 0);
	struct decode_job job;
	struct done d;
	job_init(&job, &d, HOOK("DMCTEST:syscall"), "res-socket");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 3.0));
	ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
	if (HAVE_SECCOMP && !SANITIZED)
		ASSERT(strstr(d.err, "crashed") != NULL); /* SIGSYS */
	else
		ASSERT(strstr(d.err, "test hook") != NULL); /* no filter in this build */
	stop(&loop);
}

/* ---- docs/reliability.md S13: the workers own nothing ---- */

/* A pool whose workers switch to nobody (65534) when the test runs as root. */
static int start_dropped(uv_loop_t *loop, unsigned workers, unsigned cpu_s, uint64_t timeout_ms)
{
	struct decode_pool_config cfg;
	decode_pool_config_default(&cfg);
	cfg.workers = workers;
	cfg.in_bytes = 1u << 20;
	cfg.out_bytes = 8u << 20;
	cfg.meta_bytes = 64u << 10;
	cfg.limits.max_decode_bytes = 8u << 20;
	cfg.limits.max_meta_bytes = 60u << 10;
	cfg.timeout_ms = timeout_ms;
	cfg.cpu_seconds = cpu_s;
	cfg.drop_user = geteuid() == 0;
	cfg.worker_uid = 65534;
	cfg.worker_gid = 65534;
	uv_loop_init(loop);
	int r = decode_pool_start(loop, &cfg, &g_pool);
	if (r == 0 && !run_until(loop, all_idle, NULL, 5.0))
		r = -ETIMEDOUT;
	return r;
}

/* The value of field `key` in /proc/PID/status, or "" */
static const char *status_field(pid_t pid, const char *key, char *buf, size_t len)
{
	char path[64], line[256];
	size_t klen = strlen(key);
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	buf[0] = '\0';
	FILE *f = fopen(path, "r");
	if (!f)
		return buf;
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
			char *v = line + klen + 1;
			v += strspn(v, " \t");
			v[strcspn(v, "\n")] = '\0';
			snprintf(buf, len, "%s", v);
			break;
		}
	}
	fclose(f);
	return buf;
}

TEST(workers_own_nothing)
{
	uv_loop_t loop;
	char v[128];
	pid_t pids[2];
	ASSERT_EQ(start_dropped(&loop, 2, 10, 5000), 0);
	ASSERT_EQ(decode_pool_worker_pids(g_pool, pids, 2), 2);
	for (int i = 0; i < 2; i++) {
		/* The pool counts a worker idle once the spawner has forked it; the worker drops
		 * its uid and capabilities before it reads its first job, which on a loaded
		 * machine can be a moment later: wait for the uid (up to 5 s), then check all. */
		for (int t = 0; geteuid() == 0 && t < 500 &&
				strcmp(status_field(pids[i], "Uid", v, sizeof(v)),
				       "65534\t65534\t65534\t65534") != 0; t++)
			usleep(10000);
		if (geteuid() == 0) {
			ASSERT_STR_EQ(status_field(pids[i], "Uid", v, sizeof(v)),
				      "65534\t65534\t65534\t65534");
			ASSERT_STR_EQ(status_field(pids[i], "Gid", v, sizeof(v)),
				      "65534\t65534\t65534\t65534");
			ASSERT_STR_EQ(status_field(pids[i], "Groups", v, sizeof(v)), "");
			ASSERT_STR_EQ(status_field(pids[i], "CapBnd", v, sizeof(v)),
				      "0000000000000000");
		}
		ASSERT_STR_EQ(status_field(pids[i], "CapEff", v, sizeof(v)), "0000000000000000");
		ASSERT_STR_EQ(status_field(pids[i], "CapPrm", v, sizeof(v)), "0000000000000000");
		ASSERT_STR_EQ(status_field(pids[i], "CapInh", v, sizeof(v)), "0000000000000000");
		ASSERT_STR_EQ(status_field(pids[i], "NoNewPrivs", v, sizeof(v)), "1");
	}
	/* and they still decode */
	size_t len;
	uint8_t *in = nifti(9, 7, &len);
	struct decode_job job;
	struct done d;
	job_init(&job, &d, in, len, "res-dropped");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, 0);
	ASSERT_EQ(d.out_len, 9 * 7 * 2);
	free(in);
	stop(&loop);
}

/*
 * The soft RLIMIT_NOFILE of `pid`, from /proc/PID/limits (readable by anyone): prlimit()
 * on another process needs CAP_SYS_RESOURCE or every id of it equal to ours, and in a
 * sandbox without that capability it once answered EPERM for a live worker (state R, its
 * parent the zygote) under load. -1 when the process is gone or the line is missing.
 */
static long nofile_soft(pid_t pid)
{
	char path[64], line[256];
	long soft = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/limits", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, "Max open files", 14) == 0 &&
		    sscanf(line + 14, "%ld", &soft) != 1)
			soft = -1;
	fclose(f);
	return soft;
}

TEST(seccomp_denies_signals_and_limits_aimed_at_others)
{
	/* Worker 0 runs the attack, worker 1 (same uid) is the target: the filter kills the
	 * attacker (SIGSYS) and the target goes on with its limits intact. */
	static const char *const attacks[] = { "kill", "tgkill", "prlimit", "setrlimit" };
	uv_loop_t loop;
	ASSERT_EQ(start_dropped(&loop, 2, 10, 5000), 0);
	for (size_t a = 0; a < sizeof(attacks) / sizeof(attacks[0]); a++) {
		pid_t pids[2];
		ASSERT(run_until(&loop, all_idle, NULL, 5.0));
		ASSERT_EQ(decode_pool_worker_pids(g_pool, pids, 2), 2);
		pid_t target = pids[1];
		long nofile = nofile_soft(target);
		ASSERT_GT(nofile, 0);
		char cmd[64], res[32];
		int n = snprintf(cmd, sizeof(cmd), "DMCTEST:%s:%d", attacks[a], (int)target);
		if (strcmp(attacks[a], "setrlimit") == 0)
			n = snprintf(cmd, sizeof(cmd), "DMCTEST:setrlimit");
		snprintf(res, sizeof(res), "res-attack-%zu", a);
		struct decode_job job;
		struct done d;
		job_init(&job, &d, cmd, (size_t)n, res);
		ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
		ASSERT(run_until(&loop, done_pred, &d, 5.0));
		ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
		ASSERT_NE(job.worker_pid, target);
		if (HAVE_SECCOMP && !SANITIZED)
			ASSERT(strstr(d.err, "crashed") != NULL); /* SIGSYS */
		ASSERT(run_until(&loop, all_idle, NULL, 5.0));
		ASSERT_EQ(decode_pool_worker_pids(g_pool, pids, 2), 2);
		if (HAVE_SECCOMP && !SANITIZED) {
			ASSERT_EQ(pids[1], target); /* alive, never replaced */
			ASSERT_EQ(kill(target, 0), 0);
			ASSERT_EQ(nofile_soft(target), nofile);
		}
	}
	struct decode_pool_stats st;
	decode_pool_stats(g_pool, &st);
	if (HAVE_SECCOMP && !SANITIZED)
		ASSERT_EQ(st.crashes, 4);
	stop(&loop);
}

TEST(worker_retires_when_its_cpu_budget_runs_low)
{
	/* cpu_seconds 1: a worker's lifetime budget is about WORKER_CPU_JOBS (2) s. A job
	 * that leaves less than 1 s of it retires the worker; the next job runs on its replacement and
	 * nothing counts as a crash. */
	uv_loop_t loop;
	ASSERT_EQ(start_dropped(&loop, 1, 1, 60000), 0);
	pid_t first;
	ASSERT_EQ(decode_pool_worker_pids(g_pool, &first, 1), 1);
	struct decode_job job;
	struct done d;
	job_init(&job, &d, HOOK("DMCTEST:burn:2300"), "res-burn");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 60.0)); /* 2.3 s of CPU on a loaded machine */
	if (!strstr(d.err, "test hook"))
		fprintf(stderr, "# %s\n", d.err);
	ASSERT(strstr(d.err, "test hook") != NULL);
	ASSERT(run_until(&loop, all_idle, NULL, 5.0));
	pid_t second;
	ASSERT_EQ(decode_pool_worker_pids(g_pool, &second, 1), 1);
	ASSERT_NE(second, first);
	size_t len;
	uint8_t *in = nifti(4, 4, &len);
	job_init(&job, &d, in, len, "res-after-retire");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, 0);
	ASSERT_EQ(job.worker_pid, second);
	struct decode_pool_stats st;
	decode_pool_stats(g_pool, &st);
	ASSERT_EQ(st.crashes, 0);
	ASSERT_EQ(st.respawns, 1);
	free(in);
	stop(&loop);
}

TEST(probe_only_gives_the_frame_count)
{
	/* An output area of 64 KiB: the item (100 frames of 32 x 32 uint16, 200 KiB) does not
	 * fit, its frames (2 KiB) do. A probe tells the frame count without decoding. */
	enum { F = 100, R = 32, C = 32 };
	uv_loop_t loop;
	ASSERT_EQ(start_out(&loop, 1, 5000, 10, 64u << 10), 0);
	size_t len;
	uint8_t *in = dicom_frames(F, R, C, &len);
	struct decode_job job;
	struct done d;
	job_init(&job, &d, in, len, "res-probe");
	job.probe_only = true;
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, 0);
	ASSERT(d.out_null);
	ASSERT_EQ(d.desc.format, DECODE_FORMAT_DICOM);
	ASSERT_UINT_EQ(d.desc.src_frames, F);
	ASSERT_UINT_EQ(d.desc.frames, F);
	ASSERT_UINT_EQ(d.desc.height, R);
	ASSERT_UINT_EQ(d.desc.width, C);
	ASSERT_UINT_EQ(d.desc.nbytes, (uint64_t)F * R * C * 2);
	ASSERT(!d.meta_ok); /* metadata only when asked for */

	/* With metadata, which carries the frame count too. */
	job_init(&job, &d, in, len, "res-probe");
	job.probe_only = true;
	job.want_meta = true;
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, 0);
	ASSERT(d.out_null);
	ASSERT(d.meta_ok);
	ASSERT_EQ(d.meta_frames, F);

	/* The whole item cannot be decoded into this pool; its last frame can, and equals the
	 * pixels written. */
	job_init(&job, &d, in, len, "res-probe");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, -DMC_E_LIMIT_EXCEEDED);
	job_init(&job, &d, in, len, "res-probe");
	job.opts.flags = DECODE_F_FRAME;
	job.opts.frame = F - 1;
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, 0);
	ASSERT(!d.out_null);
	ASSERT_UINT_EQ(d.desc.nbytes, (uint64_t)R * C * 2);
	ASSERT_UINT_EQ(d.desc.src_frames, F);
	ASSERT_EQ(d.out_len, R * C * 2);
	for (size_t i = 0; i < R * C; i++) {
		uint16_t v;
		memcpy(&v, d.out + 2 * i, 2);
		ASSERT_EQ(v, (uint16_t)(((size_t)(F - 1) * R * C + i) * 31 + 7));
	}

	/* A probe of garbage: an ordinary failure, no crash, no quarantine. */
	static const char junk[] = "certainly not an image, just some bytes";
	job_init(&job, &d, junk, sizeof(junk), "res-junk");
	job.probe_only = true;
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
	ASSERT(strstr(d.err, "'res-junk'") != NULL);
	ASSERT_EQ(d.failures, 0);
	struct decode_pool_stats st;
	decode_pool_stats(g_pool, &st);
	ASSERT_EQ(st.crashes, 0);
	free(in);
	stop(&loop);
}

TEST(crashing_probe_is_handled_like_a_crashing_decode)
{
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 1, 1000, 10), 0);
	for (unsigned k = 1; k <= 2; k++) {
		struct decode_job job;
		struct done d;
		job_init(&job, &d, HOOK("DMCTEST:segv"), "res-probe-crash");
		job.probe_only = true;
		ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
		g_old_pid = job.worker_pid;
		ASSERT(run_until(&loop, done_pred, &d, 3.0));
		ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
		ASSERT(strstr(d.err, "'res-probe-crash'") != NULL);
		ASSERT(strstr(d.err, "crashed") != NULL);
		ASSERT_EQ(d.failures, k);
		ASSERT(run_until(&loop, replaced, NULL, 1.0));
	}
	/* Quarantined after two crashes, for probes and decodes alike. */
	struct decode_job job;
	struct done d;
	job_init(&job, &d, HOOK("DMCTEST:segv"), "res-probe-crash");
	job.probe_only = true;
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), -DMC_E_DECODE_FAILED);
	ASSERT(strstr(job.err, "not retried") != NULL);
	job_init(&job, &d, HOOK("DMCTEST:segv"), "res-probe-crash");
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), -DMC_E_DECODE_FAILED);
	ASSERT_EQ(d.calls, 0);

	/* A hanging probe meets the same deadline as a decode. */
	job_init(&job, &d, HOOK("DMCTEST:spin"), "res-probe-hang");
	job.probe_only = true;
	struct decode_pool_stats st;
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 12.0));
	ASSERT_EQ(d.status, -DMC_E_DECODE_FAILED);
	decode_pool_stats(g_pool, &st);
	ASSERT_EQ(st.crashes + st.timeouts, 3);

	/* The replacement probes a good input. */
	size_t len;
	uint8_t *in = nifti(5, 3, &len);
	job_init(&job, &d, in, len, "res-after");
	job.probe_only = true;
	ASSERT(run_until(&loop, all_idle, NULL, 2.0));
	ASSERT_EQ(decode_pool_submit(g_pool, &job, on_done), 0);
	ASSERT(run_until(&loop, done_pred, &d, 5.0));
	ASSERT_EQ(d.status, 0);
	ASSERT(d.out_null);
	ASSERT_UINT_EQ(d.desc.src_frames, 1);
	ASSERT_UINT_EQ(d.desc.width, 5);
	free(in);
	stop(&loop);
}

TEST(stop_cancels_queued_and_running_jobs)
{
	uv_loop_t loop;
	ASSERT_EQ(start(&loop, 1, 10000, 10), 0);
	struct decode_job jobs[3];
	struct done ds[3];
	for (int i = 0; i < 3; i++) {
		job_init(&jobs[i], &ds[i], HOOK("DMCTEST:sleep:3000"), "res-stop");
		ASSERT_EQ(decode_pool_submit(g_pool, &jobs[i], on_done), 0);
	}
	double t0 = now_s();
	stop(&loop);
	ASSERT_LT(now_s() - t0, LOADED(3.0)); /* cancelled, not waited for (3 s each) */
	for (int i = 0; i < 3; i++) {
		ASSERT_EQ(ds[i].calls, 1);
		ASSERT_EQ(ds[i].status, -DMC_E_CANCELLED);
	}
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(decodes_like_in_process), T(killed_worker_is_replaced),
		  T(hang_is_killed_at_deadline_others_unaffected), T(cpu_limit_ends_a_cpu_bomb),
		  T(size_bomb_and_oversized_input), T(seccomp_filter_kills_forbidden_syscalls),
		  T(probe_only_gives_the_frame_count),
		  T(crashing_probe_is_handled_like_a_crashing_decode),
		  T(stop_cancels_queued_and_running_jobs), T(workers_own_nothing),
		  T(seccomp_denies_signals_and_limits_aimed_at_others),
		  T(worker_retires_when_its_cpu_budget_runs_low));
}
