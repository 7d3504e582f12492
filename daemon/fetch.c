/*
 * fetch's engine (see fetch.h): the one curl multi handle driven by the daemon's libuv loop
 * (sockets polled and curl's timer, after curl's docs/examples/multi-uv.c), libcurl's
 * memory (allocators that wipe what they free: the request buffers held the API key), the
 * engine's life (fetch_new, fetch_free, STATUS counters), the finished attempts the multi
 * handle reports, handed to fetch_xfer.c; and the places: which queued transfer enters the
 * multi handle when (owners round-robin by uid with a fair share, groups, per-host
 * connections, preemption) and the speed floor's periodic check. One transfer's own life is
 * fetch_xfer.c's, reading a response fetch_response.c's; shared state in fetch_priv.h.
 * Loop thread only (libcurl's callbacks run on it).
 */
#include <curl/curl.h>
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch_priv.h"
#include "log.h"
#include "proto.h"

#define SPEED_TICK_MAX_MS 1000u  /* the speed floor is checked at least this often */

struct sock_ctx {
	uv_poll_t poll;
	curl_socket_t fd;
	struct fetch *f;
	struct sock_ctx *next, *prev;
};

static void check_multi_info(struct fetch *f);

/* ---- sockets and the timer (multi-uv.c) ---- */

/*
 * One of the engine's handles closed (a socket's poll, a transfer's timer, the engine's own
 * timers): its memory goes with the last one, once fetch_free() began.
 */
void engine_handle_closed(struct fetch *f)
{
	if (--f->open_handles == 0 && f->closing) {
		free(f->owners);
		free(f);
	}
}

static void on_poll_closed(uv_handle_t *h)
{
	struct sock_ctx *s = h->data;
	struct fetch *f = s->f;

	free(s);
	engine_handle_closed(f);
}

static void sock_ctx_free(struct sock_ctx *s)
{
	struct fetch *f = s->f;

	if (s->prev)
		s->prev->next = s->next;
	else
		f->socks = s->next;
	if (s->next)
		s->next->prev = s->prev;
	uv_close((uv_handle_t *)&s->poll, on_poll_closed);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
	struct sock_ctx *s = h->data;
	struct fetch *f = s->f;
	int flags = 0, running;

	if (status < 0)
		flags = CURL_CSELECT_ERR;
	if (events & UV_READABLE)
		flags |= CURL_CSELECT_IN;
	if (events & UV_WRITABLE)
		flags |= CURL_CSELECT_OUT;
	curl_multi_socket_action(f->multi, s->fd, flags, &running);
	check_multi_info(f);
}

static int on_curl_socket(CURL *easy, curl_socket_t fd, int action, void *userp, void *socketp)
{
	struct fetch *f = userp;
	struct sock_ctx *s = socketp;
	int events = 0;

	(void)easy;
	if (action == CURL_POLL_REMOVE) {
		if (s) {
			uv_poll_stop(&s->poll);
			curl_multi_assign(f->multi, fd, NULL);
			sock_ctx_free(s);
		}
		return 0;
	}
	if (!s) {
		s = calloc(1, sizeof(*s));
		if (!s)
			return -1;
		s->fd = fd;
		s->f = f;
		if (uv_poll_init_socket(f->loop, &s->poll, fd) != 0) {
			free(s);
			return -1;
		}
		s->poll.data = s;
		f->open_handles++;
		s->next = f->socks;
		if (f->socks)
			f->socks->prev = s;
		f->socks = s;
		curl_multi_assign(f->multi, fd, s);
	}
	if (action != CURL_POLL_IN)
		events |= UV_WRITABLE;
	if (action != CURL_POLL_OUT)
		events |= UV_READABLE;
	uv_poll_start(&s->poll, events, on_poll);
	return 0;
}

