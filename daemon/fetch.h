/*
 * fetch: HTTP transfers with libcurl's multi *socket* interface on the daemon's libuv loop
 * (curl's docs/examples/multi-uv.c pattern). Its parts, the only files that include curl:
 * fetch.c (the engine and its places), fetch_xfer.c (one transfer's life) and
 * fetch_response.c (reading a response), with their shared state in fetch_priv.h.
 *
 * A transfer (struct fetch_xfer) is a GET of one URL whose body goes to a sink (struct
 * fetch_ops) in chunks. The engine owns connection reuse (HTTP/1.1 keep-alive; HTTP/2
 * multiplexing where offered, for requests without the key: see below), limits (parallel
 * transfers, connections per host, connect and low-speed timeouts, maximum object size),
 * retries with exponential backoff and full jitter for 408/429/500/502/503/504 and
 * network errors only, Retry-After in both forms, and resumption of a dropped body with
 * Range + If-Range (strong ETag).
 *
 * Places are shared between local users: each transfer has an owner (the uid it works for).
 * While more than one owner has transfers running or waiting, an owner holds at most
 * max(1, max_parallel / active owners) places; a freed place goes to the next owner in
 * turn (round-robin by uid); an owner over its share gives up its most recently started
 * file transfer (preemption: the transfer waits again and resumes with Range where it can)
 * when another owner under its share is waiting. Metadata requests (FETCH_XF_METADATA) go
 * ahead of their owner's file transfers. A place left over by the division goes to the
 * next owner in turn, so no place stays idle while anyone waits.
 *
 * A file transfer slower than min_speed, averaged over min_speed_time, is ended with a
 * transient error and retried (it holds a place another could use); curl's own low-speed
 * check (low_speed_limit over low_speed_time, every transfer, metadata included) stays as
 * the detector of stalled connections.
 *
 * Failures that waiting cannot cure end the transfer at once, whatever the retry budget:
 * a host name that does not resolve, TLS errors, and a refused connection on the first
 * attempt of a job's first request (FETCH_XF_FIRST: the address is wrong, not the server
 * restarting). They end with -DMC_E_UPSTREAM_PERMANENT and http_status 0: not the
 * transient code, whose promise is that retries were made (retry_after_ms says when to
 * try again); "no HTTP answer" is how the prefetcher tells an unreachable server, for
 * which a valid grant may answer from the cache at once.
 *
 * The API key reaches libcurl only in a header list this file owns, wiped before it is
 * freed; libcurl's own allocations (request buffers) go through allocators that wipe every
 * block they free (curl_global_init_mem). Requests with the key use HTTP/1.1: HTTP/2's
 * HPACK would index the header in nghttp2's dynamic table (nghttp2's own allocator, freed
 * without wiping) for the connection's life. OpenSSL encrypts a record in place in its
 * write buffer: over HTTPS the trust-fair test finds no copy there either. What stays:
 * kernel socket buffers, outside the process, and the key's own locked mapping while its
 * job runs (secret.h).
 *
 * Redirects are followed by the engine, not by curl, so that the API key goes only to the
 * API's own origin (scheme, host and port): a redirect anywhere else (the pre-signed URL
 * pattern) is followed without the key, a redirect from https to http is refused, and at
 * most FETCH_REDIRECTS_MAX are taken. Only http and https are spoken.
 *
 * Threads: everything here runs on the loop thread, and no fetch function may be called
 * from inside a sink callback except fetch_pause-free ones documented below.
 *
 * Glossary: an *attempt* is one HTTP request; a *transfer* is the whole effort to get one
 * body, through retries and redirects.
 */
#ifndef DMC_FETCH_H
#define DMC_FETCH_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#define FETCH_SIZE_UNKNOWN UINT64_MAX
#define FETCH_REDIRECTS_MAX 5
#define FETCH_ETAG_MAX 256
#define FETCH_MESSAGE_MAX 256

