/* HTTP transfers on the loop with libcurl's multi socket interface: see fetch.h. */
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fetch.h"
#include "log.h"
#include "proto.h"

#define ERRBODY_MAX 1024u
#define RECV_BUFFER (256u << 10) /* fewer, larger write callbacks for big bodies */
#define HEADERS_MAX (6 + FETCH_EXTRA_HEADERS) /* request headers a transfer sends */
#define EXTRA_HEADER_MAX 512u    /* one extra header line */
#define SPEED_TICK_MAX_MS 1000u  /* the speed floor is checked at least this often */

enum xfer_state {
	XS_NEW,
	XS_QUEUED,
	XS_RUNNING, /* in the multi handle */
	XS_WAITING, /* for a retry timer */
	XS_DONE,
};

struct sock_ctx {
	uv_poll_t poll;
	curl_socket_t fd;
	struct fetch *f;
	struct sock_ctx *next, *prev;
};

/* A uid with transfers running or queued, for the fair share of places. */
struct owner {
	uint32_t uid;
	uint32_t running, queued;
};

struct fetch {
	uv_loop_t *loop;
	CURLM *multi;
	uv_timer_t timer;
	uv_timer_t speed_timer; /* the speed floor's check, while transfers run */
	bool speed_active;
	struct fetch_options opts;
	struct fetch_xfer *queue_head, *queue_tail; /* waiting for a place */
	struct sock_ctx *socks;
	struct fetch_xfer *all; /* every transfer not yet freed, for fetch_free() */
	uint32_t running;
	struct owner *owners; /* the uids with transfers running or queued */
	uint32_t n_owners, cap_owners;
	uint32_t rr_last;     /* the uid that got the last place, for the round-robin */
	struct fetch_stats stats;
	bool closing;
	unsigned open_handles;
};

struct fetch_xfer {
	struct fetch *f;
	CURL *easy;
	char *url;        /* as given */
	char *cur_url;    /* after redirects */
	char *api_origin; /* the only origin that gets the key */
	const char *api_key;
	const struct fetch_ops *ops;
	void *data;
	char host[256];   /* the origin it connects to now (per_host_connections) */
	uint64_t group; /* transfers of one group share the places fairly with others */
	uint32_t owner; /* the uid it works for: owners share the places round-robin */
	unsigned flags; /* FETCH_XF_* */
	/* the request headers: nodes and text owned here (the key among them), wiped */
	struct curl_slist hdr[HEADERS_MAX];
	char *hdr_mem;
	size_t hdr_cap, hdr_len;
	struct curl_slist *headers; /* hdr[0], or NULL */
	uv_timer_t timer; /* retry waits and deferred completion */
	enum xfer_state state;
	struct fetch_xfer *qnext, *qprev;   /* queue */
	struct fetch_xfer *anext, *aprev;   /* f->all */

	uint32_t attempts;
	uint32_t redirects;
	uint64_t start_ms;
	uint64_t attempt_ms;  /* when the current attempt started: the newest is preempted first */
	uint64_t got;         /* body bytes of the current attempt */
	uint64_t win_ms, win_got; /* the speed floor's window: its start, and `got` then */
	uint64_t delivered;   /* body bytes the sink has taken for the current object */
	char etag[FETCH_ETAG_MAX]; /* strong ETag of the object being delivered */
	char if_none_match[FETCH_ETAG_MAX];
	bool body_started;    /* on_start ran for this attempt */
	bool error_body;      /* this attempt's body is an error document */
	bool paused;
	bool restart;         /* the next attempt starts from byte 0 */
	bool cancelled;
	bool freed;           /* fetch_xfer_free() called while the timer closes */
	int sink_err;
	bool limit_hit;
	char errbuf[CURL_ERROR_SIZE];
	char errbody[ERRBODY_MAX];
	size_t errbody_len;
	struct fetch_result res;
	/* fetch_xfer_set_request(): another method, a body, extra headers, SigV4 */
	char method[8];
	const uint8_t *body;
	size_t body_len, body_off;
	char *extra[FETCH_EXTRA_HEADERS];
	unsigned n_extra;
	char *sigv4;
	const char *userpwd;
	uint32_t max_attempts;
};

static void check_multi_info(struct fetch *f);
static void retry_or_fail(struct fetch_xfer *x, uint64_t retry_after_ms);
static void pump(struct fetch *f);
static void run_del(struct fetch_xfer *x);
static void attempt_start(struct fetch_xfer *x);
static void queue_remove(struct fetch *f, struct fetch_xfer *x);

/* ---- small helpers ---- */

static uint64_t now_ms(struct fetch *f)
{
	return uv_now(f->loop);
}

char *fetch_escape(const char *s)
{
	char *e = curl_easy_escape(NULL, s, 0);
	char *copy = e ? strdup(e) : NULL;

	curl_free(e);
	return copy;
}

