/*
 * decode_pool: the daemon's side of the decoder workers (see decode_pool.h). The processes
 * themselves are in decode_worker.c.
 */
#include "decode_pool.h"

#include "decode_worker.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define POOL_PREFAULT_BYTES (16u << 20)
#define POOL_RESPAWN_DELAY_MS 100

enum worker_state {
	W_NONE = 0,   /* no process: the zygote could not fork one, or is gone */
	W_SPAWNING,   /* asked the zygote */
	W_IDLE,
	W_BUSY,
	W_RETIRING,   /* replied with WORKER_REP_RETIRE: exits, then is replaced */
	W_CLOSING,    /* dead, its handles closing */
};

struct worker {
	struct decode_pool *pool;
	unsigned slot;
	enum worker_state state;
	int ctl, pidfd;
	pid_t pid;
	uint8_t *region;
	uv_poll_t poll;
	uv_timer_t timer;
	struct decode_job *job;
	bool timed_out;
};

struct bad_key {
	uint64_t hash;
	unsigned failures;
};

struct decode_pool {
	uv_loop_t *loop;
	struct decode_pool_config cfg;
	struct worker_params params;
	pid_t zygote_pid;
	int zsock;
	uv_poll_t zpoll;
	bool zygote_dead;
	struct worker *workers;
	unsigned nworkers;
	struct decode_job *qhead, *qtail;
	uint64_t seq;
	bool stopping;
	unsigned closing; /* uv_close calls whose callback has not run yet */
	struct bad_key *bad;
	unsigned nbad, bad_next;
	struct decode_pool_stats st;
	struct hist decode_time[DECODE_FORMAT_NIFTI + 1][DECODE_CODEC_NIFTI_GZ + 1];
};

void decode_pool_config_default(struct decode_pool_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	cfg->workers = n > 0 ? (unsigned)n : 1;
	decode_limits_default(&cfg->limits);
	cfg->in_bytes = 256u << 20;
	cfg->out_bytes = (size_t)cfg->limits.max_decode_bytes;
	cfg->meta_bytes = cfg->limits.max_meta_bytes;
	cfg->cpu_seconds = 10;
	cfg->timeout_ms = 10000;
	cfg->quarantine_max = 4096;
	cfg->mem_bytes = 0;
}

static uint64_t key_hash(const char *s)
{
	uint64_t h = 1469598103934665603ull; /* FNV-1a */
	for (; *s; s++) {
		h ^= (uint8_t)*s;
		h *= 1099511628211ull;
	}
	return h ? h : 1;
}

static struct bad_key *bad_find(struct decode_pool *pool, const char *key)
{
	if (!key || !*key)
		return NULL;
	uint64_t h = key_hash(key);
	for (unsigned i = 0; i < pool->nbad; i++)
		if (pool->bad[i].hash == h)
			return &pool->bad[i];
	return NULL;
}

static unsigned bad_add(struct decode_pool *pool, const char *key)
{
	if (!key || !*key)
		return 1;
	struct bad_key *b = bad_find(pool, key);
	if (!b) {
		/* A ring: the oldest entry is forgotten first. */
		b = &pool->bad[pool->bad_next];
		pool->bad_next = (pool->bad_next + 1) % pool->cfg.quarantine_max;
		if (pool->nbad < pool->cfg.quarantine_max)
			pool->nbad++;
		b->hash = key_hash(key);
		b->failures = 0;
	}
	return ++b->failures;
}

static void set_job_err(struct decode_job *job, const char *reason)
{
	snprintf(job->err, sizeof(job->err), "'%.200s': %s", job->resource ? job->resource : "",
		 reason);
}

static void maybe_free(struct decode_pool *pool)
{
	if (!pool->stopping || pool->closing > 0)
		return;
	for (unsigned i = 0; i < pool->nworkers; i++) {
		struct worker *w = &pool->workers[i];
		if (w->region)
			munmap(w->region, worker_region_size(&pool->params));
		if (w->ctl >= 0)
			close(w->ctl);
		if (w->pidfd >= 0)
			close(w->pidfd);
	}
	if (pool->zsock >= 0)
		close(pool->zsock);
	free(pool->workers);
	free(pool->bad);
	free(pool);
}

static void on_closed(uv_handle_t *h)
{
	struct decode_pool *pool = h->data;
	pool->closing--;
	maybe_free(pool);
}

static void pool_close(struct decode_pool *pool, uv_handle_t *h)
{
	if (uv_is_closing(h))
		return;
	h->data = pool;
	pool->closing++;
	uv_close(h, on_closed);
}

