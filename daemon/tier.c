/*
 * tier: the cluster tier's S3 requests and objects (see tier.h). Loop thread; upload_work()
 * runs on the threadpool and touches only its own upload (its file, its body buffer).
 */
#include "tier.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "proto.h"
#include "secret.h"

#define WARN_EVERY_MS 60000u
#define RESP_MAX 4096u
#define TIER_ATTEMPTS 2u     /* a failing tier costs little before Datamint takes over */
#define CRED_FILE_MAX 8192

static const char empty_sha256[] =
	"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

struct upload;

struct tier {
	uv_loop_t *loop;
	struct fetch *fetch;
	struct store *store;
	char *base;      /* tier_url without a trailing slash */
	char *prefix;    /* "" or "PREFIX/" */
	char *sigv4;     /* "aws:amz:REGION:s3" */
	struct secret *cred; /* "ACCESS:SECRET" */
	struct upload *queue, *queue_tail;
	uint32_t running, queued;
	struct tier_req *reqs; /* mapping reads in flight */
	struct upload *active; /* uploads begun */
	uint64_t last_warn_ms;
	uint32_t holds; /* tier_admin.c's requests in flight */
	bool closing;
	bool warned_full;
	struct tier_stats st;
};

/* ---- names ---- */

static void hex_of(const uint8_t *d, size_t n, char *out)
{
	static const char h[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = h[d[i] >> 4];
		out[2 * i + 1] = h[d[i] & 15];
	}
	out[2 * n] = '\0';
}

void tier_blob_key(const struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE], char *out,
		   size_t cap)
{
	char hex[STORE_HEX_SIZE + 1];
	store_digest_hex(digest, hex);
	snprintf(out, cap, "%sblobs/%.2s/%s", t->prefix, hex, hex);
}

void tier_map_key(const struct tier *t, const char *origin, const char *resource, char *out,
		  size_t cap)
{
	size_t lo = strlen(origin), lr = strlen(resource);
	char *s = malloc(lo + lr + 2);
	uint8_t d[STORE_DIGEST_SIZE];
	char hex[STORE_HEX_SIZE + 1];

	if (!s) {
		snprintf(out, cap, "%s", "");
		return;
	}
	memcpy(s, origin, lo);
	s[lo] = '\n';
	memcpy(s + lo + 1, resource, lr + 1);
	store_digest_of(s, lo + lr + 1, d);
	free(s);
	store_digest_hex(d, hex);
	snprintf(out, cap, "%smaps/%s", t->prefix, hex);
}

/* The object's URL: the key percent-encoded except its slashes. NULL: no memory. */
static char *object_url(const struct tier *t, const char *key, const char *query)
{
	size_t n = strlen(t->base) + 3 * strlen(key) + (query ? strlen(query) : 0) + 4;
	char *u = malloc(n), *p;

	if (!u)
		return NULL;
	p = u + sprintf(u, "%s/", t->base);
	for (const unsigned char *k = (const unsigned char *)key; *k; k++) {
		if (isalnum(*k) || strchr("-._~/", *k))
			*p++ = (char)*k;
		else
			p += sprintf(p, "%%%02X", *k);
	}
	*p = '\0';
	if (query)
		sprintf(p, "?%s", query);
	return u;
}

/* ---- the mapping's text ---- */

int tier_map_encode(const char *origin, const char *resource, const struct tier_map *m,
		    char *out, size_t cap)
{
	char hex[STORE_HEX_SIZE + 1];
	int n;

	if (strpbrk(origin, "\r\n") || strpbrk(resource, "\r\n") || strpbrk(m->version, "\r\n") ||
	    strpbrk(m->etag, "\r\n"))
		return -EINVAL;
	store_digest_hex(m->digest, hex);
	n = snprintf(out, cap,
		     "dmcache-tier-map 1\norigin %s\nresource %s\nversion %s\netag %s\n"
		     "size %" PRId64 "\ndigest %s\n",
		     origin, resource, m->version, m->etag, m->size, hex);
	return n < 0 || (size_t)n >= cap ? -EINVAL : 0;
}

/* The value of line `key` in `text`, copied to `out`; false if absent or too long. */
static bool map_field(const char *text, size_t len, const char *key, char *out, size_t cap)
{
	size_t kl = strlen(key);
	const char *p = text, *end = text + len;

	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t ll = nl ? (size_t)(nl - p) : (size_t)(end - p);
		if (ll > kl && memcmp(p, key, kl) == 0 && p[kl] == ' ') {
			size_t vl = ll - kl - 1;
			if (vl >= cap)
				return false;
			memcpy(out, p + kl + 1, vl);
			out[vl] = '\0';
			return true;
		}
		p += ll + 1;
	}
	return false;
}