int fetch_url_origin(const char *url, char *out, size_t cap)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL, *port = NULL;
	int rc = -EINVAL;

	if (!u)
		return -ENOMEM;
	if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK &&
	    (strcasecmp(scheme, "http") == 0 || strcasecmp(scheme, "https") == 0)) {
		for (char *p = scheme; *p; p++)
			*p = (char)(*p | 0x20);
		for (char *p = host; *p; p++)
			if (*p >= 'A' && *p <= 'Z')
				*p = (char)(*p | 0x20);
		if ((size_t)snprintf(out, cap, "%s://%s:%s", scheme, host, port) < cap)
			rc = 0;
	}
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_url_cleanup(u);
	return rc;
}

static bool same_origin(const char *url, const char *origin)
{
	char o[512];

	return origin && fetch_url_origin(url, o, sizeof(o)) == 0 && strcmp(o, origin) == 0;
}

static int b64val(int c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+' || c == '-')
		return 62;
	if (c == '/' || c == '_')
		return 63;
	return -1;
}

/* Decodes exactly 32 bytes of base64 (44 chars with padding, or 43 without). */
static bool b64_sha256(const char *s, size_t len, uint8_t out[32])
{
	uint32_t acc = 0;
	int bits = 0;
	size_t n = 0;

	while (len && s[len - 1] == '=')
		len--;
	if (len != 43)
		return false;
	for (size_t i = 0; i < len; i++) {
		int v = b64val((unsigned char)s[i]);
		if (v < 0)
			return false;
		acc = (acc << 6) | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (n < 32)
				out[n++] = (uint8_t)(acc >> bits);
		}
	}
	return n == 32;
}

/*
 * The object's SHA-256 as the server states it: RFC 9530 `Repr-Digest: sha-256=:B64:`, or
 * the older RFC 3230 `Digest: SHA-256=B64`.
 */
/* Looks for "<alg>=<b64>" (RFC 3230) or "<alg>=:<b64>:" (RFC 9530) in a header value. */
static bool find_sha256(const char *value, bool colons, uint8_t out[32])
{
	char buf[1024];
	size_t n = strlen(value);
	char *p;

	if (n >= sizeof(buf))
		return false;
	memcpy(buf, value, n + 1);
	for (p = buf; *p;) {
		size_t skip = strspn(p, " \t,");
		size_t len;
		p += skip;
		len = strcspn(p, ",");
		if (len > 8 && strncasecmp(p, "sha-256=", 8) == 0) {
			const char *v = p + 8;
			size_t vlen = len - 8;
			while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
				vlen--;
			if (colons && vlen >= 2 && v[0] == ':' && v[vlen - 1] == ':' &&
			    b64_sha256(v + 1, vlen - 2, out))
				return true;
			if (!colons && b64_sha256(v, vlen, out))
				return true;
		}
		p += len;
	}
	return false;
}

/*
 * The object's SHA-256 as the server states it: RFC 9530 `Repr-Digest: sha-256=:B64:`, or
 * the older RFC 3230 `Digest: SHA-256=B64`.
 */
static bool response_sha256(CURL *easy, uint8_t out[32])
{
	struct curl_header *h;

	if (curl_easy_header(easy, "Repr-Digest", 0, CURLH_HEADER, -1, &h) == CURLHE_OK &&
	    h->value && find_sha256(h->value, true, out))
		return true;
	if (curl_easy_header(easy, "Digest", 0, CURLH_HEADER, -1, &h) == CURLHE_OK && h->value &&
	    find_sha256(h->value, false, out))
		return true;
	return false;
}

static const char *header_value(CURL *easy, const char *name)
{
	struct curl_header *h;

	if (curl_easy_header(easy, name, 0, CURLH_HEADER, -1, &h) == CURLHE_OK)
		return h->value;
	return NULL;
}

/* ---- sockets and the timer (multi-uv.c) ---- */

/* The engine's memory, once its last handle closed. */
static void engine_release(struct fetch *f)
{
	free(f->owners);
	free(f);
}

static void on_poll_closed(uv_handle_t *h)
{
	struct sock_ctx *s = h->data;
	struct fetch *f = s->f;

	free(s);
	if (--f->open_handles == 0 && f->closing)
		engine_release(f);
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
	struct fetch *f = h->data;

	if (--f->open_handles == 0)
		engine_release(f);
}

static void finish(struct fetch_xfer *x, int err);

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

/* ---- transfers ---- */