struct fetch_options {
	uint32_t max_parallel;        /* transfers running at once; more wait in a queue */
	uint32_t max_per_host;        /* connections to one host */
	uint64_t connect_timeout_ms;
	uint32_t low_speed_limit;     /* bytes/s: slower than this for low_speed_time aborts */
	uint64_t low_speed_time_ms;
	uint64_t min_speed;           /* bytes/s a file transfer keeps up on average; 0: none */
	uint64_t min_speed_time_ms;   /* over this window */
	uint64_t max_object_bytes;    /* largest body accepted */
	uint32_t max_attempts;        /* per transfer, the first one included */
	uint64_t backoff_base_ms;     /* first retry waits up to this (full jitter) */
	uint64_t backoff_max_ms;      /* cap of one wait */
	uint64_t retry_budget_ms;     /* no retry starts after this much time on a transfer */
	const char *ca_file;          /* CA bundle for TLS verification; NULL: the system's */
	const char *user_agent;
};

struct fetch;
struct fetch_xfer;

/* What a response said, for the sink. Strings are borrowed for the callback. */
struct fetch_response {
	long status;              /* 200 or 206 */
	uint64_t offset;          /* first byte of this body within the object */
	uint64_t total_size;      /* the object's size, or FETCH_SIZE_UNKNOWN */
	const char *etag;         /* strong ETag, "" when none (or weak) */
	const char *content_type; /* "" when none */
	bool has_sha256;          /* the server stated the object's SHA-256 (Repr-Digest) */
	uint8_t sha256[32];
};

/* How a transfer ended. */
struct fetch_result {
	int err;                  /* 0, or a negated enum dmc_error / negative errno */
	long http_status;         /* the last HTTP status seen, 0 if none */
	uint32_t retry_after_ms;  /* for -DMC_E_UPSTREAM_TRANSIENT: when to try again */
	uint32_t attempts;
	uint64_t bytes;           /* body bytes delivered to the sink, over all attempts */
	char message[FETCH_MESSAGE_MAX]; /* for the log and the client; never secrets */
};

/* A transient failure about to be retried, for the sink to show. Borrowed for the call. */
struct fetch_retry {
	uint32_t attempt;         /* the attempt about to start: 2 for the first retry */
	uint32_t max_attempts;
	uint64_t delay_ms;        /* when it starts */
	const char *reason;       /* why the last attempt failed ("HTTP 503", ...) */
	const char *message;      /* "retrying in 2.0 s (attempt 2 of 5): HTTP 503" */
};

/* Returned by on_data to stop the flow: the same bytes come again after fetch_resume(). */
#define FETCH_PAUSE 1

struct fetch_ops {
	/*
	 * Called when an attempt's body starts. `r->offset` is 0 for a fresh body (after bytes
	 * were delivered by an earlier attempt, the sink must discard them and start over), or
	 * the number of bytes already delivered when the attempt resumes. Return 0 to take the
	 * body; a negative error ends the transfer with it (no retry).
	 */
	int (*on_start)(struct fetch_xfer *x, const struct fetch_response *r);
	/* Body bytes (borrowed). Return 0, FETCH_PAUSE, or a negative error (no retry). */
	int (*on_data)(struct fetch_xfer *x, const void *buf, size_t len);
	/* The transfer is over; `x` stays valid until fetch_xfer_free(). */
	void (*on_done)(struct fetch_xfer *x, const struct fetch_result *res);
	/* Optional: a retry was scheduled. No fetch function may be called from it. */
	void (*on_retry)(struct fetch_xfer *x, const struct fetch_retry *r);
};

/* Creates the engine on `loop`. `opts` is copied (ca_file and user_agent are borrowed). */
int fetch_new(uv_loop_t *loop, const struct fetch_options *opts, struct fetch **ret);
/* Cancels every transfer (their on_done run with -DMC_E_CANCELLED), then closes the handles;
 * the engine is freed from the last close callback. */
void fetch_free(struct fetch *f);

/*
 * A transfer of `url` (copied). `api_origin` (copied; NULL for none) is the URL of the API
 * whose key this is: the key (borrowed: it must outlive the transfer) goes in the `apikey`
 * header to that origin only. `data` is the sink's.
 */
