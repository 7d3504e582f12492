/*
 * tier_admin: the TIER request (proto.h), administration of the cluster tier by the daemon
 * with its own tier credentials (the CLI never has them): `dmcache tier ls` lists the
 * tier's blobs and counts its mappings; `dmcache tier verify` reads every blob and checks
 * it as a node would (store_check_*: header, SHA-256 of the decoded content), and deletes
 * the bad ones with --repair; `dmcache tier gc` deletes the mappings older than
 * tier_retention, then the blobs no remaining mapping names that are older than the grace
 * period (DMC_TIER_GC_GRACE_S, or tier_retention when shorter), so that a blob whose
 * mapping is not written yet is not collected. One concern: ListObjectsV2 pages (parsed
 * with bounds, XML entities decoded), mapping GETs and DELETEs, one request at a time.
 *
 * Admins only (root, the daemon's uid, the admin group): it sees and deletes every user's
 * objects. Objects under the prefix whose names are not the tier's own are counted and
 * left alone.
 *
 * Threads: the loop thread only (verify's hashing too: one blob at a time, in the chunks
 * the transfer hands over).
 */
#include "tier_admin.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "conf.h"
#include "conn.h"
#include "log.h"
#include "proto.h"
#include "tier.h"

#define RESP_CAP (16u << 20)   /* one ListObjectsV2 page (1000 keys) is far below */
#define KEY_MAX 1024u          /* S3's own limit on a key */
#define TOKEN_MAX 4096u
#define OBJECTS_MAX 50000000u

enum phase { PH_LIST, PH_MAP_GET, PH_MAP_DEL, PH_BLOB_DEL, PH_BLOB_GET, PH_BAD_DEL };

struct obj {
	char *key;
	uint64_t size;
	int64_t mtime; /* Unix seconds */
	uint8_t digest[STORE_DIGEST_SIZE];
	bool named;    /* the tier's own name: blobs/ab/<sha256> or maps/<sha256> */
};

struct objs {
	struct obj *v;
	size_t n, cap;
};

struct tadm {
	struct tadm *next;
	struct tier *t;
	struct conn *c; /* NULL once the connection closed: the work goes on, unanswered */
	uint32_t request_id, action, flags;
	uint64_t retention_s, grace_s;
	int64_t now;
	enum phase phase;
	bool listing_blobs;
	char token[TOKEN_MAX];
	char *resp;
	size_t len;
	bool over;
	struct objs maps, blobs;
	size_t idx;
	uint8_t (*refs)[STORE_DIGEST_SIZE];
	size_t n_refs, cap_refs;
	struct store_check *chk; /* verify: the blob being read */
	uint64_t got;
	struct dmc_tier_reply r;
	char *entries;
	size_t entries_len;
};

static struct tadm *running;

static void step(struct tadm *a);

/* ---- small helpers ---- */

static void objs_free(struct objs *o)
{
	for (size_t i = 0; i < o->n; i++)
		free(o->v[i].key);
	free(o->v);
}

static void tadm_free(struct tadm *a)
{
	objs_free(&a->maps);
	objs_free(&a->blobs);
	free(a->refs);
	free(a->resp);
	free(a->entries);
	store_check_free(a->chk);
	free(a);
}