static void kill_worker(struct worker *w)
{
	if (w->pidfd >= 0) {
#ifdef SYS_pidfd_send_signal
		if (syscall(SYS_pidfd_send_signal, w->pidfd, SIGKILL, NULL, 0) == 0)
			return;
#endif
	}
	/* Without a pidfd: the pid is still ours to signal, the socket has not shown EOF. */
	if (w->pid > 0)
		kill(w->pid, SIGKILL);
}

static void request_spawn(struct worker *w)
{
	struct decode_pool *pool = w->pool;
	struct zygote_req req = { w->slot };
	if (pool->zygote_dead || pool->stopping) {
		w->state = W_NONE;
		return;
	}
	w->state = W_SPAWNING;
	if (send(pool->zsock, &req, sizeof(req), MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)sizeof(req))
		w->state = W_NONE;
}

static void dispatch(struct decode_pool *pool);
static void fail_queue(struct decode_pool *pool, int status, const char *reason);

static void finish(struct decode_pool *pool, struct decode_job *job)
{
	if (job->status == 0) {
		pool->st.done++;
		if (job->started_ns_ && !job->probe_only &&
		    (unsigned)job->desc.format <= DECODE_FORMAT_NIFTI &&
		    (unsigned)job->desc.codec <= DECODE_CODEC_NIFTI_GZ)
			hist_observe(&pool->decode_time[job->desc.format][job->desc.codec],
				     uv_hrtime() - job->started_ns_);
	} else
		pool->st.failed++;
	job->on_done_(job);
}

static void on_worker_closed(uv_handle_t *h)
{
	struct worker *w = h->data;
	struct decode_pool *pool = w->pool;
	if (w->region) {
		munmap(w->region, worker_region_size(&pool->params));
		w->region = NULL;
	}
	close(w->ctl);
	w->ctl = -1;
	if (w->pidfd >= 0)
		close(w->pidfd);
	w->pidfd = -1;
	w->pid = 0;
	if (pool->stopping) {
		w->state = W_NONE;
		pool->closing--;
		maybe_free(pool);
		return;
	}
	pool->st.respawns++;
	request_spawn(w);
	if (w->state == W_NONE) {
		bool any = false;
		for (unsigned i = 0; i < pool->nworkers; i++)
			any |= pool->workers[i].state != W_NONE;
		if (!any)
			fail_queue(pool, -DMC_E_DECODE_FAILED, "no decoder worker can be started");
	}
}

static void worker_died(struct worker *w)
{
	struct decode_pool *pool = w->pool;
	struct decode_job *job = w->job;
	bool retired = w->state == W_RETIRING;
	uv_timer_stop(&w->timer);
	uv_poll_stop(&w->poll);
	w->state = W_CLOSING;
	w->job = NULL;
	w->poll.data = w;
	if (!pool->stopping)
		uv_close((uv_handle_t *)&w->poll, on_worker_closed);
	if (job) {
		char reason[160];
		job->failures = bad_add(pool, job->resource);
		if (w->timed_out) {
			pool->st.timeouts++;
			snprintf(reason, sizeof(reason),
				 "decoding took longer than %llu ms: worker killed",
				 (unsigned long long)pool->cfg.timeout_ms);
		} else {
			pool->st.crashes++;
			snprintf(reason, sizeof(reason), "the decoder worker crashed");
		}
		job->status = -DMC_E_DECODE_FAILED;
		set_job_err(job, reason);
		finish(pool, job);
	} else if (!w->timed_out && !retired) {
		pool->st.crashes++;
	}
	w->timed_out = false;
}

static void on_timeout(uv_timer_t *t)
{
	struct worker *w = t->data;
	if (w->state != W_BUSY)
		return;
	w->timed_out = true;
	kill_worker(w);
	/* The end-of-file on the control socket follows at once and completes the job. */
}