struct fetch_xfer *fetch_xfer_new(struct fetch *f, const char *url, const char *api_origin,
				  const char *api_key, const struct fetch_ops *ops, void *data);
/*
 * Makes the transfer conditional: with `etag` (copied) in If-None-Match, a 304 answer ends
 * the transfer at once with err 0 and http_status 304, without on_start or a body. Call
 * before fetch_xfer_start().
 */
int fetch_xfer_if_none_match(struct fetch_xfer *x, const char *etag);
/*
 * Puts the transfer in a group (a prefetch job, say): when places are scarce, the group
 * with the fewest running transfers goes first, oldest first within a group. Default 0.
 */
void fetch_xfer_set_group(struct fetch_xfer *x, uint64_t group);
/* The uid the transfer works for: places are shared round-robin between owners. Default 0. */
void fetch_xfer_set_owner(struct fetch_xfer *x, uint32_t uid);

#define FETCH_XF_METADATA 1u /* a small API answer: before its owner's files, no speed floor */
#define FETCH_XF_FIRST 2u    /* a job's first request: a refused connection is final at once */
/*
 * Another request than a plain GET (the cluster tier's S3 requests, tier.h). `method` is
 * "GET" (the default), "HEAD", "PUT", "POST" or "DELETE"; a PUT or POST sends `body`
 * (borrowed: it must outlive the transfer), counted against the speed floor as received
 * bytes are. `headers` are extra request lines ("Name: value", copied, at most
 * FETCH_EXTRA_HEADERS). With `aws_sigv4` (copied, "aws:amz:REGION:s3") the request is
 * signed by libcurl's AWS Signature V4 with `userpwd` ("ACCESS:SECRET", borrowed; libcurl's
 * copies are wiped like every block it frees). `max_attempts` (0: the engine's) bounds the
 * attempts of this transfer. An error answer's S3 <Code> is in the result's message
 * ("HTTP 403: QuotaExceeded"). Call before fetch_xfer_start().
 */
#define FETCH_EXTRA_HEADERS 6
struct fetch_request {
	const char *method;
	const void *body;
	size_t body_len;
	const char *const *headers;
	unsigned n_headers;
	const char *aws_sigv4;
	const char *userpwd;
	uint32_t max_attempts;
};
int fetch_xfer_set_request(struct fetch_xfer *x, const struct fetch_request *r);

/* FETCH_XF_* flags; call before fetch_xfer_start(). */
void fetch_xfer_set_flags(struct fetch_xfer *x, unsigned flags);
/* Queues the transfer; it starts when a place is free. */
int fetch_xfer_start(struct fetch_xfer *x);
/* Continues a transfer whose on_data returned FETCH_PAUSE. */
void fetch_xfer_resume(struct fetch_xfer *x);
/* Stops a transfer: on_done runs (later, from the loop) with -DMC_E_CANCELLED. */
void fetch_xfer_cancel(struct fetch_xfer *x);
/* Frees a finished transfer (after on_done) or one never started. */
void fetch_xfer_free(struct fetch_xfer *x);
void *fetch_xfer_data(const struct fetch_xfer *x);
const char *fetch_xfer_url(const struct fetch_xfer *x);

/* Engine counters for STATUS. */
struct fetch_stats {
	uint64_t transfers_started, transfers_ok, transfers_failed;
	uint64_t attempts, retries, resumed;
	uint64_t preempted;      /* running transfers that gave their place to another owner */
	uint64_t too_slow;       /* attempts ended by the speed floor */
	uint64_t bytes;          /* body bytes received */
	uint32_t running, queued;
};
void fetch_get_stats(const struct fetch *f, struct fetch_stats *ret);

/* `s` percent-encoded for a URL path or query value; free with free(). NULL: no memory. */
char *fetch_escape(const char *s);

/* The origin ("https://host:port") of a URL, for comparisons; -EINVAL if not http(s). */
int fetch_url_origin(const char *url, char *out, size_t cap);

#endif