static void finish(struct tadm *a, uint32_t code, const char *msg)
{
	struct tadm **pp;

	for (pp = &running; *pp && *pp != a; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = a->next;
	if (a->c) {
		if (code) {
			conn_send_error(a->c, a->request_id, code, NULL, "tier: %s", msg);
		} else {
			size_t cap = DMC_HEADER_SIZE + 64 + a->entries_len;
			uint8_t *frame = malloc(cap);
			int n;

			a->r.entries.ptr = a->entries ? a->entries : "";
			a->r.entries.len = (uint32_t)a->entries_len;
			n = frame ? dmc_tier_reply_encode(&a->r, a->request_id, frame, cap) : -1;
			if (n > 0)
				conn_send(a->c, frame, (size_t)n);
			else
				conn_send_error(a->c, a->request_id, DMC_E_INTERNAL, NULL,
						"tier: out of memory");
			free(frame);
		}
	}
	if (code)
		log_warn(FETCH, "cluster tier: %s %s",
			 a->action == DMC_TIER_GC ? "gc" : a->action == DMC_TIER_VERIFY ? "verify" : "ls",
			 msg);
	else if (a->action == DMC_TIER_VERIFY && a->r.blobs_bad)
		log_warn(FETCH, "cluster tier verify: %" PRIu64 " bad blob(s), %" PRIu64 " deleted",
			 a->r.blobs_bad, a->r.blobs_deleted);
	else if (a->action == DMC_TIER_GC && !(a->flags & DMC_TIER_DRY_RUN))
		log_notice(FETCH, "cluster tier gc: %" PRIu64 " mapping(s) and %" PRIu64
			   " blob(s) (%" PRIu64 " bytes) deleted", a->r.maps_deleted,
			   a->r.blobs_deleted, a->r.bytes_deleted);
	tadm_free(a);
}

static void entry(struct tadm *a, const struct obj *o, const char *state)
{
	char line[160], hex[STORE_HEX_SIZE + 1];
	int n;

	store_digest_hex(o->digest, hex);
	n = snprintf(line, sizeof(line), "%s %" PRIu64 " %" PRId64 " %s\n", hex, o->size, o->mtime,
		     state);
	if (n <= 0 || (size_t)n >= sizeof(line))
		return;
	if (a->entries_len + (size_t)n > DMC_TIER_ENTRIES_MAX) {
		a->r.truncated = 1;
		return;
	}
	if (!a->entries) {
		a->entries = malloc(DMC_TIER_ENTRIES_MAX + 1);
		if (!a->entries) {
			a->r.truncated = 1;
			return;
		}
	}
	memcpy(a->entries + a->entries_len, line, (size_t)n);
	a->entries_len += (size_t)n;
}

/*
 * A blob gone from the tier (or, with --dry-run, that would go): counted in the answer, and
 * listed by gc (verify --repair listed it as "bad" already).
 */
static void blob_deleted(struct tadm *a, const struct obj *o)
{
	a->r.blobs_deleted++;
	a->r.bytes_deleted += o->size;
	if (a->action == DMC_TIER_GC)
		entry(a, o, "deleted");
}

/* Percent-encodes `s` (everything but unreserved characters) into out; false if too long. */
static bool url_encode(const char *s, char *out, size_t cap)
{
	size_t o = 0;

	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (o + 4 > cap)
			return false;
		if (isalnum(*p) || strchr("-._~", *p))
			out[o++] = (char)*p;
		else
			o += (size_t)snprintf(out + o, cap - o, "%%%02X", *p);
	}
	out[o] = '\0';
	return true;
}

/* ---- the ListObjectsV2 answer ---- */

/* The text of the first <tag>...</tag> in [p, end), XML entities decoded, into out (cap);
 * NULL when absent, malformed or too long; else the end of the element. */
static const char *xml_text(const char *p, const char *end, const char *tag, char *out,
			    size_t cap)
{
	char open[48], close[48];
	const char *s, *e;
	size_t o = 0;

	snprintf(open, sizeof(open), "<%s>", tag);
	snprintf(close, sizeof(close), "</%s>", tag);
	s = memmem(p, (size_t)(end - p), open, strlen(open));
	if (!s)
		return NULL;
	s += strlen(open);
	e = memmem(s, (size_t)(end - s), close, strlen(close));
	if (!e)
		return NULL;
	for (const char *q = s; q < e;) {
		char ch = *q;
		if (ch == '&') {
			const char *sc = memchr(q, ';', (size_t)(e - q));
			size_t n = sc ? (size_t)(sc - q) + 1 : 0;
			if (!sc || n > 10)
				return NULL;
			if (n == 5 && memcmp(q, "&amp;", 5) == 0)
				ch = '&';
			else if (n == 4 && memcmp(q, "&lt;", 4) == 0)
				ch = '<';
			else if (n == 4 && memcmp(q, "&gt;", 4) == 0)
				ch = '>';
			else if (n == 6 && memcmp(q, "&quot;", 6) == 0)
				ch = '"';
			else if (n == 6 && memcmp(q, "&apos;", 6) == 0)
				ch = '\'';
			else if (n >= 4 && q[1] == '#') {
				char num[8];
				long v;
				char *ne;
				bool hx = q[2] == 'x';
				memcpy(num, q + (hx ? 3 : 2), n - (hx ? 4 : 3));
				num[n - (hx ? 4 : 3)] = '\0';
				v = strtol(num, &ne, hx ? 16 : 10);
				if (*ne || !num[0] || v <= 0 || v > 127)
					return NULL; /* the tier's own names are ASCII */
				ch = (char)v;
			} else {
				return NULL;
			}
			q += n;
		} else {
			q++;
		}
		if (o + 1 >= cap || ch == '\0')
			return NULL;
		out[o++] = ch;
	}
	out[o] = '\0';
	return e + strlen(close);
}