static void on_ctl(uv_poll_t *h, int status, int events)
{
	struct worker *w = h->data;
	struct decode_pool *pool = w->pool;
	struct worker_rep rep;
	(void)events;
	if (pool->stopping || w->state == W_CLOSING)
		return;
	for (;;) {
		ssize_t n = recv(w->ctl, &rep, sizeof(rep), MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && status == 0)
			return;
		if (n != (ssize_t)sizeof(rep)) {
			worker_died(w);
			return;
		}
		struct decode_job *job = w->job;
		if (!job || rep.seq != job->seq_)
			continue; /* a reply to a job that is gone */
		uv_timer_stop(&w->timer);
		w->job = NULL;
		job->status = rep.status;
		rep.err[sizeof(rep.err) - 1] = '\0';
		if (rep.status == 0) {
			const uint8_t *out = w->region + pool->params.in_bytes;
			job->desc = rep.desc;
			job->out = job->probe_only ? NULL : out;
			if (job->want_meta && rep.meta_len > 0 &&
			    rep.meta_len < pool->params.meta_bytes) {
				job->meta = (const char *)out + pool->params.out_bytes;
				job->meta_len = rep.meta_len;
			}
			if (!job->probe_only && job->desc.nbytes > pool->params.out_bytes) {
				job->status = -DMC_E_INTERNAL;
				set_job_err(job, "worker reported an impossible size");
			}
		} else {
			set_job_err(job, rep.err[0] ? rep.err : "decoding failed");
		}
		struct bad_key *b = bad_find(pool, job->resource);
		job->failures = b ? b->failures : 0;
		/* The output stays valid during the callback: the worker is idle only after. */
		finish(pool, job);
		if (pool->stopping)
			return;
		if (rep.flags & WORKER_REP_RETIRE) {
			w->state = W_RETIRING; /* its end-of-file follows; no job goes to it */
			return;
		}
		w->state = W_IDLE;
		dispatch(pool);
		return;
	}
}

static void start_job(struct worker *w, struct decode_job *job)
{
	struct decode_pool *pool = w->pool;
	struct worker_req req;
	memcpy(w->region, job->in, job->in_len);
	job->seq_ = ++pool->seq;
	job->worker_pid = w->pid;
	job->worker_ = w;
	job->started_ns_ = uv_hrtime();
	memset(&req, 0, sizeof(req));
	req.seq = job->seq_;
	req.in_len = job->in_len;
	req.flags = job->opts.flags;
	req.frame = job->opts.frame;
	req.dtype = (uint32_t)job->opts.dtype;
	req.pol = job->pol;
	req.want_meta = job->want_meta;
	req.probe_only = job->probe_only;
	w->job = job;
	w->state = W_BUSY;
	uv_timer_start(&w->timer, on_timeout, pool->cfg.timeout_ms, 0);
	if (send(w->ctl, &req, sizeof(req), MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)sizeof(req)) {
		/* The worker is gone or wedged: it dies, and so does this attempt. */
		kill_worker(w);
	}
}

static void dispatch(struct decode_pool *pool)
{
	for (unsigned i = 0; i < pool->nworkers && pool->qhead; i++) {
		struct worker *w = &pool->workers[i];
		if (w->state != W_IDLE)
			continue;
		struct decode_job *job = pool->qhead;
		pool->qhead = job->next_;
		if (!pool->qhead)
			pool->qtail = NULL;
		pool->st.queued--;
		start_job(w, job);
	}
}

static void fail_queue(struct decode_pool *pool, int status, const char *reason)
{
	while (pool->qhead) {
		struct decode_job *job = pool->qhead;
		pool->qhead = job->next_;
		if (!pool->qhead)
			pool->qtail = NULL;
		pool->st.queued--;
		job->status = status;
		set_job_err(job, reason);
		finish(pool, job);
	}
}

static int attach(struct worker *w, const struct zygote_rep *rep, const int *fds)
{
	struct decode_pool *pool = w->pool;
	size_t size = worker_region_size(&pool->params);
	uint8_t *region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
	close(fds[1]);
	if (region == MAP_FAILED) {
		close(fds[0]);
		if (rep->nfds > 2)
			close(fds[2]);
		return -errno;
	}
	size_t pin = pool->params.in_bytes < POOL_PREFAULT_BYTES ? pool->params.in_bytes
								  : POOL_PREFAULT_BYTES;
	size_t pout = pool->params.out_bytes < POOL_PREFAULT_BYTES ? pool->params.out_bytes
								    : POOL_PREFAULT_BYTES;
	madvise(region, pin & ~(size_t)4095, MADV_POPULATE_WRITE);
	madvise(region + pool->params.in_bytes, pout & ~(size_t)4095, MADV_POPULATE_READ);
	w->region = region;
	w->ctl = fds[0];
	w->pidfd = rep->nfds > 2 ? fds[2] : -1;
	w->pid = rep->pid;
	int r = uv_poll_init(pool->loop, &w->poll, w->ctl);
	if (r == 0) {
		w->poll.data = w;
		r = uv_poll_start(&w->poll, UV_READABLE | UV_DISCONNECT, on_ctl);
	}
	if (r < 0)
		return r;
	w->state = W_IDLE;
	return 0;
}