int tier_map_decode(const char *text, size_t len, struct tier_map *ret)
{
	char size[32], hex[STORE_HEX_SIZE + 2];
	char *e;

	memset(ret, 0, sizeof(*ret));
	if (len < 19 || memcmp(text, "dmcache-tier-map 1\n", 19) != 0 || memchr(text, '\0', len))
		return -EINVAL;
	if (!map_field(text, len, "version", ret->version, sizeof(ret->version)) ||
	    !map_field(text, len, "size", size, sizeof(size)) ||
	    !map_field(text, len, "digest", hex, sizeof(hex)) ||
	    store_digest_parse(hex, strlen(hex), ret->digest) < 0)
		return -EINVAL;
	if (!map_field(text, len, "etag", ret->etag, sizeof(ret->etag)))
		ret->etag[0] = '\0';
	errno = 0;
	ret->size = strtoll(size, &e, 10);
	if (errno || *e || ret->size < 0)
		return -EINVAL;
	return 0;
}

/* ---- credentials ---- */

static void trim(char *s)
{
	size_t n = strlen(s);
	char *p = s;
	while (n && isspace((unsigned char)s[n - 1]))
		s[--n] = '\0';
	while (*p && isspace((unsigned char)*p))
		p++;
	if ((*p == '"' || *p == '\'') && n >= 2 && s[n - 1] == *p) {
		s[n - 1] = '\0';
		p++;
	}
	memmove(s, p, strlen(p) + 1);
}

/* Wipes and frees a buffer that held a credential. */
static void wipe_free(char *s, size_t n)
{
	if (s) {
		explicit_bzero(s, n);
		free(s);
	}
}

/*
 * The credentials file: "aws_access_key_id = ..." and "aws_secret_access_key = ..." lines
 * (the AWS credentials file's names; AWS_ACCESS_KEY_ID=... as in an environment file works
 * too), '#' comments and [sections] ignored. Mode 0600 (no group or other bits), owned by
 * root or the daemon's own user, a regular file: refused otherwise.
 */