/* "2026-12-03T11:22:46.000Z" -> Unix seconds; -1 if malformed. */
static int64_t parse_time(const char *s)
{
	struct tm tm;
	int y, mo, d, h, mi, se;

	memset(&tm, 0, sizeof(tm));
	if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d", &y, &mo, &d, &h, &mi, &se) != 6 || y < 1970 ||
	    mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || se > 60)
		return -1;
	tm.tm_year = y - 1900;
	tm.tm_mon = mo - 1;
	tm.tm_mday = d;
	tm.tm_hour = h;
	tm.tm_min = mi;
	tm.tm_sec = se;
	return (int64_t)timegm(&tm);
}

/* The tier's own name after `prefix`: blobs/ab/<hex> (ab its first two) or maps/<hex>. */
static bool own_name(const char *key, const char *prefix, bool blob, uint8_t *digest)
{
	const char *p = key + strlen(prefix);

	if (blob) {
		if (strlen(p) != 3 + STORE_HEX_SIZE || p[2] != '/' || memcmp(p, p + 3, 2) != 0)
			return false;
		p += 3;
	}
	return strlen(p) == STORE_HEX_SIZE && store_digest_parse(p, STORE_HEX_SIZE, digest) == 0;
}

/* Adds the <Contents> of a page to the list being made; -1: malformed. */
static int parse_page(struct tadm *a, const char *prefix)
{
	const char *p = a->resp, *end = a->resp + a->len;
	struct objs *o = a->listing_blobs ? &a->blobs : &a->maps;
	char trunc[16];

	if (memmem(p, a->len, "<Error>", 7) || !memmem(p, a->len, "<ListBucketResult", 17))
		return -1;
	for (;;) {
		const char *cs = memmem(p, (size_t)(end - p), "<Contents>", 10), *ce;
		char key[KEY_MAX + 1], size[32], lm[64];
		struct obj *ob;
		char *e;

		if (!cs)
			break;
		ce = memmem(cs, (size_t)(end - cs), "</Contents>", 11);
		if (!ce)
			return -1;
		if (!xml_text(cs, ce, "Key", key, sizeof(key)) ||
		    !xml_text(cs, ce, "Size", size, sizeof(size)) ||
		    !xml_text(cs, ce, "LastModified", lm, sizeof(lm)))
			return -1;
		p = ce + 11;
		if (strncmp(key, prefix, strlen(prefix)) != 0)
			return -1; /* not what was asked for */
		if (o->n == o->cap) {
			size_t cap = o->cap ? o->cap * 2 : 256;
			void *nv = cap <= OBJECTS_MAX ? realloc(o->v, cap * sizeof(*o->v)) : NULL;
			if (!nv)
				return -1;
			o->v = nv;
			o->cap = cap;
		}
		ob = &o->v[o->n];
		memset(ob, 0, sizeof(*ob));
		errno = 0;
		ob->size = strtoull(size, &e, 10);
		ob->mtime = parse_time(lm);
		if (errno || *e || !size[0] || ob->mtime < 0)
			return -1;
		ob->key = strdup(key);
		if (!ob->key)
			return -1;
		ob->named = own_name(key, prefix, a->listing_blobs, ob->digest);
		o->n++;
	}
	if (!xml_text(a->resp, end, "IsTruncated", trunc, sizeof(trunc)))
		return -1;
	if (strcmp(trunc, "true") == 0) {
		if (!xml_text(a->resp, end, "NextContinuationToken", a->token, sizeof(a->token)) ||
		    !a->token[0])
			return -1;
	} else {
		a->token[0] = '\0';
	}
	return 0;
}

/* ---- requests ---- */

static int on_start(struct fetch_xfer *x, const struct fetch_response *r)
{
	struct tadm *a = fetch_xfer_data(x);

	if (a->phase == PH_BLOB_GET) {
		if (r->offset == 0) {
			store_check_free(a->chk);
			a->got = 0;
			if (store_check_new(&a->chk) < 0)
				return -ENOMEM;
		} else if (r->offset != a->got) {
			return -EIO; /* a resumed read that does not continue where it stopped */
		}
		return 0;
	}
	if (r->offset == 0)
		a->len = 0;
	a->over = false;
	return 0;
}