static void retry_spawn(uv_timer_t *t)
{
	struct worker *w = t->data;
	if (w->state == W_NONE)
		request_spawn(w);
}

static void on_zygote(uv_poll_t *h, int status, int events)
{
	struct decode_pool *pool = h->data;
	(void)events;
	if (pool->stopping)
		return;
	for (;;) {
		struct zygote_rep rep;
		int fds[3] = { -1, -1, -1 };
		char cbuf[CMSG_SPACE(sizeof(fds))];
		struct iovec iov = { &rep, sizeof(rep) };
		struct msghdr mh;
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		ssize_t n = recvmsg(pool->zsock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && status == 0)
			return;
		unsigned nfds = 0;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n > 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				nfds = (unsigned)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
				if (nfds > 3)
					nfds = 3;
				memcpy(fds, CMSG_DATA(cm), nfds * sizeof(int));
			}
		}
		if (n != (ssize_t)sizeof(rep)) {
			for (unsigned i = 0; i < nfds; i++)
				close(fds[i]);
			/* The zygote is gone: no more workers can be started. */
			pool->zygote_dead = true;
			uv_poll_stop(&pool->zpoll);
			for (unsigned i = 0; i < pool->nworkers; i++)
				if (pool->workers[i].state == W_SPAWNING)
					pool->workers[i].state = W_NONE;
			bool any = false;
			for (unsigned i = 0; i < pool->nworkers; i++)
				any |= pool->workers[i].state != W_NONE;
			if (!any)
				fail_queue(pool, -DMC_E_DECODE_FAILED, "no decoder worker can be started");
			return;
		}
		if (rep.slot >= pool->nworkers || pool->workers[rep.slot].state != W_SPAWNING ||
		    rep.err != 0 || (int)nfds != rep.nfds || nfds < 2) {
			for (unsigned i = 0; i < nfds; i++)
				close(fds[i]);
			if (rep.slot < pool->nworkers &&
			    pool->workers[rep.slot].state == W_SPAWNING) {
				/* fork failed (EAGAIN, ENOMEM): try again a little later */
				struct worker *w = &pool->workers[rep.slot];
				w->state = W_NONE;
				uv_timer_start(&w->timer, retry_spawn, POOL_RESPAWN_DELAY_MS, 0);
			}
			continue;
		}
		struct worker *w = &pool->workers[rep.slot];
		if (attach(w, &rep, fds) < 0) {
			if (w->ctl >= 0) {
				close(w->ctl);
				w->ctl = -1;
			}
			w->state = W_NONE;
			continue;
		}
		dispatch(pool);
	}
}

/*
 * Runs worker_drop_privileges() once in a throw-away child: a worker user the workers
 * cannot switch to (no such uid in this user namespace, say) fails the start with a
 * message, instead of workers that die as soon as they are forked.
 */
static int check_drop(const struct worker_params *p, char *err, size_t errlen)
{
	int pfd[2];
	char msg[160] = "";

	if (pipe2(pfd, O_CLOEXEC) != 0)
		return -errno;
	pid_t pid = fork();
	if (pid < 0) {
		int e = errno;
		close(pfd[0]);
		close(pfd[1]);
		return -e;
	}
	if (pid == 0) {
		const char *what;
		int r = worker_drop_privileges(p, &what);
		if (r < 0) {
			int n = snprintf(msg, sizeof(msg), "%s: %s", what, strerror(-r));
			if (write(pfd[1], msg, (size_t)n) < 0)
				_exit(2);
		}
		_exit(r < 0);
	}
	close(pfd[1]);
	ssize_t n;
	while ((n = read(pfd[0], msg, sizeof(msg) - 1)) < 0 && errno == EINTR)
		;
	close(pfd[0]);
	msg[n > 0 ? n : 0] = '\0';
	int status = 0;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return 0;
	if (p->drop_user)
		snprintf(err, errlen, "decoder workers cannot switch to uid %u gid %u: %s",
			 (unsigned)p->worker_uid, (unsigned)p->worker_gid,
			 msg[0] ? msg : "the check died");
	else
		snprintf(err, errlen, "decoder workers cannot drop their capabilities: %s",
			 msg[0] ? msg : "the check died");
	return -EPERM;
}

int decode_pool_start(uv_loop_t *loop, const struct decode_pool_config *cfg,
		      struct decode_pool **ret_pool)
{
	char err[256];
	return decode_pool_start_err(loop, cfg, ret_pool, err, sizeof(err));
}