static int load_cred_file(const char *path, char *id, size_t idcap, char *sec, size_t seccap,
			  char *err, size_t errlen)
{
	struct stat st;
	char *buf;
	ssize_t n;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

	if (fd < 0) {
		snprintf(err, errlen, "tier_credentials_file %s: %s", path, strerror(errno));
		return -errno;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		snprintf(err, errlen, "tier_credentials_file %s: not a regular file", path);
		return -EINVAL;
	}
	if ((st.st_mode & 077) || (st.st_uid != 0 && st.st_uid != geteuid())) {
		close(fd);
		snprintf(err, errlen,
			 "tier_credentials_file %s: must be owned by root (or the daemon's user) "
			 "with mode 0600, is uid %u mode %04o; refused",
			 path, (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
		return -EPERM;
	}
	buf = calloc(1, CRED_FILE_MAX + 1);
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	n = read(fd, buf, CRED_FILE_MAX);
	close(fd);
	if (n < 0 || n == CRED_FILE_MAX) {
		wipe_free(buf, CRED_FILE_MAX + 1);
		snprintf(err, errlen, "tier_credentials_file %s: unreadable or too large", path);
		return -EINVAL;
	}
	for (char *line = buf, *next; line && *line; line = next) {
		char *eq;
		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		trim(line);
		if (!*line || *line == '#' || *line == '[' || !(eq = strchr(line, '=')))
			continue;
		*eq = '\0';
		trim(line);
		trim(eq + 1);
		if (strcasecmp(line, "aws_access_key_id") == 0)
			snprintf(id, idcap, "%s", eq + 1);
		else if (strcasecmp(line, "aws_secret_access_key") == 0)
			snprintf(sec, seccap, "%s", eq + 1);
	}
	wipe_free(buf, CRED_FILE_MAX + 1);
	if (!*id || !*sec) {
		snprintf(err, errlen,
			 "tier_credentials_file %s: needs aws_access_key_id and "
			 "aws_secret_access_key", path);
		return -EINVAL;
	}
	return 0;
}

/* AWS_ACCESS_KEY_ID:AWS_SECRET_ACCESS_KEY, taken by tier_take_environment() */
static struct secret *env_cred;

/* The environment's copy, wiped once taken (the rest of the process never needs it). */
static void take_env(const char *name, char *out, size_t cap)
{
	char *v = getenv(name);
	if (!v)
		return;
	snprintf(out, cap, "%s", v);
	explicit_bzero(v, strlen(v));
	unsetenv(name);
}

void tier_take_environment(void)
{
	char id[256] = "", sec[256] = "", both[514];
	size_t li, ls;

	take_env("AWS_ACCESS_KEY_ID", id, sizeof(id));
	take_env("AWS_SECRET_ACCESS_KEY", sec, sizeof(sec));
	li = strlen(id);
	ls = strlen(sec);
	if (li && ls && !env_cred) {
		memcpy(both, id, li);
		both[li] = ':';
		memcpy(both + li + 1, sec, ls + 1);
		env_cred = secret_new(both, li + 1 + ls);
	}
	explicit_bzero(id, sizeof(id));
	explicit_bzero(sec, sizeof(sec));
	explicit_bzero(both, sizeof(both));
}

static int load_credentials(struct tier *t, const struct config *cfg, char *err, size_t errlen)
{
	char id[256] = "", sec[256] = "", both[514];
	int rc = 0;

	tier_take_environment(); /* if main() did not already */
	if (cfg->tier_credentials_file && *cfg->tier_credentials_file) {
		secret_free(env_cred);
		env_cred = NULL;
		rc = load_cred_file(cfg->tier_credentials_file, id, sizeof(id), sec, sizeof(sec),
				    err, errlen);
	} else if (env_cred) {
		const char *c = secret_str(env_cred);
		if (c[0] == ':') {
			snprintf(err, errlen, "the tier's access key id is malformed");
			return -EINVAL;
		}
		t->cred = env_cred;
		env_cred = NULL;
		return 0;
	} else {
		snprintf(err, errlen,
			 "tier_url is set but there are no credentials: set tier_credentials_file, "
			 "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the service's "
			 "environment");
		rc = -EINVAL;
	}
	if (rc == 0 && (strchr(id, ':') || !*id)) {
		snprintf(err, errlen, "the tier's access key id is malformed");
		rc = -EINVAL;
	}
	if (rc == 0) {
		size_t li = strlen(id), ls = strlen(sec);
		memcpy(both, id, li);
		both[li] = ':';
		memcpy(both + li + 1, sec, ls + 1);
		t->cred = secret_new(both, li + 1 + ls);
		if (!t->cred)
			rc = -ENOMEM;
	}
	explicit_bzero(id, sizeof(id));
	explicit_bzero(sec, sizeof(sec));
	explicit_bzero(both, sizeof(both));
	return rc;
}

/* ---- setup ---- */

int tier_new(uv_loop_t *loop, struct fetch *f, struct store *store, const struct config *cfg,
	     struct tier **ret, char *err, size_t errlen)
{
	struct tier *t;
	char origin[256], sig[160];
	size_t n;
	int rc;

	*ret = NULL;
	if (!cfg->tier_url || !*cfg->tier_url) {
		secret_free(env_cred); /* no tier: nothing keeps them */
		env_cred = NULL;
		return 0;
	}
	if (fetch_url_origin(cfg->tier_url, origin, sizeof(origin)) < 0) {
		snprintf(err, errlen, "tier_url '%s' is not an http(s) URL", cfg->tier_url);
		return -EINVAL;
	}
	if (strpbrk(cfg->tier_url, "?#@") ||
	    (cfg->tier_region && strpbrk(cfg->tier_region, ":\r\n \t"))) {
		snprintf(err, errlen, "tier_url must be an endpoint and bucket, without a query, "
			 "fragment or credentials, and tier_region one word");
		return -EINVAL;
	}
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->loop = loop;
	t->fetch = f;
	t->store = store;
	t->base = strdup(cfg->tier_url);
	n = cfg->tier_prefix ? strlen(cfg->tier_prefix) : 0;
	while (n && cfg->tier_prefix[n - 1] == '/')
		n--;
	t->prefix = malloc(n + 2);
	snprintf(sig, sizeof(sig), "aws:amz:%s:s3",
		 cfg->tier_region && *cfg->tier_region ? cfg->tier_region : "us-east-1");
	t->sigv4 = strdup(sig);
	if (!t->base || !t->prefix || !t->sigv4) {
		rc = -ENOMEM;
		goto fail;
	}
	if (n) {
		const char *p = cfg->tier_prefix;
		while (*p == '/' && n) {
			p++;
			n--;
		}
		memcpy(t->prefix, p, n);
		t->prefix[n] = '/';
		t->prefix[n + 1] = '\0';
		if (!n)
			t->prefix[0] = '\0';
	} else {
		t->prefix[0] = '\0';
	}
	n = strlen(t->base);
	while (n && t->base[n - 1] == '/')
		t->base[--n] = '\0';
	rc = load_credentials(t, cfg, err, errlen);
	if (rc < 0)
		goto fail;
	log_notice(FETCH, "cluster tier: %s (objects under '%s', region %s)", t->base, t->prefix,
		   sig + 8);
	*ret = t;
	return 0;
fail:
	secret_free(t->cred);
	free(t->base);
	free(t->prefix);
	free(t->sigv4);
	free(t);
	return rc;
}

static void tier_release(struct tier *t)
{
	secret_free(t->cred);
	free(t->base);
	free(t->prefix);
	free(t->sigv4);
	free(t);
}

void tier_get_stats(const struct tier *t, struct tier_stats *ret)
{
	*ret = t->st;
	ret->uploads_pending = t->queued + t->running;
}

/* ---- requests ---- */

static uint64_t now_ms(struct tier *t)
{
	return uv_now(t->loop);
}

/* A signed request on `url`; `sha_hex` is the body's SHA-256 (signed as the payload's). */
static struct fetch_xfer *signed_xfer(struct tier *t, const char *url, const char *method,
				      const void *body, size_t len, const char *sha_hex,
				      const char *extra, const struct fetch_ops *ops, void *data)
{
	char h[100];
	const char *hdrs[2] = { h, extra };
	struct fetch_request r = {
		.method = method,
		.body = body,
		.body_len = len,
		.headers = hdrs,
		.n_headers = extra ? 2 : 1,
		.aws_sigv4 = t->sigv4,
		.userpwd = secret_str(t->cred),
		.max_attempts = TIER_ATTEMPTS,
	};
	struct fetch_xfer *x = fetch_xfer_new(t->fetch, url, NULL, NULL, ops, data);

	if (!x)
		return NULL;
	snprintf(h, sizeof(h), "x-amz-content-sha256: %s", sha_hex ? sha_hex : empty_sha256);
	if (fetch_xfer_set_request(x, &r) < 0) {
		fetch_xfer_free(x);
		return NULL;
	}
	return x;
}

struct fetch_xfer *tier_blob_xfer(struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE],
				  const struct fetch_ops *ops, void *data)
{
	char key[512];
	char *url;
	struct fetch_xfer *x;

	tier_blob_key(t, digest, key, sizeof(key));
	url = object_url(t, key, NULL);
	if (!url)
		return NULL;
	x = signed_xfer(t, url, "GET", NULL, 0, NULL, NULL, ops, data);
	free(url);
	return x;
}

struct fetch_xfer *tier_object_xfer(struct tier *t, const char *key, const char *query,
				    const char *method, const struct fetch_ops *ops, void *data)
{
	char *url;
	struct fetch_xfer *x;

	if (t->closing)
		return NULL;
	url = object_url(t, key, query);
	if (!url)
		return NULL;
	x = signed_xfer(t, url, method, NULL, 0, NULL, NULL, ops, data);
	free(url);
	if (x)
		fetch_xfer_set_flags(x, FETCH_XF_METADATA);
	return x;
}

const char *tier_key_prefix(const struct tier *t)
{
	return t->prefix;
}

bool tier_is_closing(const struct tier *t)
{
	return t->closing;
}

void tier_hold(struct tier *t)
{
	t->holds++;
}

void tier_unhold(struct tier *t)
{
	t->holds--;
	if (t->closing && t->running == 0 && !t->reqs && !t->holds)
		tier_release(t);
}

static void warn_error(struct tier *t, const char *what, const struct fetch_result *res)
{
	uint64_t now = now_ms(t);

	if (t->last_warn_ms && now - t->last_warn_ms < WARN_EVERY_MS) {
		log_debug(FETCH, "cluster tier: %s: %s", what, res->message);
		return;
	}
	t->last_warn_ms = now;
	log_warn(FETCH, "cluster tier: %s: %s (%s; tier_errors counts these)", what,
		 res->message[0] ? res->message : "failed",
		 strcmp(what, "uploading") == 0 ? "the upload is dropped" : "Datamint instead");
}

static bool is_full(const struct fetch_result *res)
{
	return res->http_status == 507 ||
	       (res->http_status == 403 && strstr(res->message, "QuotaExceeded"));
}

int tier_result(struct tier *t, const struct fetch_result *res, const char *what)
{
	if (res->err == 0 && res->http_status >= 200 && res->http_status < 300)
		return 0;
	if (res->err == -DMC_E_CANCELLED)
		return res->err;
	if (res->http_status == 404)
		return -ENOENT;
	t->st.errors++;
	if (is_full(res)) {
		if (!t->st.full) {
			t->st.full = true;
			log_warn(FETCH, "cluster tier is full (%s): uploads stop, reads go on",
				 res->message);
		}
		return -DMC_E_CACHE_FULL;
	}
	warn_error(t, what, res);
	return res->err ? res->err : -DMC_E_UPSTREAM_PERMANENT;
}

void tier_count_hit(struct tier *t, uint64_t bytes)
{
	t->st.hits++;
	t->st.bytes += bytes;
}

void tier_count_miss(struct tier *t)
{
	t->st.misses++;
}

void tier_count_corrupt(struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE])
{
	char key[512];

	tier_blob_key(t, digest, key, sizeof(key));
	t->st.corrupt++;
	t->st.errors++;
	log_warn(FETCH, "cluster tier: object %s does not match its digest: not trusted, the "
		 "item comes from Datamint", key);
}