static int on_data(struct fetch_xfer *x, const void *buf, size_t len)
{
	struct tadm *a = fetch_xfer_data(x);

	if (a->phase == PH_BLOB_GET) {
		a->got += len;
		if (a->chk)
			(void)store_check_feed(a->chk, buf, len); /* finish says what it found */
		return 0;
	}
	if (a->phase != PH_LIST && a->phase != PH_MAP_GET)
		return 0;
	if (len > RESP_CAP - a->len) {
		a->over = true;
		return 0;
	}
	if (!a->resp) {
		a->resp = malloc(RESP_CAP + 1);
		if (!a->resp)
			return -ENOMEM;
	}
	memcpy(a->resp + a->len, buf, len);
	a->len += len;
	a->resp[a->len] = '\0';
	return 0;
}

static void on_done(struct fetch_xfer *x, const struct fetch_result *res);

static const struct fetch_ops ops = { .on_start = on_start, .on_data = on_data,
				      .on_done = on_done };

static bool request(struct tadm *a, const char *key, const char *query, const char *method)
{
	struct fetch_xfer *x = tier_object_xfer(a->t, key, query, method, &ops, a);

	if (!x)
		return false;
	a->len = 0;
	tier_hold(a->t);
	if (fetch_xfer_start(x) < 0) {
		fetch_xfer_free(x);
		tier_unhold(a->t);
		return false;
	}
	return true;
}

static bool list_page(struct tadm *a)
{
	char prefix[600], q[TOKEN_MAX * 3 + 2000], ep[1800], et[TOKEN_MAX * 3 + 1];

	snprintf(prefix, sizeof(prefix), "%s%s", tier_key_prefix(a->t),
		 a->listing_blobs ? "blobs/" : "maps/");
	if (!url_encode(prefix, ep, sizeof(ep)) || !url_encode(a->token, et, sizeof(et)))
		return false;
	/* the query's names in order, as the signature's canonical request has them */
	if (a->token[0])
		snprintf(q, sizeof(q), "continuation-token=%s&list-type=2&prefix=%s", et, ep);
	else
		snprintf(q, sizeof(q), "list-type=2&prefix=%s", ep);
	a->phase = PH_LIST;
	return request(a, "", q, "GET");
}

static int digest_cmp(const void *x, const void *y)
{
	return memcmp(x, y, STORE_DIGEST_SIZE);
}

/* Is `d` named by a remaining mapping? (a->refs sorted once the mappings are read) */
static bool referenced(const struct tadm *a, const uint8_t *d)
{
	return a->n_refs && bsearch(d, a->refs, a->n_refs, STORE_DIGEST_SIZE, digest_cmp);
}