struct fetch_xfer *fetch_xfer_new(struct fetch *f, const char *url, const char *api_origin,
				  const char *api_key, const struct fetch_ops *ops, void *data)
{
	struct fetch_xfer *x = calloc(1, sizeof(*x));

	if (!x)
		return NULL;
	x->f = f;
	x->url = strdup(url);
	x->cur_url = strdup(url);
	x->api_origin = api_origin ? strdup(api_origin) : NULL;
	x->api_key = api_key;
	x->ops = ops;
	x->data = data;
	x->easy = curl_easy_init();
	if (!x->url || !x->cur_url || (api_origin && !x->api_origin) || !x->easy) {
		curl_easy_cleanup(x->easy);
		free(x->url);
		free(x->cur_url);
		free(x->api_origin);
		free(x);
		return NULL;
	}
	if (fetch_url_origin(url, x->host, sizeof(x->host)) < 0)
		x->host[0] = '\0'; /* refused at its attempt */
	uv_timer_init(f->loop, &x->timer);
	x->timer.data = x;
	f->open_handles++;
	x->anext = f->all;
	if (f->all)
		f->all->aprev = x;
	f->all = x;
	return x;
}

void *fetch_xfer_data(const struct fetch_xfer *x)
{
	return x->data;
}

const char *fetch_xfer_url(const struct fetch_xfer *x)
{
	return x->url;
}

/* ---- places: owners, the queue, the fair share ---- */

/* The entry of `uid`, made if `create` (then NULL means no memory). Entries stay: one for
 * each local uid that ever fetched. */
static struct owner *owner_find(struct fetch *f, uint32_t uid, bool create)
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

static void queue_push(struct fetch *f, struct fetch_xfer *x, bool front)
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

static void queue_remove(struct fetch *f, struct fetch_xfer *x)
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
static void run_add(struct fetch_xfer *x)
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
static void run_del(struct fetch_xfer *x)
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

static void pump(struct fetch *f)
{
	while (!f->closing && f->queue_head && start_one(f))
		;
}

void fetch_xfer_set_group(struct fetch_xfer *x, uint64_t group)
{
	x->group = group;
}

void fetch_xfer_set_owner(struct fetch_xfer *x, uint32_t uid)
{
	if (x->state == XS_NEW)
		x->owner = uid;
}

void fetch_xfer_set_flags(struct fetch_xfer *x, unsigned flags)
{
	if (x->state == XS_NEW)
		x->flags = flags & (FETCH_XF_METADATA | FETCH_XF_FIRST);
}

int fetch_xfer_if_none_match(struct fetch_xfer *x, const char *etag)
{
	if (x->state != XS_NEW || strlen(etag) >= sizeof(x->if_none_match))
		return -EINVAL;
	snprintf(x->if_none_match, sizeof(x->if_none_match), "%s", etag);
	return 0;
}

int fetch_xfer_set_request(struct fetch_xfer *x, const struct fetch_request *r)
{
	static const char *const methods[] = { "GET", "HEAD", "PUT", "POST", "DELETE" };
	bool known = false;

	if (x->state != XS_NEW || x->n_extra || x->sigv4 || r->n_headers > FETCH_EXTRA_HEADERS ||
	    (r->aws_sigv4 && !r->userpwd))
		return -EINVAL;
	for (size_t i = 0; r->method && i < sizeof(methods) / sizeof(methods[0]); i++)
		known |= strcmp(r->method, methods[i]) == 0;
	if (r->method && !known)
		return -EINVAL;
	snprintf(x->method, sizeof(x->method), "%s", r->method ? r->method : "GET");
	x->body = r->body;
	x->body_len = r->body ? r->body_len : 0;
	for (unsigned i = 0; i < r->n_headers; i++) {
		if (strlen(r->headers[i]) >= EXTRA_HEADER_MAX || strpbrk(r->headers[i], "\r\n"))
			return -EINVAL;
		x->extra[i] = strdup(r->headers[i]);
		if (!x->extra[i])
			return -ENOMEM;
		x->n_extra = i + 1;
	}
	if (r->aws_sigv4 && !(x->sigv4 = strdup(r->aws_sigv4)))
		return -ENOMEM;
	x->userpwd = r->userpwd;
	x->max_attempts = r->max_attempts;
	return 0;
}

/* A PUT's body, from memory; counted as bytes moved for the speed floor. */
static size_t on_read_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	struct fetch_xfer *x = userdata;
	size_t n = size * nmemb, left = x->body_len - x->body_off;

	if (x->cancelled)
		return CURL_READFUNC_ABORT;
	if (n > left)
		n = left;
	memcpy(ptr, x->body + x->body_off, n);
	x->body_off += n;
	x->got += n;
	return n;
}

int fetch_xfer_start(struct fetch_xfer *x)
{
	if (x->state != XS_NEW || x->f->closing)
		return -EINVAL;
	if (!owner_find(x->f, x->owner, true))
		return -ENOMEM;
	x->start_ms = now_ms(x->f);
	x->f->stats.transfers_started++;
	queue_push(x->f, x, false);
	pump(x->f);
	return 0;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata);