/* ---- small answers in memory (mappings, upload steps) ---- */

struct membuf {
	char buf[RESP_MAX];
	size_t len;
	bool over;
};

static int mem_on_start(struct membuf *m, const struct fetch_response *r)
{
	if (r->offset == 0)
		m->len = 0;
	m->over = false;
	return 0;
}

static int mem_on_data(struct membuf *m, const void *buf, size_t len)
{
	if (len > sizeof(m->buf) - 1 - m->len) {
		m->over = true;
		return 0;
	}
	memcpy(m->buf + m->len, buf, len);
	m->len += len;
	m->buf[m->len] = '\0';
	return 0;
}

/* ---- mapping reads ---- */

struct tier_req {
	struct tier *t;
	struct tier_req *next, *prev;
	struct fetch_xfer *x;
	tier_map_cb cb;
	void *ctx;
	struct membuf mem;
};

static int req_on_start(struct fetch_xfer *x, const struct fetch_response *r)
{
	struct tier_req *q = fetch_xfer_data(x);
	return mem_on_start(&q->mem, r);
}

static int req_on_data(struct fetch_xfer *x, const void *buf, size_t len)
{
	struct tier_req *q = fetch_xfer_data(x);
	return mem_on_data(&q->mem, buf, len);
}

static void req_on_done(struct fetch_xfer *x, const struct fetch_result *res)
{
	struct tier_req *q = fetch_xfer_data(x);
	struct tier *t = q->t;
	struct tier_map m;
	int err = tier_result(t, res, "reading a mapping");

	if (err == 0 && (q->mem.over || tier_map_decode(q->mem.buf, q->mem.len, &m) < 0)) {
		struct fetch_result bad = *res;
		snprintf(bad.message, sizeof(bad.message), "a mapping object is malformed");
		bad.http_status = 0;
		bad.err = -DMC_E_INTEGRITY;
		err = tier_result(t, &bad, "reading a mapping");
	}
	if (err == -ENOENT)
		t->st.misses++;
	if (q->prev)
		q->prev->next = q->next;
	else
		t->reqs = q->next;
	if (q->next)
		q->next->prev = q->prev;
	fetch_xfer_free(x);
	q->cb(q->ctx, err, err == 0 ? &m : NULL);
	free(q);
	if (t->closing && t->running == 0 && !t->reqs && !t->holds)
		tier_release(t);
}