static void on_done(struct fetch_xfer *x, const struct fetch_result *res)
{
	struct tadm *a = fetch_xfer_data(x);
	struct tier *t = a->t;
	bool ok = res->err == 0 && res->http_status >= 200 && res->http_status < 300;
	/* a DELETE's answer is 204 No Content, which the fetch engine counts as no object */
	bool deleted = (a->phase == PH_MAP_DEL || a->phase == PH_BLOB_DEL ||
			a->phase == PH_BAD_DEL) &&
		       (ok || res->http_status == 204 || res->http_status == 404);
	char msg[300];

	snprintf(msg, sizeof(msg), "%s", res->message[0] ? res->message : "request failed");
	fetch_xfer_free(x);
	if (res->err == -DMC_E_CANCELLED || tier_is_closing(t)) {
		finish(a, DMC_E_CANCELLED, "the daemon is stopping");
		tier_unhold(t);
		return;
	}
	switch (a->phase) {
	case PH_LIST: {
		char prefix[600];
		snprintf(prefix, sizeof(prefix), "%s%s", tier_key_prefix(t),
			 a->listing_blobs ? "blobs/" : "maps/");
		if (!ok || a->over || parse_page(a, prefix) < 0) {
			if (ok)
				snprintf(msg, sizeof(msg), "a listing of the bucket is malformed");
			finish(a, DMC_E_UPSTREAM_PERMANENT, msg);
			tier_unhold(t);
			return;
		}
		if (!a->token[0]) {
			/* this listing is complete */
			if (a->action == DMC_TIER_VERIFY)
				a->phase = PH_BLOB_GET, a->idx = 0;
			else if (a->action == DMC_TIER_LS && a->listing_blobs)
				a->listing_blobs = false; /* then the mappings */
			else if (a->action == DMC_TIER_LS)
				a->phase = PH_BLOB_DEL, a->idx = SIZE_MAX; /* done */
			else if (!a->listing_blobs)
				a->phase = PH_MAP_GET, a->idx = 0;
			else
				a->phase = PH_BLOB_DEL, a->idx = 0;
		}
		break;
	}
	case PH_MAP_GET: {
		struct tier_map m;
		if (res->http_status == 404) {
			/* gone since the listing: nothing it references */
		} else if (!ok || a->over) {
			finish(a, DMC_E_UPSTREAM_PERMANENT, msg);
			tier_unhold(t);
			return;
		} else if (tier_map_decode(a->resp, a->len, &m) == 0) {
			if (a->n_refs == a->cap_refs) {
				size_t cap = a->cap_refs ? a->cap_refs * 2 : 256;
				void *nv = realloc(a->refs, cap * STORE_DIGEST_SIZE);
				if (!nv) {
					finish(a, DMC_E_OVERLOADED, "out of memory: try again");
					tier_unhold(t);
					return;
				}
				a->refs = nv;
				a->cap_refs = cap;
			}
			memcpy(a->refs[a->n_refs++], m.digest, STORE_DIGEST_SIZE);
		}
		/* a malformed mapping references nothing: readers ignore it too */
		a->idx++;
		break;
	}
	case PH_MAP_DEL:
		if (!deleted) {
			finish(a, DMC_E_UPSTREAM_PERMANENT, msg);
			tier_unhold(t);
			return;
		}
		a->r.maps_deleted++;
		a->idx++;
		a->phase = PH_MAP_GET;
		break;
	case PH_BLOB_GET: {
		struct obj *o = &a->blobs.v[a->idx];
		int rc;
		if (res->http_status == 404) {
			a->idx++; /* gone since the listing */
			break;
		}
		if (!ok || !a->chk) {
			finish(a, DMC_E_UPSTREAM_PERMANENT, msg);
			tier_unhold(t);
			return;
		}
		rc = store_check_finish(a->chk, o->digest, NULL);
		store_check_free(a->chk);
		a->chk = NULL;
		if (rc == -ENOMEM) {
			finish(a, DMC_E_OVERLOADED, "out of memory: try again");
			tier_unhold(t);
			return;
		}
		a->r.blobs++;
		a->r.blob_bytes += o->size;
		if (rc == 0) {
			entry(a, o, "ok");
			a->idx++;
			break;
		}
		a->r.blobs_bad++;
		entry(a, o, "bad");
		log_warn(FETCH, "cluster tier verify: object %s is bad%s", o->key,
			 a->flags & DMC_TIER_REPAIR ? ": deleted" : "");
		if (!(a->flags & DMC_TIER_REPAIR)) {
			a->idx++;
			break;
		}
		a->phase = PH_BAD_DEL;
		if (!request(a, o->key, NULL, "DELETE"))
			finish(a, DMC_E_INTERNAL, "cannot start a request");
		tier_unhold(t);
		return;
	}
	case PH_BAD_DEL:
	case PH_BLOB_DEL:
		if (!deleted) {
			finish(a, DMC_E_UPSTREAM_PERMANENT, msg);
			tier_unhold(t);
			return;
		}
		blob_deleted(a, &a->blobs.v[a->idx]);
		a->idx++;
		if (a->phase == PH_BAD_DEL)
			a->phase = PH_BLOB_GET; /* verify goes on with the next blob */
		break;
	}
	step(a);
	tier_unhold(t);
}