/* The header list holds the key: its text is wiped before it goes back to the allocator. */
static void free_headers(struct fetch_xfer *x)
{
	if (x->hdr_mem) {
		explicit_bzero(x->hdr_mem, x->hdr_cap);
		free(x->hdr_mem);
	}
	x->hdr_mem = NULL;
	x->hdr_cap = x->hdr_len = 0;
	x->headers = NULL;
}

/*
 * Appends the header line `a` `b` to the transfer's own list. Copied with memcpy, not a
 * printf, so that no stack buffer sees the key.
 */
static void header_add(struct fetch_xfer *x, unsigned *n, const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	char *p;

	if (*n >= HEADERS_MAX || x->hdr_len + la + lb + 1 > x->hdr_cap)
		return;
	p = x->hdr_mem + x->hdr_len;
	memcpy(p, a, la);
	memcpy(p + la, b, lb);
	p[la + lb] = '\0';
	x->hdr_len += la + lb + 1;
	x->hdr[*n].data = p;
	x->hdr[*n].next = NULL;
	if (*n)
		x->hdr[*n - 1].next = &x->hdr[*n];
	(*n)++;
	x->headers = &x->hdr[0];
}

static void attempt_start(struct fetch_xfer *x)
{
	struct fetch *f = x->f;
	CURL *e = x->easy;
	char hdr[64 + FETCH_ETAG_MAX];
	bool with_key = x->api_key && *x->api_key && same_origin(x->cur_url, x->api_origin);
	unsigned nh = 0;

	curl_easy_reset(e);
	free_headers(x);
	x->body_started = x->error_body = x->paused = x->limit_hit = false;
	x->sink_err = 0;
	x->errbody_len = 0;
	x->errbuf[0] = '\0';
	if (x->restart) {
		x->delivered = 0;
		x->etag[0] = '\0';
		x->restart = false;
	}

	/* built per attempt and wiped with it; the key's bytes are copied here only */
	x->hdr_cap = (with_key ? strlen(x->api_key) + 16 : 0) + 4 * sizeof(hdr) +
		     x->n_extra * EXTRA_HEADER_MAX;
	x->hdr_mem = malloc(x->hdr_cap);
	if (!x->hdr_mem) {
		x->hdr_cap = 0;
		x->state = XS_QUEUED; /* finish() expects not to be in the multi */
		snprintf(x->res.message, sizeof(x->res.message), "out of memory");
		finish(x, -ENOMEM);
		return;
	}
	if (with_key)
		header_add(x, &nh, "apikey: ", x->api_key);
	if (x->delivered > 0 && x->etag[0]) {
		snprintf(hdr, sizeof(hdr), "%" PRIu64 "-", x->delivered);
		header_add(x, &nh, "Range: bytes=", hdr);
		header_add(x, &nh, "If-Range: ", x->etag);
		f->stats.resumed++;
	} else if (x->delivered > 0) {
		/* no validator: a range could splice two versions; start over */
		x->delivered = 0;
	}
	if (x->if_none_match[0] && x->delivered == 0)
		header_add(x, &nh, "If-None-Match: ", x->if_none_match);
	if (!x->sigv4)
		header_add(x, &nh, "Accept: ", "application/octet-stream, application/json");
	for (unsigned i = 0; i < x->n_extra; i++)
		header_add(x, &nh, x->extra[i], "");
	x->body_off = 0;

	curl_easy_setopt(e, CURLOPT_URL, x->cur_url);
	curl_easy_setopt(e, CURLOPT_PRIVATE, x);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->headers);
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->errbuf);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)f->opts.connect_timeout_ms);
	curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, (long)f->opts.low_speed_limit);
	curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME,
			 (long)((f->opts.low_speed_time_ms + 999) / 1000));
	curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)f->opts.max_object_bytes);
	/* HTTP/2's header compression would keep the key in nghttp2's tables (its own memory,
	 * freed without wiping) for the connection's life: requests with the key speak 1.1 */
	curl_easy_setopt(e, CURLOPT_HTTP_VERSION,
			 with_key ? (long)CURL_HTTP_VERSION_1_1 : (long)CURL_HTTP_VERSION_2TLS);
	curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
	curl_easy_setopt(e, CURLOPT_BUFFERSIZE, (long)RECV_BUFFER);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
	if (f->opts.ca_file)
		curl_easy_setopt(e, CURLOPT_CAINFO, f->opts.ca_file);
	if (f->opts.user_agent)
		curl_easy_setopt(e, CURLOPT_USERAGENT, f->opts.user_agent);
	if (strcmp(x->method, "HEAD") == 0) {
		curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
	} else if (strcmp(x->method, "PUT") == 0) {
		curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
		curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read_body);
		curl_easy_setopt(e, CURLOPT_READDATA, x);
		curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)x->body_len);
	} else if (strcmp(x->method, "POST") == 0) {
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, x->body ? (const char *)x->body : "");
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)x->body_len);
	} else if (strcmp(x->method, "DELETE") == 0) {
		curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, "DELETE");
	}
	if (x->sigv4) {
		curl_easy_setopt(e, CURLOPT_AWS_SIGV4, x->sigv4);
		curl_easy_setopt(e, CURLOPT_USERPWD, x->userpwd);
	}

	x->attempts++;
	f->stats.attempts++;
	x->attempt_ms = x->win_ms = now_ms(f);
	x->got = x->win_got = 0;
	if (curl_multi_add_handle(f->multi, e) != CURLM_OK) {
		x->state = XS_QUEUED; /* finish() expects not to be in the multi */
		snprintf(x->res.message, sizeof(x->res.message), "cannot start the transfer");
		finish(x, -DMC_E_INTERNAL);
		return;
	}
	run_add(x);
}