static const struct fetch_ops req_ops = {
	.on_start = req_on_start,
	.on_data = req_on_data,
	.on_done = req_on_done,
};

struct tier_req *tier_map_get(struct tier *t, const char *origin, const char *resource,
			      uint32_t owner, uint64_t group, tier_map_cb cb, void *ctx)
{
	struct tier_req *q;
	char key[512];
	char *url;

	if (t->closing)
		return NULL;
	q = calloc(1, sizeof(*q));
	if (!q)
		return NULL;
	tier_map_key(t, origin, resource, key, sizeof(key));
	url = object_url(t, key, NULL);
	q->t = t;
	q->cb = cb;
	q->ctx = ctx;
	q->x = url ? signed_xfer(t, url, "GET", NULL, 0, NULL, NULL, &req_ops, q) : NULL;
	free(url);
	if (!q->x) {
		free(q);
		return NULL;
	}
	fetch_xfer_set_owner(q->x, owner);
	fetch_xfer_set_group(q->x, group);
	fetch_xfer_set_flags(q->x, FETCH_XF_METADATA | FETCH_XF_FIRST);
	if (fetch_xfer_start(q->x) < 0) {
		fetch_xfer_free(q->x);
		free(q);
		return NULL;
	}
	q->next = t->reqs;
	if (t->reqs)
		t->reqs->prev = q;
	t->reqs = q;
	return q;
}

void tier_map_cancel(struct tier_req *r)
{
	if (r && r->x)
		fetch_xfer_cancel(r->x);
}

/* ---- uploads ---- */

enum up_step {
	UP_HEAD,     /* is the blob there already? */
	UP_READ,     /* reading the file (or its next part) on the threadpool */
	UP_PUT,      /* the whole file */
	UP_MP_INIT,  /* POST ?uploads */
	UP_MP_PART,  /* PUT ?partNumber&uploadId */
	UP_MP_DONE,  /* POST ?uploadId with the parts */
	UP_MP_ABORT, /* DELETE ?uploadId after a failure */
	UP_MAP,      /* PUT the mapping */
};

