/*
 * fetch's transfers (see fetch.h): one transfer's life from fetch_xfer_new() to
 * fetch_xfer_free(): its request (the URL, the method and body, the header lines it owns,
 * the API key among them, to the API's origin only, wiped after each attempt; Range and
 * If-Range to resume), each attempt's setup on its easy handle, the outcome of an attempt
 * (done, retried with backoff or Retry-After within the budget, redirected, or failed at
 * once for what waiting does not cure), the speed floor's verdict on one transfer, and
 * cancellation; and the URL helpers (fetch_escape, origins). When it runs is the engine's
 * (fetch.c), what a response says fetch_response.c's. Loop thread only.
 */
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fetch_priv.h"
#include "log.h"
#include "proto.h"

#define EXTRA_HEADER_MAX 512u    /* one extra header line */

/* ---- URLs ---- */

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

void attempt_start(struct fetch_xfer *x)
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

void fetch_xfer_resume(struct fetch_xfer *x)
{
	if (!x->paused || x->state != XS_RUNNING)
		return;
	x->paused = false;
	/* may deliver the held bytes to on_data before returning */
	curl_easy_pause(x->easy, CURLPAUSE_CONT);
}

/* ---- ending an attempt ---- */

void finish(struct fetch_xfer *x, int err)
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
void retry_or_fail(struct fetch_xfer *x, uint64_t retry_after_ms)
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
void too_slow(struct fetch_xfer *x, uint64_t now)
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

void attempt_done(struct fetch_xfer *x, CURLcode cc)
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
				 dmc_err_text(x->sink_err));
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
	engine_handle_closed(f);
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