/* Content-Range: bytes FIRST-LAST/TOTAL */
static bool parse_content_range(const char *v, uint64_t *first, uint64_t *total)
{
	unsigned long long a, b, t;
	char star;

	if (!v)
		return false;
	if (sscanf(v, "bytes %llu-%llu/%llu", &a, &b, &t) == 3 && a <= b && b < t) {
		*first = a;
		*total = t;
		return true;
	}
	if (sscanf(v, "bytes %llu-%llu/%c", &a, &b, &star) == 3 && star == '*' && a <= b) {
		*first = a;
		*total = FETCH_SIZE_UNKNOWN;
		return true;
	}
	return false;
}

/* The first body bytes of an attempt: decide what they are. Returns false to abort. */
static bool begin_body(struct fetch_xfer *x)
{
	struct fetch_response r = { 0 };
	long status = 0;
	curl_off_t clen = -1;
	const char *etag, *ct;

	curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
	if (status != 200 && status != 206) {
		x->error_body = true;
		return true;
	}
	curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &clen);
	r.status = status;
	r.total_size = clen >= 0 ? (uint64_t)clen : FETCH_SIZE_UNKNOWN;
	if (status == 206) {
		uint64_t first, total;
		if (!parse_content_range(header_value(x->easy, "Content-Range"), &first, &total) ||
		    first != x->delivered) {
			/* not the part we asked for: take nothing, start over */
			x->restart = true;
			return false;
		}
		r.offset = first;
		r.total_size = total;
	} else {
		r.offset = 0;
		x->delivered = 0; /* a whole body: a resumed object starts over */
	}
	if (r.total_size != FETCH_SIZE_UNKNOWN && r.total_size > x->f->opts.max_object_bytes) {
		x->limit_hit = true;
		return false;
	}
	etag = header_value(x->easy, "ETag");
	if (etag && strncmp(etag, "W/", 2) != 0 && strlen(etag) < sizeof(x->etag))
		snprintf(x->etag, sizeof(x->etag), "%s", etag);
	else if (status == 200)
		x->etag[0] = '\0';
	r.etag = x->etag;
	ct = header_value(x->easy, "Content-Type");
	r.content_type = ct ? ct : "";
	r.has_sha256 = response_sha256(x->easy, r.sha256);
	x->body_started = true;
	if (x->ops->on_start) {
		int rc = x->ops->on_start(x, &r);
		if (rc < 0) {
			x->sink_err = rc;
			return false;
		}
	}
	return true;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	struct fetch_xfer *x = userdata;
	size_t n = size * nmemb;
	int rc;

	if (x->cancelled)
		return 0;
	if (!x->body_started && !x->error_body && !begin_body(x))
		return 0;
	if (x->error_body) {
		size_t take = n < ERRBODY_MAX - 1 - x->errbody_len ? n : ERRBODY_MAX - 1 - x->errbody_len;
		memcpy(x->errbody + x->errbody_len, ptr, take);
		x->errbody_len += take;
		x->errbody[x->errbody_len] = '\0';
		return n;
	}
	if (x->delivered + n > x->f->opts.max_object_bytes) {
		x->limit_hit = true;
		return 0;
	}
	rc = x->ops->on_data(x, ptr, n);
	if (rc == FETCH_PAUSE) {
		x->paused = true;
		return CURL_WRITEFUNC_PAUSE;
	}
	if (rc < 0) {
		x->sink_err = rc;
		return 0;
	}
	x->delivered += n;
	x->got += n;
	x->res.bytes += n;
	x->f->stats.bytes += n;
	return n;
}

void fetch_xfer_resume(struct fetch_xfer *x)
{
	if (!x->paused || x->state != XS_RUNNING)
		return;
	x->paused = false;
	/* may deliver the held bytes to on_data before returning */
	curl_easy_pause(x->easy, CURLPAUSE_CONT);
}

/* ---- ending an attempt ---- */