struct upload {
	struct tier *t;
	struct upload *next;
	struct upload *anext, *aprev; /* t->active */
	uint8_t digest[STORE_DIGEST_SIZE];
	char *origin, *resource;
	struct tier_map m;
	enum up_step step;
	char key[512];
	struct fetch_xfer *x;
	struct membuf mem;
	bool failed;
	/* the file */
	int fd;
	struct store_blob_info info;
	uint64_t off;
	uint8_t *body;
	size_t body_len;
	char *body_text; /* for the mapping and the multipart completion */
	char sha_hex[STORE_HEX_SIZE + 1];
	uv_work_t work;
	int work_err;
	bool drop;     /* remove the blob from the store once over (--to-tier) */
	/* multipart */
	char upload_id[256];
	uint32_t part;
	char (*etags)[FETCH_ETAG_MAX];
	uint32_t etags_cap;
};

static void upload_end(struct upload *u);

static int up_on_start(struct fetch_xfer *x, const struct fetch_response *r)
{
	struct upload *u = fetch_xfer_data(x);
	if (u->step == UP_MP_PART && r->etag[0] && u->part >= 1 && u->part <= u->etags_cap)
		snprintf(u->etags[u->part - 1], FETCH_ETAG_MAX, "%s", r->etag);
	return mem_on_start(&u->mem, r);
}

static int up_on_data(struct fetch_xfer *x, const void *buf, size_t len)
{
	struct upload *u = fetch_xfer_data(x);
	return mem_on_data(&u->mem, buf, len);
}

static void up_on_done(struct fetch_xfer *x, const struct fetch_result *res);

static const struct fetch_ops up_ops = {
	.on_start = up_on_start,
	.on_data = up_on_data,
	.on_done = up_on_done,
};

/* Starts a request of the upload; false when it could not start (the upload failed). */
static bool up_request(struct upload *u, const char *method, const char *query,
		       const void *body, size_t len, const char *sha_hex, const char *extra)
{
	char *url = object_url(u->t, u->key, query);

	u->x = url ? signed_xfer(u->t, url, method, body, len, sha_hex, extra, &up_ops, u) : NULL;
	free(url);
	if (!u->x)
		return false;
	fetch_xfer_set_flags(u->x, strcmp(method, "PUT") == 0 ? 0 : FETCH_XF_METADATA);
	if (fetch_xfer_start(u->x) < 0) {
		fetch_xfer_free(u->x);
		u->x = NULL;
		return false;
	}
	return true;
}

/* Threadpool: the file's next part (or the whole file) into u->body, and its SHA-256. */
static void upload_work(uv_work_t *w)
{
	struct upload *u = w->data;
	uint64_t left;
	size_t want, got = 0;
	uint8_t d[STORE_DIGEST_SIZE];

	u->work_err = 0;
	if (u->fd < 0) {
		int rc = store_open_blob(u->t->store, u->digest, &u->fd, &u->info);
		if (rc < 0) {
			u->work_err = rc;
			return;
		}
	}
	left = u->info.file_size - u->off;
	want = u->info.file_size > TIER_MULTIPART_MIN && left > TIER_PART_SIZE ? TIER_PART_SIZE
									      : (size_t)left;
	free(u->body);
	u->body = malloc(want ? want : 1);
	if (!u->body) {
		u->work_err = -ENOMEM;
		return;
	}
	while (got < want) {
		ssize_t n = pread(u->fd, u->body + got, want - got, (off_t)(u->off + got));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			u->work_err = n < 0 ? -errno : -EIO;
			return;
		}
		got += (size_t)n;
	}
	u->body_len = want;
	store_digest_of(u->body, want, d);
	hex_of(d, sizeof(d), u->sha_hex);
}

/* The part just read goes up (a multipart upload's first part waits for its id). */
static bool send_part(struct upload *u)
{
	char q[400];

	u->step = UP_MP_PART;
	u->part++;
	if (u->part > u->etags_cap)
		return false;
	snprintf(q, sizeof(q), "partNumber=%u&uploadId=%s", u->part, u->upload_id);
	return up_request(u, "PUT", q, u->body, u->body_len, u->sha_hex, NULL);
}

static void upload_after(uv_work_t *w, int status)
{
	struct upload *u = w->data;
	bool ok;

	if (status < 0 || u->work_err < 0 || u->t->closing) {
		if (u->work_err < 0 && !u->t->closing)
			log_info(FETCH, "cluster tier: cannot read blob for upload: %s",
				 dmc_err_text(u->work_err));
		u->failed = true;
		upload_end(u);
		return;
	}
	if (u->info.file_size <= TIER_MULTIPART_MIN) {
		u->step = UP_PUT;
		ok = up_request(u, "PUT", NULL, u->body, u->body_len, u->sha_hex, NULL);
	} else if (!u->upload_id[0]) {
		u->step = UP_MP_INIT;
		ok = up_request(u, "POST", "uploads=", NULL, 0, NULL, NULL);
	} else {
		ok = send_part(u);
	}
	if (!ok) {
		u->failed = true;
		upload_end(u);
	}
}