int decode_pool_start_err(uv_loop_t *loop, const struct decode_pool_config *cfg,
			  struct decode_pool **ret_pool, char *err, size_t errlen)
{
	struct decode_pool_config def;
	struct decode_pool *pool;
	int sv[2];
	int r;

	decode_pool_config_default(&def);
	pool = calloc(1, sizeof(*pool));
	if (!pool)
		return -ENOMEM;
	pool->loop = loop;
	pool->cfg = cfg ? *cfg : def;
	struct decode_pool_config *c = &pool->cfg;
	struct decode_limits lim = def.limits;
	if (c->limits.max_decode_bytes)
		lim.max_decode_bytes = c->limits.max_decode_bytes;
	if (c->limits.max_input_bytes)
		lim.max_input_bytes = c->limits.max_input_bytes;
	if (c->limits.max_dim)
		lim.max_dim = c->limits.max_dim;
	if (c->limits.max_frames)
		lim.max_frames = c->limits.max_frames;
	if (c->limits.max_ratio)
		lim.max_ratio = c->limits.max_ratio;
	if (c->limits.max_meta_bytes)
		lim.max_meta_bytes = c->limits.max_meta_bytes;
	c->limits = lim;
	if (!c->workers)
		c->workers = def.workers;
	if (!c->in_bytes)
		c->in_bytes = def.in_bytes;
	if (!c->out_bytes)
		c->out_bytes = (size_t)lim.max_decode_bytes;
	if (!c->meta_bytes)
		c->meta_bytes = lim.max_meta_bytes;
	if (!c->cpu_seconds)
		c->cpu_seconds = def.cpu_seconds;
	if (!c->timeout_ms)
		c->timeout_ms = def.timeout_ms;
	if (!c->quarantine_max)
		c->quarantine_max = def.quarantine_max;
	/* Page-align the areas so that each can be pre-faulted and advised on its own. */
	c->in_bytes = (c->in_bytes + 4095) & ~(size_t)4095;
	c->out_bytes = (c->out_bytes + 4095) & ~(size_t)4095;
	c->meta_bytes = (c->meta_bytes + 4095) & ~(size_t)4095;

	struct worker_params *p = &pool->params;
	p->in_bytes = c->in_bytes;
	p->out_bytes = c->out_bytes;
	p->meta_bytes = c->meta_bytes;
	p->cpu_seconds = c->cpu_seconds;
	p->seccomp = !c->no_seccomp;
	p->drop_user = c->drop_user;
	p->worker_uid = c->worker_uid;
	p->worker_gid = c->worker_gid;
	p->limits = lim;
	p->mem_bytes = c->mem_bytes ? c->mem_bytes
				    : worker_region_size(p) + 2 * lim.max_decode_bytes + (512ull << 20);

	if (c->drop_user && c->worker_uid == 0) {
		snprintf(err, errlen, "decoder workers may not run as root (uid 0)");
		free(pool);
		return -EINVAL;
	}
	r = check_drop(p, err, errlen);
	if (r < 0) {
		free(pool);
		return r;
	}

	pool->nworkers = c->workers;
	pool->workers = calloc(pool->nworkers, sizeof(*pool->workers));
	pool->bad = calloc(c->quarantine_max, sizeof(*pool->bad));
	if (!pool->workers || !pool->bad) {
		r = -ENOMEM;
		goto fail_alloc;
	}
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
		r = -errno;
		goto fail_alloc;
	}
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid < 0) {
		r = -errno;
		close(sv[0]);
		close(sv[1]);
		goto fail_alloc;
	}
	if (pid == 0) {
		close(sv[0]);
		zygote_main(sv[1], p, parent);
	}
	close(sv[1]);
	pool->zygote_pid = pid;
	pool->zsock = sv[0];
	r = uv_poll_init(loop, &pool->zpoll, pool->zsock);
	if (r < 0)
		goto fail_zygote;
	pool->zpoll.data = pool;
	uv_poll_start(&pool->zpoll, UV_READABLE | UV_DISCONNECT, on_zygote);
	for (unsigned i = 0; i < pool->nworkers; i++) {
		struct worker *w = &pool->workers[i];
		w->pool = pool;
		w->slot = i;
		w->ctl = -1;
		w->pidfd = -1;
		uv_timer_init(loop, &w->timer);
		w->timer.data = w;
		request_spawn(w);
	}
	pool->st.workers = pool->nworkers;
	*ret_pool = pool;
	return 0;