static void finish(struct fetch_xfer *x, int err)
{
	struct fetch *f = x->f;

	x->state = XS_DONE;
	x->res.err = err;
	x->res.attempts = x->attempts;
	if (err == 0)
		f->stats.transfers_ok++;
	else
		f->stats.transfers_failed++;
	if (err && err != -DMC_E_CANCELLED)
		log_debug(FETCH, "'%s': %s after %u attempt(s)", x->url, x->res.message,
			  x->attempts);
	x->ops->on_done(x, &x->res);
}

/* The server's error text, from a JSON {"message": ...} body if there is one. */
static void error_message(struct fetch_xfer *x, long status)
{
	const char *m = strstr(x->errbody, "\"message\"");
	size_t n = 0;
	char text[160] = "";

	const char *code = strstr(x->errbody, "<Code>");

	if (!m && code) {
		/* S3: <Error><Code>NoSuchKey</Code>... */
		m = code + 6;
		while (m[n] && m[n] != '<' && n < sizeof(text) - 1) {
			text[n] = (m[n] >= 32 && m[n] < 127) ? m[n] : '?';
			n++;
		}
		text[n] = '\0';
		m = NULL;
	}
	if (m && (m = strchr(m + 9, '"'))) {
		m++;
		while (m[n] && m[n] != '"' && n < sizeof(text) - 1) {
			text[n] = (m[n] >= 32 && m[n] < 127) ? m[n] : '?';
			n++;
		}
		text[n] = '\0';
	}
	snprintf(x->res.message, sizeof(x->res.message), "HTTP %ld%s%s", status, *text ? ": " : "",
		 text);
}

static uint64_t backoff_ms(struct fetch_xfer *x)
{
	uint64_t b = x->f->opts.backoff_base_ms, cap = x->f->opts.backoff_max_ms;
	uint32_t k = x->attempts > 1 ? x->attempts - 1 : 0;

	while (k-- && b < cap)
		b *= 2;
	if (b > cap)
		b = cap;
	/* equal jitter: half fixed, half random, so that retries spread but never storm */
	return b / 2 + (b > 1 ? (uint64_t)random() % (b / 2 + 1) : 0);
}

static void on_retry_timer(uv_timer_t *t)
{
	struct fetch_xfer *x = t->data;
	struct fetch *f = x->f;

	if (x->state != XS_WAITING)
		return;
	/* first of its owner's queue; the fair share decides when */
	queue_push(f, x, true);
	pump(f);
}

/* A transient failure: try again later, or give up with retry-after for the client. */
static void retry_or_fail(struct fetch_xfer *x, uint64_t retry_after_ms)
{
	struct fetch *f = x->f;
	uint64_t wait = retry_after_ms ? retry_after_ms : backoff_ms(x);
	uint64_t spent = now_ms(f) - x->start_ms;

	uint32_t max = x->max_attempts ? x->max_attempts : f->opts.max_attempts;

	if (x->attempts >= max || spent + wait > f->opts.retry_budget_ms) {
		x->res.retry_after_ms = (uint32_t)(wait > UINT32_MAX ? UINT32_MAX : wait);
		finish(x, -DMC_E_UPSTREAM_TRANSIENT);
		return;
	}
	log_debug(FETCH, "'%s': %s; retrying in %" PRIu64 " ms", x->url, x->res.message, wait);
	f->stats.retries++;
	x->state = XS_WAITING;
	uv_timer_start(&x->timer, on_retry_timer, wait, 0);
	if (x->ops->on_retry) {
		char msg[FETCH_MESSAGE_MAX];
		struct fetch_retry r = {
			.attempt = x->attempts + 1,
			.max_attempts = max,
			.delay_ms = wait,
			.reason = x->res.message,
			.message = msg,
		};
		snprintf(msg, sizeof(msg), "retrying in %.1f s (attempt %u of %u): %.180s",
			 (double)wait / 1000.0, r.attempt, r.max_attempts, x->res.message);
		x->ops->on_retry(x, &r);
	}
}

/*
 * The speed floor: a file transfer that took in less than min_speed on average over the
 * last min_speed_time holds a place another could use; it ends and is retried (resuming
 * with Range where it can, perhaps from a faster replica or connection).
 */
static void too_slow(struct fetch_xfer *x, uint64_t now)
{
	struct fetch *f = x->f;
	uint64_t span = now - x->win_ms;
	double rate = span ? (double)(x->got - x->win_got) * 1000.0 / (double)span : 0.0;

	run_del(x);
	f->stats.too_slow++;
	snprintf(x->res.message, sizeof(x->res.message),
		 "slower than min_speed (%.1f KiB/s over %.1f s, %.1f KiB/s needed)", rate / 1024.0,
		 (double)span / 1000.0, (double)f->opts.min_speed / 1024.0);
	retry_or_fail(x, 0);
}

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