static void start_read(struct upload *u)
{
	u->step = UP_READ;
	u->work.data = u;
	if (uv_queue_work(u->t->loop, &u->work, upload_work, upload_after) < 0) {
		u->failed = true;
		upload_end(u);
	}
}

/* The <UploadId> of an InitiateMultipartUploadResult, checked to be URL-safe. */
static bool parse_upload_id(const char *xml, char *out, size_t cap)
{
	const char *p = strstr(xml, "<UploadId>"), *e;
	size_t n;

	if (!p)
		return false;
	p += 10;
	e = strstr(p, "</UploadId>");
	if (!e || (n = (size_t)(e - p)) == 0 || n >= cap)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!isalnum((unsigned char)p[i]) && !strchr("-._~", p[i]))
			return false;
	memcpy(out, p, n);
	out[n] = '\0';
	return true;
}

static bool start_map_put(struct upload *u)
{
	uint8_t d[STORE_DIGEST_SIZE];

	free(u->body_text);
	u->body_text = malloc(TIER_MAP_MAX);
	if (!u->body_text || tier_map_encode(u->origin, u->resource, &u->m, u->body_text,
					     TIER_MAP_MAX) < 0)
		return false;
	tier_map_key(u->t, u->origin, u->resource, u->key, sizeof(u->key));
	store_digest_of(u->body_text, strlen(u->body_text), d);
	hex_of(d, sizeof(d), u->sha_hex);
	u->step = UP_MAP;
	return up_request(u, "PUT", NULL, u->body_text, strlen(u->body_text), u->sha_hex,
			  "Content-Type: text/plain");
}

/* The blob file is in the tier (one PUT, or a completed multipart upload): counted, then
 * its mapping goes up. */
static bool blob_uploaded(struct upload *u)
{
	u->t->st.uploads++;
	u->t->st.upload_bytes += u->info.file_size;
	return start_map_put(u);
}

static bool start_complete(struct upload *u)
{
	size_t cap = 128 + (size_t)u->part * (64 + FETCH_ETAG_MAX), n;
	uint8_t d[STORE_DIGEST_SIZE];
	char q[300];

	free(u->body_text);
	u->body_text = malloc(cap);
	if (!u->body_text)
		return false;
	n = (size_t)snprintf(u->body_text, cap, "<CompleteMultipartUpload>");
	for (uint32_t i = 0; i < u->part; i++)
		n += (size_t)snprintf(u->body_text + n, cap - n,
				      "<Part><PartNumber>%u</PartNumber><ETag>%s</ETag></Part>",
				      i + 1, u->etags[i]);
	snprintf(u->body_text + n, cap - n, "</CompleteMultipartUpload>");
	store_digest_of(u->body_text, strlen(u->body_text), d);
	hex_of(d, sizeof(d), u->sha_hex);
	snprintf(q, sizeof(q), "uploadId=%s", u->upload_id);
	u->step = UP_MP_DONE;
	return up_request(u, "POST", q, u->body_text, strlen(u->body_text), u->sha_hex,
			  "Content-Type: application/xml");
}

static void up_on_done(struct fetch_xfer *x, const struct fetch_result *res)
{
	struct upload *u = fetch_xfer_data(x);
	struct tier *t = u->t;
	int err;
	char q[300];

	u->x = NULL;
	if (t->closing) {
		fetch_xfer_free(x);
		u->failed = true;
		upload_end(u);
		return;
	}
	err = tier_result(t, res, "uploading");
	/* a 200 to CompleteMultipartUpload may still carry an <Error> */
	if (err == 0 && u->step == UP_MP_DONE && strstr(u->mem.buf, "<Error>"))
		err = -DMC_E_UPSTREAM_PERMANENT;
	fetch_xfer_free(x);
	switch (u->step) {
	case UP_HEAD:
		if (err == 0) {
			t->st.uploads_skipped++;
			if (!start_map_put(u))
				break;
			return;
		}
		if (err == -ENOENT && !t->st.full) {
			start_read(u);
			return;
		}
		break;
	case UP_PUT:
		if (err == 0 && blob_uploaded(u))
			return;
		break;
	case UP_MP_INIT:
		if (err == 0 && parse_upload_id(u->mem.buf, u->upload_id, sizeof(u->upload_id))) {
			u->etags_cap = (uint32_t)((u->info.file_size + TIER_PART_SIZE - 1) /
						  TIER_PART_SIZE);
			u->etags = calloc(u->etags_cap, sizeof(*u->etags));
			if (u->etags && send_part(u))
				return;
		}
		break;
	case UP_MP_PART:
		if (err == 0 && u->etags[u->part - 1][0]) {
			u->off += u->body_len;
			if (u->off < u->info.file_size)
				start_read(u);
			else if (!start_complete(u))
				break;
			return;
		}
		break;
	case UP_MP_DONE:
		if (err == 0) {
			u->upload_id[0] = '\0';
			if (blob_uploaded(u))
				return;
		}
		break;
	case UP_MP_ABORT:
		upload_end(u);
		return;
	case UP_MAP:
		if (err == 0) {
			t->st.maps_written++;
			upload_end(u);
			return;
		}
		break;
	case UP_READ:
		break;
	}
	u->failed = true;
	if (u->upload_id[0]) {
		snprintf(q, sizeof(q), "uploadId=%s", u->upload_id);
		u->upload_id[0] = '\0';
		u->step = UP_MP_ABORT;
		if (up_request(u, "DELETE", q, NULL, 0, NULL, NULL))
			return;
	}
	upload_end(u);
}