static void on_timer(uv_timer_t *t)
{
	struct fetch *f = t->data;
	int running;

	curl_multi_socket_action(f->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	check_multi_info(f);
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
	struct fetch *f = userp;

	(void)multi;
	if (timeout_ms < 0)
		uv_timer_stop(&f->timer);
	else
		uv_timer_start(&f->timer, on_timer, timeout_ms ? (uint64_t)timeout_ms : 1, 0);
	return 0;
}

/* ---- the engine ---- */

/*
 * libcurl's memory. Its request buffers hold the header lines, the API key among them:
 * every block libcurl gives back is wiped first, and a block it grows is copied and the
 * old one wiped (a plain realloc could move it and leave the old bytes behind).
 * OpenSSL and nghttp2 allocate on their own (see fetch.h: what stays).
 */
/*
 * Blocks larger than this are libcurl's receive buffers (RECV_BUFFER), which hold response
 * bytes, never the request: they are not wiped. Wiping them touched every page of 256 KiB
 * buffers that glibc then kept in the heap (its mmap threshold rises after the first free),
 * about 40 MB of resident heap for nothing.
 */
#define WIPE_MAX (128u << 10)

static void wipe_free(void *p)
{
	size_t n;

	if (!p)
		return;
	n = malloc_usable_size(p);
	if (n <= WIPE_MAX)
		explicit_bzero(p, n);
	free(p);
}

static void *wipe_realloc(void *p, size_t n)
{
	size_t old;
	void *q;

	if (!p)
		return malloc(n);
	old = malloc_usable_size(p);
	if (n <= old)
		return p; /* fits: the block stays as it is and is wiped when freed */
	q = malloc(n);
	if (!q)
		return NULL;
	memcpy(q, p, old);
	wipe_free(p);
	return q;
}

static void global_init(void)
{
	if (curl_global_init_mem(CURL_GLOBAL_DEFAULT, malloc, wipe_free, wipe_realloc, strdup,
				 calloc) != CURLE_OK)
		curl_global_init(CURL_GLOBAL_DEFAULT);
}

int fetch_new(uv_loop_t *loop, const struct fetch_options *opts, struct fetch **ret)
{
	static uv_once_t once = UV_ONCE_INIT;
	struct fetch *f;

	uv_once(&once, global_init);
	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->loop = loop;
	f->opts = *opts;
	f->multi = curl_multi_init();
	if (!f->multi) {
		free(f);
		return -ENOMEM;
	}
	curl_multi_setopt(f->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
	curl_multi_setopt(f->multi, CURLMOPT_SOCKETDATA, f);
	curl_multi_setopt(f->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
	curl_multi_setopt(f->multi, CURLMOPT_TIMERDATA, f);
	curl_multi_setopt(f->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)opts->max_per_host);
	curl_multi_setopt(f->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
	curl_multi_setopt(f->multi, CURLMOPT_MAXCONNECTS, (long)opts->max_parallel * 2);
	uv_timer_init(loop, &f->timer);
	f->timer.data = f;
	uv_timer_init(loop, &f->speed_timer);
	f->speed_timer.data = f;
	f->open_handles = 2;
	*ret = f;
	return 0;
}

static void on_engine_timer_closed(uv_handle_t *h)
{
	engine_handle_closed(h->data); /* fetch_free() closes them */
}

void fetch_free(struct fetch *f)
{
	if (!f || f->closing)
		return;
	/* on_done of each unfinished transfer runs now, with -DMC_E_CANCELLED; on_done may
	 * free transfers, so look for the next unfinished one from the start each time */
	f->closing = true;
	for (;;) {
		struct fetch_xfer *x = f->all;
		while (x && (x->state == XS_DONE || x->state == XS_NEW))
			x = x->anext;
		if (!x)
			break;
		if (x->state == XS_QUEUED)
			queue_remove(f, x);
		if (x->state == XS_RUNNING)
			run_del(x);
		uv_timer_stop(&x->timer);
		x->cancelled = true;
		snprintf(x->res.message, sizeof(x->res.message), "daemon stopping");
		finish(x, -DMC_E_CANCELLED);
	}
	curl_multi_cleanup(f->multi);
	f->multi = NULL;
	while (f->socks) {
		uv_poll_stop(&f->socks->poll);
		sock_ctx_free(f->socks);
	}
	uv_close((uv_handle_t *)&f->timer, on_engine_timer_closed);
	uv_close((uv_handle_t *)&f->speed_timer, on_engine_timer_closed);
}

void fetch_get_stats(const struct fetch *f, struct fetch_stats *ret)
{
	*ret = f->stats;
	ret->running = f->running;
	ret->queued = 0;
	for (struct fetch_xfer *x = f->queue_head; x; x = x->qnext)
		ret->queued++;
}

static void check_multi_info(struct fetch *f)
{
	CURLMsg *msg;
	int left;

	while (f->multi && (msg = curl_multi_info_read(f->multi, &left))) {
		struct fetch_xfer *x = NULL;
		CURLcode cc;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
		cc = msg->data.result;
		run_del(x);
		attempt_done(x, cc);
	}
	pump(f);
}

/* ---- places: owners, the queue, the fair share ---- */

/* The entry of `uid`, made if `create` (then NULL means no memory). Entries stay: one for
 * each local uid that ever fetched. */
struct owner *owner_find(struct fetch *f, uint32_t uid, bool create)
{
	uint32_t i;

	for (i = 0; i < f->n_owners; i++)
		if (f->owners[i].uid == uid)
			break;
	if (i == f->n_owners) {
		if (!create)
			return NULL;
		if (f->n_owners == f->cap_owners) {
			uint32_t cap = f->cap_owners ? f->cap_owners * 2 : 8;
			struct owner *n = realloc(f->owners, cap * sizeof(*n));
			if (!n)
				return NULL;
			f->owners = n;
			f->cap_owners = cap;
		}
		f->owners[f->n_owners++] = (struct owner){ .uid = uid };
	}
	return &f->owners[i];
}

/* The entry of a started transfer's owner (made by fetch_xfer_start). */
static struct owner *owner_of(struct fetch *f, const struct fetch_xfer *x)
{
	return owner_find(f, x->owner, false);
}

void queue_push(struct fetch *f, struct fetch_xfer *x, bool front)
{
	x->state = XS_QUEUED;
	x->qnext = x->qprev = NULL;
	owner_of(f, x)->queued++;
	if (!f->queue_head) {
		f->queue_head = f->queue_tail = x;
	} else if (front) {
		x->qnext = f->queue_head;
		f->queue_head->qprev = x;
		f->queue_head = x;
	} else {
		x->qprev = f->queue_tail;
		f->queue_tail->qnext = x;
		f->queue_tail = x;
	}
}

void queue_remove(struct fetch *f, struct fetch_xfer *x)
{
	if (x->qprev)
		x->qprev->qnext = x->qnext;
	else
		f->queue_head = x->qnext;
	if (x->qnext)
		x->qnext->qprev = x->qprev;
	else
		f->queue_tail = x->qprev;
	x->qnext = x->qprev = NULL;
	owner_of(f, x)->queued--;
}

static void on_speed_tick(uv_timer_t *t);

/* The attempt is in the multi handle: it holds a place. */
void run_add(struct fetch_xfer *x)
{
	struct fetch *f = x->f;

	x->state = XS_RUNNING;
	f->running++;
	owner_of(f, x)->running++;
	if (f->opts.min_speed && !f->speed_active) {
		uint64_t tick = f->opts.min_speed_time_ms / 4;
		if (tick > SPEED_TICK_MAX_MS)
			tick = SPEED_TICK_MAX_MS;
		if (tick < 100)
			tick = 100;
		uv_timer_start(&f->speed_timer, on_speed_tick, tick, tick);
		f->speed_active = true;
	}
}

/* The attempt leaves the multi handle and gives its place back. */
void run_del(struct fetch_xfer *x)
{
	struct fetch *f = x->f;

	curl_multi_remove_handle(f->multi, x->easy);
	f->running--;
	owner_of(f, x)->running--;
}

/* Owners with transfers running or queued. */
static uint32_t owners_active(const struct fetch *f)
{
	uint32_t n = 0;

	for (uint32_t i = 0; i < f->n_owners; i++)
		if (f->owners[i].running || f->owners[i].queued)
			n++;
	return n;
}

/* The places one owner may hold now: all of them while it is alone. */
static uint32_t fair_share(const struct fetch *f)
{
	uint32_t active = owners_active(f);
	uint32_t share;

	if (active <= 1)
		return f->opts.max_parallel;
	share = f->opts.max_parallel / active;
	return share ? share : 1;
}

/* Transfers of `group` in the multi handle now. */
static uint32_t group_running(const struct fetch *f, uint64_t group)
{
	uint32_t n = 0;

	for (const struct fetch_xfer *x = f->all; x; x = x->anext)
		if (x->state == XS_RUNNING && x->group == group)
			n++;
	return n;
}

/* Transfers to `host` in the multi handle now, all of them or `uid`'s (uid >= 0). */
static uint32_t host_running(const struct fetch *f, const char *host, int64_t uid)
{
	uint32_t n = 0;

	for (const struct fetch_xfer *x = f->all; x; x = x->anext)
		if (x->state == XS_RUNNING && strcmp(x->host, host) == 0 &&
		    (uid < 0 || x->owner == (uint32_t)uid))
			n++;
	return n;
}

static bool host_has_room(const struct fetch *f, const char *host)
{
	return !f->opts.max_per_host || host_running(f, host, -1) < f->opts.max_per_host;
}

/*
 * The next transfer of owner `uid` to start: its oldest metadata request, else the oldest
 * of its group with the fewest running transfers, so that a job queued behind a large one
 * starts at once (docs/reliability.md N7) and groups share the owner's places evenly. With
 * `room`, only transfers whose host has a connection free.
 */
static struct fetch_xfer *next_queued(struct fetch *f, uint32_t uid, bool room)
{
	struct fetch_xfer *best = NULL, *x, *mine = NULL;
	uint32_t best_running = UINT32_MAX;
	bool one_group = true;

	for (x = f->queue_head; x; x = x->qnext) {
		if (x->owner != uid || (room && !host_has_room(f, x->host)))
			continue;
		if (x->flags & FETCH_XF_METADATA)
			return x;
		if (!mine)
			mine = x;
		else if (x->group != mine->group)
			one_group = false;
	}
	if (one_group)
		return mine; /* the usual case: first come first served, no counting */
	for (x = f->queue_head; x; x = x->qnext) {
		bool seen = false;
		uint32_t r;
		if (x->owner != uid || (room && !host_has_room(f, x->host)))
			continue;
		for (struct fetch_xfer *y = f->queue_head; y != x; y = y->qnext)
			if (y->owner == uid && y->group == x->group &&
			    !(room && !host_has_room(f, y->host))) {
				seen = true; /* an older one of this group was considered */
				break;
			}
		if (seen)
			continue;
		r = group_running(f, x->group);
		if (r < best_running) {
			best = x;
			best_running = r;
			if (r == 0)
				break;
		}
	}
	return best;
}

/* Gives `vx`'s place back: it waits again at the head of its owner's queue. */
static void preempt(struct fetch *f, struct fetch_xfer *vx, uint32_t holds, uint32_t share,
		    const struct owner *taker)
{
	log_debug(FETCH, "'%s': uid %u holds %u places (share %u): one goes to uid %u", vx->url,
		  (unsigned)vx->owner, holds, share, (unsigned)taker->uid);
	run_del(vx);
	vx->attempts--; /* not a failed attempt */
	f->stats.preempted++;
	queue_push(f, vx, true);
}

/* The most recently started file transfer of `uid` (on `host` if set): the least work lost. */
static struct fetch_xfer *newest_running(const struct fetch *f, uint32_t uid, const char *host)
{
	struct fetch_xfer *vx = NULL;

	for (struct fetch_xfer *x = f->all; x; x = x->anext)
		if (x->state == XS_RUNNING && x->owner == uid && !(x->flags & FETCH_XF_METADATA) &&
		    (!host || strcmp(x->host, host) == 0) && (!vx || x->attempt_ms >= vx->attempt_ms))
			vx = x;
	return vx;
}

/*
 * Makes a place for `taker`, under its share while every place is taken: the owner most
 * over its share gives up its most recently started file transfer, which resumes with
 * Range where it can. Metadata requests are short and never preempted.
 */
static bool preempt_for(struct fetch *f, const struct owner *taker, uint32_t share)
{
	struct owner *victim = NULL;
	struct fetch_xfer *vx;

	for (uint32_t i = 0; i < f->n_owners; i++) {
		struct owner *o = &f->owners[i];
		if (o != taker && o->running > share && (!victim || o->running > victim->running))
			victim = o;
	}
	if (!victim || !(vx = newest_running(f, victim->uid, NULL)))
		return false;
	preempt(f, vx, victim->running, share, taker);
	return true;
}

/*
 * The same on one host whose per_host_connections are all taken: its connections are shared
 * by the owners with transfers for it as the places are (docs/reliability.md N7). Without
 * this, curl would queue the transfers over the cap in its own order, and a user arriving
 * after another's hundreds would wait behind them whatever the places' shares.
 */
static bool preempt_on_host(struct fetch *f, const struct owner *taker, const char *host)
{
	uint32_t users = 0, share, most = 0, mine;
	struct owner *victim = NULL;
	struct fetch_xfer *vx;

	for (uint32_t i = 0; i < f->n_owners; i++) {
		struct owner *o = &f->owners[i];
		uint32_t r = host_running(f, host, o->uid);
		bool waits = false;
		if (!r)
			for (struct fetch_xfer *x = f->queue_head; x && !waits; x = x->qnext)
				waits = x->owner == o->uid && strcmp(x->host, host) == 0;
		if (r || waits)
			users++;
		if (o != taker && r > most) {
			most = r;
			victim = o;
		}
	}
	share = users ? f->opts.max_per_host / users : 1;
	if (!share)
		share = 1;
	mine = host_running(f, host, taker->uid);
	if (mine >= share || !victim || most <= share ||
	    !(vx = newest_running(f, victim->uid, host)))
		return false;
	preempt(f, vx, most, share, taker);
	return true;
}

/*
 * The owner after `cur` in turn: the smallest uid above it with a transfer queued, else
 * the smallest of all (wrapping around). `tried` marks the owners already looked at.
 */
static struct owner *owner_after(struct fetch *f, uint32_t cur, const uint8_t *tried)
{
	struct owner *after = NULL, *first = NULL;

	for (uint32_t i = 0; i < f->n_owners; i++) {
		struct owner *o = &f->owners[i];
		if (!o->queued || tried[i])
			continue;
		if (o->uid > cur && (!after || o->uid < after->uid))
			after = o;
		if (!first || o->uid < first->uid)
			first = o;
	}
	return after ? after : first;
}

/*
 * Starts one queued transfer: owners in turn (round-robin by uid), first those under their
 * fair share of the places, then, with places left over, any. An owner's transfer waits
 * while its host has no connection free, unless the owner is under its share of that
 * host's connections and another is over it. False when nothing can start now.
 */
static bool start_one(struct fetch *f)
{
	uint32_t share = fair_share(f);
	bool full = f->running >= f->opts.max_parallel;
	uint8_t small[64], *tried = f->n_owners <= sizeof(small) ? small : calloc(f->n_owners, 1);
	bool started = false;

	if (!tried)
		return false;
	for (int pass = 0; pass < 2 && !started; pass++) {
		uint32_t cur = f->rr_last;
		if (pass == 1 && full)
			break; /* leftover places only */
		memset(tried, 0, f->n_owners);
		for (struct owner *o; !started && (o = owner_after(f, cur, tried)); cur = o->uid) {
			struct fetch_xfer *x;
			tried[o - f->owners] = 1;
			if (pass == 0 && o->running >= share)
				continue;
			x = next_queued(f, o->uid, true);
			if (!x) {
				/* each of its next transfers waits for a full host: a connection there? */
				struct fetch_xfer *w = next_queued(f, o->uid, false);
				if (pass == 1 || !w || !f->opts.max_per_host ||
				    !preempt_on_host(f, o, w->host))
					continue;
				x = w;
			} else if (full && !preempt_for(f, o, share)) {
				continue;
			}
			f->rr_last = o->uid;
			queue_remove(f, x);
			attempt_start(x);
			started = true;
		}
	}
	if (tried != small)
		free(tried);
	return started;
}

void pump(struct fetch *f)
{
	while (!f->closing && f->queue_head && start_one(f))
		;
}

/* ---- the speed floor ---- */

static void on_speed_tick(uv_timer_t *t)
{
	struct fetch *f = t->data;
	uint64_t now = now_ms(f);

	if (f->running == 0 || f->closing) {
		uv_timer_stop(t);
		f->speed_active = false;
		return;
	}
	for (;;) {
		struct fetch_xfer *x;
		/* from the start each time: a sink's on_done may free transfers */
		for (x = f->all; x; x = x->anext) {
			if (x->state != XS_RUNNING || (x->flags & FETCH_XF_METADATA))
				continue;
			if (x->paused) {
				/* the sink holds it back, not the server */
				x->win_ms = now;
				x->win_got = x->got;
				continue;
			}
			if (now - x->win_ms < f->opts.min_speed_time_ms)
				continue;
			if ((x->got - x->win_got) * 1000 < f->opts.min_speed * (now - x->win_ms))
				break;
			x->win_ms = now;
			x->win_got = x->got;
		}
		if (!x)
			break;
		too_slow(x, now);
	}
	pump(f);
}