static bool redirect(struct fetch_xfer *x, long status)
{
	char *loc = NULL;
	char *copy;

	curl_easy_getinfo(x->easy, CURLINFO_REDIRECT_URL, &loc);
	if (!loc) {
		snprintf(x->res.message, sizeof(x->res.message), "HTTP %ld without a Location",
			 status);
		finish(x, -DMC_E_UPSTREAM_PERMANENT);
		return true;
	}
	if (++x->redirects > FETCH_REDIRECTS_MAX) {
		snprintf(x->res.message, sizeof(x->res.message), "more than %d redirects",
			 FETCH_REDIRECTS_MAX);
		finish(x, -DMC_E_UPSTREAM_PERMANENT);
		return true;
	}
	if (strncasecmp(x->cur_url, "https:", 6) == 0 && strncasecmp(loc, "https:", 6) != 0) {
		snprintf(x->res.message, sizeof(x->res.message),
			 "refused a redirect from https to another scheme");
		finish(x, -DMC_E_UPSTREAM_PERMANENT);
		return true;
	}
	if (strncasecmp(loc, "http:", 5) != 0 && strncasecmp(loc, "https:", 6) != 0) {
		snprintf(x->res.message, sizeof(x->res.message), "refused a redirect to a non-HTTP URL");
		finish(x, -DMC_E_UPSTREAM_PERMANENT);
		return true;
	}
	copy = strdup(loc);
	if (!copy) {
		finish(x, -ENOMEM);
		return true;
	}
	free(x->cur_url);
	x->cur_url = copy;
	/* it keeps its place, on the new host even if that one is full: curl queues it then */
	if (fetch_url_origin(copy, x->host, sizeof(x->host)) < 0)
		x->host[0] = '\0';
	x->attempts--; /* a redirect is not a failed attempt */
	attempt_start(x);
	return true;
}

/* The host (and ":port" when `port` is set) of a URL, for messages. */
static void url_host(const char *url, char *out, size_t cap, long *port)
{
	CURLU *u = curl_url();
	char *host = NULL, *p = NULL;

	snprintf(out, cap, "?");
	if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK) {
		snprintf(out, cap, "%.200s", host);
		if (port && curl_url_get(u, CURLUPART_PORT, &p, CURLU_DEFAULT_PORT) == CURLUE_OK)
			*port = strtol(p, NULL, 10);
	}
	curl_free(host);
	curl_free(p);
	curl_url_cleanup(u);
}

/*
 * A refused connection on the first attempt of a job's first request: the address is
 * wrong (nothing listens there), which waiting does not cure. Later, a refusal is more
 * likely a server restarting, and is retried. `out` gets "address:port".
 */
static bool refused_first(struct fetch_xfer *x, char *out, size_t cap)
{
	long os_errno = 0, port = 0;
	char *ip = NULL;
	char host[256];

	if (!(x->flags & FETCH_XF_FIRST) || x->attempts != 1 || x->redirects)
		return false;
	curl_easy_getinfo(x->easy, CURLINFO_OS_ERRNO, &os_errno);
	if (os_errno != ECONNREFUSED)
		return false;
	url_host(x->cur_url, host, sizeof(host), &port);
	if (curl_easy_getinfo(x->easy, CURLINFO_PRIMARY_IP, &ip) == CURLE_OK && ip && *ip)
		snprintf(host, sizeof(host), "%s", ip);
	snprintf(out, cap, "%.200s:%ld", host, port);
	return true;
}

