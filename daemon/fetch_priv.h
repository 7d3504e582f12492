/*
 * fetch's private declarations: the state the parts of fetch (fetch.c: the engine and its
 * places; fetch_xfer.c: one transfer's life; fetch_response.c: reading a response) share,
 * and the functions one part calls in another. Not for the rest of the daemon: its
 * interface is fetch.h. With the three parts, the only files that include curl.
 * Everything here belongs to the loop thread.
 */
#ifndef DMC_FETCH_PRIV_H
#define DMC_FETCH_PRIV_H

#include <curl/curl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "fetch.h"

#define ERRBODY_MAX 1024u
#define RECV_BUFFER (256u << 10) /* fewer, larger write callbacks for big bodies */
#define HEADERS_MAX (6 + FETCH_EXTRA_HEADERS) /* request headers a transfer sends */

enum xfer_state {
	XS_NEW,
	XS_QUEUED,
	XS_RUNNING, /* in the multi handle */
	XS_WAITING, /* for a retry timer */
	XS_DONE,
};

struct sock_ctx;

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

static inline uint64_t now_ms(struct fetch *f)
{
	return uv_now(f->loop);
}

/* fetch.c: the engine and its places */
void engine_handle_closed(struct fetch *f);
struct owner *owner_find(struct fetch *f, uint32_t uid, bool create);
void queue_push(struct fetch *f, struct fetch_xfer *x, bool front);
void queue_remove(struct fetch *f, struct fetch_xfer *x);
void run_add(struct fetch_xfer *x);
void run_del(struct fetch_xfer *x);
void pump(struct fetch *f);

/* fetch_xfer.c: a transfer */
void attempt_start(struct fetch_xfer *x);
void attempt_done(struct fetch_xfer *x, CURLcode cc);
void retry_or_fail(struct fetch_xfer *x, uint64_t retry_after_ms);
void too_slow(struct fetch_xfer *x, uint64_t now);
void finish(struct fetch_xfer *x, int err);

/* fetch_response.c: reading a response */
bool begin_body(struct fetch_xfer *x);
size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata);
void error_message(struct fetch_xfer *x, long status);

#endif