fail_zygote:
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	close(pool->zsock);
fail_alloc:
	snprintf(err, errlen, "%s", strerror(-r));
	free(pool->workers);
	free(pool->bad);
	free(pool);
	return r;
}

int decode_pool_submit(struct decode_pool *pool, struct decode_job *job, decode_done_cb on_done)
{
	job->status = 0;
	job->out = NULL;
	job->meta = NULL;
	job->meta_len = 0;
	job->err[0] = '\0';
	job->failures = 0;
	job->worker_pid = 0;
	job->next_ = NULL;
	job->on_done_ = on_done;
	job->worker_ = NULL;
	job->started_ns_ = 0;
	if (pool->stopping) {
		set_job_err(job, "the decoder pool is stopping");
		pool->st.refused++;
		return -DMC_E_CANCELLED;
	}
	bool alive = false;
	for (unsigned i = 0; i < pool->nworkers; i++)
		alive |= pool->workers[i].state != W_NONE;
	if (!alive && pool->zygote_dead) {
		set_job_err(job, "no decoder worker can be started");
		pool->st.refused++;
		return -DMC_E_DECODE_FAILED;
	}
	struct bad_key *b = bad_find(pool, job->resource);
	if (b && b->failures >= 2) {
		job->failures = b->failures;
		set_job_err(job, "crashed or hung the decoder twice: not retried");
		pool->st.refused++;
		return -DMC_E_DECODE_FAILED;
	}
	if (job->in_len > pool->params.in_bytes) {
		set_job_err(job, "input larger than the decoder's input area");
		pool->st.refused++;
		return -DMC_E_LIMIT_EXCEEDED;
	}
	if (pool->qtail)
		pool->qtail->next_ = job;
	else
		pool->qhead = job;
	pool->qtail = job;
	pool->st.queued++;
	dispatch(pool);
	return 0;
}

void decode_pool_stop(struct decode_pool *pool)
{
	if (pool->stopping)
		return;
	fail_queue(pool, -DMC_E_CANCELLED, "the decoder pool is stopping");
	pool->stopping = true;
	for (unsigned i = 0; i < pool->nworkers; i++) {
		struct worker *w = &pool->workers[i];
		if (w->state == W_BUSY || w->state == W_IDLE || w->state == W_RETIRING)
			kill_worker(w);
		if (w->job) {
			struct decode_job *job = w->job;
			w->job = NULL;
			job->status = -DMC_E_CANCELLED;
			set_job_err(job, "the decoder pool is stopping");
			finish(pool, job);
		}
	}
	for (unsigned i = 0; i < pool->nworkers; i++) {
		struct worker *w = &pool->workers[i];
		if (w->state == W_BUSY || w->state == W_IDLE || w->state == W_RETIRING)
			pool_close(pool, (uv_handle_t *)&w->poll);
		else if (w->state == W_CLOSING)
			pool->closing++; /* its close callback is pending: on_worker_closed counts it */
		pool_close(pool, (uv_handle_t *)&w->timer);
	}
	pool_close(pool, (uv_handle_t *)&pool->zpoll);
	kill(pool->zygote_pid, SIGKILL);
	waitpid(pool->zygote_pid, NULL, 0);
}

void decode_pool_stats(const struct decode_pool *pool, struct decode_pool_stats *ret)
{
	*ret = pool->st;
	ret->workers = pool->nworkers;
	ret->idle = ret->busy = ret->spawning = 0;
	for (unsigned i = 0; i < pool->nworkers; i++) {
		enum worker_state s = pool->workers[i].state;
		ret->idle += s == W_IDLE;
		ret->busy += s == W_BUSY;
		ret->spawning += s == W_SPAWNING || s == W_CLOSING || s == W_RETIRING;
	}
}

const struct hist *decode_pool_hist(const struct decode_pool *pool, enum decode_format format,
				    enum decode_codec codec)
{
	if ((unsigned)format > DECODE_FORMAT_NIFTI || (unsigned)codec > DECODE_CODEC_NIFTI_GZ)
		return NULL;
	return &pool->decode_time[format][codec];
}

unsigned decode_pool_worker_pids(const struct decode_pool *pool, pid_t *pids, unsigned max)
{
	unsigned n = 0;
	for (unsigned i = 0; i < pool->nworkers && n < max; i++) {
		const struct worker *w = &pool->workers[i];
		if ((w->state == W_IDLE || w->state == W_BUSY) && w->pid > 0)
			pids[n++] = w->pid;
	}
	return n;
}