static void attempt_done(struct fetch_xfer *x, CURLcode cc)
{
	long status = 0;
	curl_off_t ra = 0;
	char host[256];

	curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
	if (status)
		x->res.http_status = status;
	if (x->cancelled) {
		snprintf(x->res.message, sizeof(x->res.message), "cancelled");
		finish(x, -DMC_E_CANCELLED);
		return;
	}
	if (x->sink_err) {
		if (!x->res.message[0])
			snprintf(x->res.message, sizeof(x->res.message), "the body was refused: %s",
				 x->sink_err <= -DMC_E_FIRST_ ? dmc_error_text((uint32_t)-x->sink_err)
							      : strerror(-x->sink_err));
		finish(x, x->sink_err);
		return;
	}
	if (x->limit_hit || cc == CURLE_FILESIZE_EXCEEDED) {
		snprintf(x->res.message, sizeof(x->res.message),
			 "object larger than max_object_bytes (%" PRIu64 ")",
			 x->f->opts.max_object_bytes);
		finish(x, -DMC_E_LIMIT_EXCEEDED);
		return;
	}
	if (x->restart) {
		snprintf(x->res.message, sizeof(x->res.message),
			 "the server sent another range than asked for");
		retry_or_fail(x, 0);
		return;
	}
	if (cc == CURLE_OK) {
		if (status == 200 || status == 206) {
			if (!x->body_started && !begin_body(x)) {
				attempt_done(x, CURLE_WRITE_ERROR);
				return;
			}
			finish(x, 0);
			return;
		}
		if (status == 304 && x->if_none_match[0]) {
			finish(x, 0);
			return;
		}
		if (status >= 300 && status < 400 && status != 304 && redirect(x, status))
			return;
		error_message(x, status);
		if (status == 416 && x->delivered > 0) {
			/* the resumed range is not there (a lying Content-Length): start over */
			x->restart = true;
			retry_or_fail(x, 0);
			return;
		}
		switch (status) {
		case 408: case 429: case 500: case 502: case 503: case 504:
			curl_easy_getinfo(x->easy, CURLINFO_RETRY_AFTER, &ra);
			retry_or_fail(x, ra > 0 ? (uint64_t)ra * 1000 : 0);
			return;
		case 401: case 403: case 404: case 410:
			finish(x, -DMC_E_NOT_FOUND_OR_DENIED);
			return;
		default:
			finish(x, -DMC_E_UPSTREAM_PERMANENT);
			return;
		}
	}
	snprintf(x->res.message, sizeof(x->res.message), "%s", x->errbuf[0] ? x->errbuf
									    : curl_easy_strerror(cc));
	switch (cc) {
	case CURLE_COULDNT_RESOLVE_HOST:
		/* waiting does not make a name exist: no retries (a typo, or no DNS at all) */
		url_host(x->cur_url, host, sizeof(host), NULL);
		snprintf(x->res.message, sizeof(x->res.message), "cannot resolve host '%.200s'",
			 host);
		finish(x, -DMC_E_UPSTREAM_PERMANENT);
		return;
	case CURLE_COULDNT_CONNECT:
		if (refused_first(x, host, sizeof(host))) {
			snprintf(x->res.message, sizeof(x->res.message),
				 "connection refused by %.200s", host);
			finish(x, -DMC_E_UPSTREAM_PERMANENT);
			return;
		}
		retry_or_fail(x, 0);
		return;
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_SSL_ENGINE_NOTFOUND:
	case CURLE_SSL_ENGINE_SETFAILED:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_CIPHER:
	case CURLE_SSL_ENGINE_INITFAILED:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_SSL_CRL_BADFILE:
	case CURLE_SSL_ISSUER_ERROR:
	case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
	case CURLE_SSL_INVALIDCERTSTATUS:
	case CURLE_SSL_CLIENTCERT:
	case CURLE_USE_SSL_FAILED:
		/* TLS trouble is never retried and never "fixed" by going insecure */
		snprintf(x->res.message, sizeof(x->res.message), "TLS: %.200s",
			 x->errbuf[0] ? x->errbuf : curl_easy_strerror(cc));
		finish(x, -DMC_E_UPSTREAM_PERMANENT);
		return;
	case CURLE_UNSUPPORTED_PROTOCOL:
	case CURLE_URL_MALFORMAT:
	case CURLE_TOO_MANY_REDIRECTS:
		finish(x, -DMC_E_UPSTREAM_PERMANENT);
		return;
	case CURLE_OUT_OF_MEMORY:
		finish(x, -ENOMEM);
		return;
	default:
		/* connect, resolve, timeouts (low speed included), partial bodies, resets */
		retry_or_fail(x, 0);
		return;
	}
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

static void on_deferred_done(uv_timer_t *t)
{
	struct fetch_xfer *x = t->data;

	snprintf(x->res.message, sizeof(x->res.message), "cancelled");
	finish(x, -DMC_E_CANCELLED);
}

void fetch_xfer_cancel(struct fetch_xfer *x)
{
	struct fetch *f = x->f;

	if (x->state == XS_DONE || x->state == XS_NEW || x->cancelled)
		return;
	x->cancelled = true;
	if (x->state == XS_RUNNING) {
		run_del(x);
	} else if (x->state == XS_QUEUED) {
		queue_remove(f, x);
	}
	x->state = XS_WAITING;
	/* on_done from the loop, not from inside the caller */
	uv_timer_start(&x->timer, on_deferred_done, 0, 0);
	pump(f);
}

static void on_xfer_timer_closed(uv_handle_t *h)
{
	struct fetch_xfer *x = h->data;
	struct fetch *f = x->f;

	free(x);
	if (--f->open_handles == 0 && f->closing)
		engine_release(f);
}

void fetch_xfer_free(struct fetch_xfer *x)
{
	struct fetch *f;

	if (!x)
		return;
	f = x->f;
	if (x->state != XS_DONE && x->state != XS_NEW)
		return; /* still running: a bug in the caller; better a leak than a crash */
	if (x->aprev)
		x->aprev->anext = x->anext;
	else
		f->all = x->anext;
	if (x->anext)
		x->anext->aprev = x->aprev;
	curl_easy_cleanup(x->easy);
	free_headers(x);
	free(x->url);
	free(x->cur_url);
	free(x->api_origin);
	for (unsigned i = 0; i < x->n_extra; i++)
		free(x->extra[i]);
	free(x->sigv4);
	x->freed = true;
	uv_close((uv_handle_t *)&x->timer, on_xfer_timer_closed);
}