/* The next request of the work, or its answer when there is none left. */
static void step(struct tadm *a)
{
	bool dry = a->flags & DMC_TIER_DRY_RUN;

	if (a->phase == PH_LIST) {
		if (!list_page(a))
			finish(a, DMC_E_INTERNAL, "cannot start a request");
		return;
	}
	if (a->phase == PH_MAP_GET) {
		while (a->idx < a->maps.n) {
			struct obj *o = &a->maps.v[a->idx];
			if (!o->named) {
				a->idx++;
				continue;
			}
			if (a->now - o->mtime > (int64_t)a->retention_s) {
				if (dry) {
					a->r.maps_deleted++;
					a->idx++;
					continue;
				}
				a->phase = PH_MAP_DEL;
				if (!request(a, o->key, NULL, "DELETE"))
					finish(a, DMC_E_INTERNAL, "cannot start a request");
				return;
			}
			if (!request(a, o->key, NULL, "GET"))
				finish(a, DMC_E_INTERNAL, "cannot start a request");
			return;
		}
		a->r.maps = a->maps.n - a->r.maps_deleted;
		if (a->n_refs)
			qsort(a->refs, a->n_refs, STORE_DIGEST_SIZE, digest_cmp);
		a->listing_blobs = true;
		a->phase = PH_LIST;
		a->token[0] = '\0';
		if (!list_page(a))
			finish(a, DMC_E_INTERNAL, "cannot start a request");
		return;
	}
	if (a->phase == PH_BLOB_GET) {
		while (a->idx < a->blobs.n && !a->blobs.v[a->idx].named)
			a->idx++;
		if (a->idx == a->blobs.n) {
			finish(a, 0, NULL);
			return;
		}
		store_check_free(a->chk);
		a->chk = NULL;
		a->got = 0;
		if (!request(a, a->blobs.v[a->idx].key, NULL, "GET"))
			finish(a, DMC_E_INTERNAL, "cannot start a request");
		return;
	}
	/* PH_BLOB_DEL: ls reports; gc walks the blobs */
	if (a->action == DMC_TIER_LS) {
		a->r.maps = a->maps.n;
		for (size_t i = 0; i < a->blobs.n; i++)
			if (a->blobs.v[i].named) {
				a->r.blobs++;
				a->r.blob_bytes += a->blobs.v[i].size;
				entry(a, &a->blobs.v[i], "ok");
			}
		finish(a, 0, NULL);
		return;
	}
	while (a->idx < a->blobs.n) {
		struct obj *o = &a->blobs.v[a->idx];
		if (!o->named) {
			a->idx++;
			continue;
		}
		if (referenced(a, o->digest) || a->now - o->mtime <= (int64_t)a->grace_s) {
			a->r.blobs++;
			a->r.blob_bytes += o->size;
			entry(a, o, "kept");
			a->idx++;
			continue;
		}
		if (dry) {
			blob_deleted(a, o);
			a->idx++;
			continue;
		}
		if (!request(a, o->key, NULL, "DELETE"))
			finish(a, DMC_E_INTERNAL, "cannot start a request");
		return;
	}
	finish(a, 0, NULL);
}

void tier_admin_request(struct tier *t, const struct config *cfg, struct conn *c,
			const struct dmc_header *h, const uint8_t *payload)
{
	uint32_t action, flags;
	struct tadm *a;

	if (dmc_tier_decode(payload, h->length, &action, &flags) != DMC_PROTO_OK) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed TIER");
		return;
	}
	if (!c->admin) {
		/* it sees and deletes every user's objects in the tier */
		conn_send_error(c, h->request_id, DMC_E_NOT_FOUND_OR_DENIED, NULL,
				"dmcache tier administers the whole cluster tier: it is for root "
				"and members of the '%s' group", cfg->admin_group);
		return;
	}
	if (action != DMC_TIER_LS && action != DMC_TIER_GC && action != DMC_TIER_VERIFY) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"unknown tier action %u", action);
		return;
	}
	if (!t || tier_is_closing(t)) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"this daemon has no cluster tier (tier_url is not set)");
		return;
	}
	a = calloc(1, sizeof(*a));
	if (!a) {
		conn_send_error(c, h->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	a->t = t;
	a->c = c;
	a->request_id = h->request_id;
	a->action = action;
	a->flags = flags;
	a->retention_s = cfg->tier_retention_ms / 1000;
	a->grace_s = a->retention_s < DMC_TIER_GC_GRACE_S ? a->retention_s : DMC_TIER_GC_GRACE_S;
	a->now = (int64_t)time(NULL);
	a->phase = PH_LIST;
	a->listing_blobs = action != DMC_TIER_GC; /* gc: the mappings first */
	a->next = running;
	running = a;
	step(a);
}

void tier_admin_conn_closed(struct conn *c)
{
	for (struct tadm *a = running; a; a = a->next)
		if (a->c == c)
			a->c = NULL;
}