static void upload_begin(struct upload *u)
{
	struct tier *t = u->t;

	t->running++;
	u->anext = t->active;
	if (t->active)
		t->active->aprev = u;
	t->active = u;
	tier_blob_key(t, u->digest, u->key, sizeof(u->key));
	u->step = UP_HEAD;
	if (!up_request(u, "HEAD", NULL, NULL, 0, NULL, NULL)) {
		u->failed = true;
		upload_end(u);
	}
}

static void upload_free(struct upload *u)
{
	if (u->fd >= 0)
		close(u->fd);
	free(u->origin);
	free(u->resource);
	free(u->body);
	free(u->body_text);
	free(u->etags);
	free(u);
}

static void pump_uploads(struct tier *t)
{
	while (!t->closing && t->running < TIER_UPLOADS_PARALLEL && t->queue) {
		struct upload *u = t->queue;
		t->queue = u->next;
		if (!t->queue)
			t->queue_tail = NULL;
		t->queued--;
		upload_begin(u);
	}
}

static void drop_work(uv_work_t *w)
{
	struct upload *u = w->data;

	if (u->fd >= 0) {
		close(u->fd);
		u->fd = -1;
	}
	u->work_err = store_remove(u->t->store, u->digest, NULL);
}

static void drop_after(uv_work_t *w, int status)
{
	struct upload *u = w->data;

	(void)status;
	if (u->work_err < 0 && u->work_err != -ENOENT)
		log_debug(FETCH, "cluster tier: an uploaded blob stays in the cache: %s",
			  strerror(-u->work_err));
	upload_end(u);
}

static void upload_end(struct upload *u)
{
	struct tier *t = u->t;

	if (u->drop) {
		/* the blob was in this node's cache only to be uploaded */
		u->drop = false;
		u->work.data = u;
		if (uv_queue_work(t->loop, &u->work, drop_work, drop_after) == 0)
			return;
	}
	if (u->failed)
		t->st.uploads_failed++;
	t->running--;
	if (u->aprev)
		u->aprev->anext = u->anext;
	else
		t->active = u->anext;
	if (u->anext)
		u->anext->aprev = u->aprev;
	upload_free(u);
	if (t->closing) {
		if (t->running == 0 && !t->reqs && !t->holds)
			tier_release(t);
		return;
	}
	pump_uploads(t);
}

void tier_upload(struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE], const char *origin,
		 const char *resource, const struct tier_map *m, bool drop_after)
{
	struct upload *u;

	if (t->closing)
		return;
	if (t->st.full || t->queued >= TIER_UPLOADS_QUEUED_MAX) {
		t->st.uploads_failed++;
		return;
	}
	u = calloc(1, sizeof(*u));
	if (!u)
		return;
	u->t = t;
	u->fd = -1;
	u->drop = drop_after;
	memcpy(u->digest, digest, STORE_DIGEST_SIZE);
	u->m = *m;
	memcpy(u->m.digest, digest, STORE_DIGEST_SIZE);
	u->origin = strdup(origin);
	u->resource = strdup(resource);
	if (!u->origin || !u->resource) {
		upload_free(u);
		return;
	}
	if (t->queue_tail)
		t->queue_tail->next = u;
	else
		t->queue = u;
	t->queue_tail = u;
	t->queued++;
	pump_uploads(t);
}

void tier_free(struct tier *t)
{
	struct upload *u;

	if (!t)
		return;
	t->closing = true;
	while ((u = t->queue)) {
		t->queue = u->next;
		upload_free(u);
	}
	t->queue_tail = NULL;
	t->queued = 0;
	for (struct tier_req *q = t->reqs; q; q = q->next)
		fetch_xfer_cancel(q->x);
	for (u = t->active; u; u = u->anext)
		if (u->x)
			fetch_xfer_cancel(u->x);
	if (t->running == 0 && !t->reqs && !t->holds) {
		tier_release(t);
		return;
	}
	/* the uploads' transfers end with -DMC_E_CANCELLED (fetch_free or the cancels); the
	 * last one frees the tier. Their threadpool reads finish first. */
}
