/*
 * prefetch's grants (docs/security.md): a uid may see a snapshot once its own key listed
 * that project in this daemon's lifetime; grants are recorded with a salted hash of the
 * key, so that a job whose server cannot be reached can be served from the cache (offline
 * reads: the newest snapshot a valid grant allows), and the serving side's question
 * (prefetch_may_see()).
 * Loop thread only.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>
#include <unistd.h>

#include "cache.h"
#include "conf.h"
#include "conn.h"
#include "datamint.h"
#include "index.h"
#include "log.h"
#include "prefetch.h"
#include "prefetch_priv.h"
#include "secret.h"
#include "store.h"

/* ---- grants (docs/security.md) ---- */

/* SHA-256(salt || key): what a grant keeps of the key that proved it. */
static int key_hash(const struct prefetch *p, const struct secret *key,
		    uint8_t out[STORE_DIGEST_SIZE])
{
	const char *k = secret_str(key);
	size_t klen = strlen(k);
	uint8_t *buf;
	int rc;

	if (!p->has_salt)
		return -ENOENT;
	buf = malloc(sizeof(p->salt) + klen);
	if (!buf)
		return -ENOMEM;
	memcpy(buf, p->salt, sizeof(p->salt));
	memcpy(buf + sizeof(p->salt), k, klen);
	rc = store_digest_of(buf, sizeof(p->salt) + klen, out);
	explicit_bzero(buf, sizeof(p->salt) + klen);
	free(buf);
	return rc;
}

/* The salt of this cache's key hashes: made once, kept in the index. */
void load_salt(struct prefetch *p)
{
	struct index *ix = p->d.cache->index;
	size_t n = 0;

	if (index_meta_get(ix, "key_salt", p->salt, sizeof(p->salt), &n) == 0 &&
	    n == sizeof(p->salt)) {
		p->has_salt = true;
		return;
	}
	if (getrandom(p->salt, sizeof(p->salt), 0) != (ssize_t)sizeof(p->salt))
		return;
	if (index_meta_put(ix, "key_salt", p->salt, sizeof(p->salt)) == 0 && index_flush(ix) == 0)
		p->has_salt = true;
	else
		log_warn(STORE, "cannot record the key salt: offline reads need a new proof");
}

/* `j`'s uid proved entitlement to its snapshot with its key just now. */
void grant(struct job *j)
{
	struct prefetch *p = j->pf;
	uint8_t h[STORE_DIGEST_SIZE];
	bool has = j->key && key_hash(p, j->key, h) == 0;
	int rc = index_grant_put(p->d.cache->index, j->uid, j->snapshot_id, has ? h : NULL,
				 (int64_t)time(NULL));

	explicit_bzero(h, sizeof(h));
	if (rc < 0)
		log_warn(STORE, "job %" PRIu64 ": cannot record uid %u's grant: %s", j->id,
			 (unsigned)j->uid, index_errmsg(p->d.cache->index));
}

/* Root and the daemon's own uid see everything; anyone else what they hold a grant for. */
bool may_see_uid(struct prefetch *p, uid_t uid, int64_t snapshot_id)
{
	struct index_grant g;

	if (uid == 0 || uid == geteuid())
		return true;
	return index_grant_get(p->d.cache->index, uid, snapshot_id, &g) == 0;
}

bool may_see(struct prefetch *p, const struct conn *c, int64_t snapshot_id)
{
	return c->admin || may_see_uid(p, c->uid, snapshot_id);
}

bool prefetch_may_see(struct prefetch *p, uid_t uid, int64_t id)
{
	return may_see_uid(p, uid, id);
}

/* ---- offline reads from grants ---- */

struct snap_copy {
	char project_id[256], project_name[256], version[256];
	bool sealed, complete;
	int64_t item_count;
};

static int snap_copy_cb(void *ctx, const struct index_snapshot *s)
{
	struct snap_copy *c = ctx;

	snprintf(c->project_id, sizeof(c->project_id), "%s", s->project_id);
	snprintf(c->project_name, sizeof(c->project_name), "%s", s->project_name);
	snprintf(c->version, sizeof(c->version), "%s", s->version);
	c->sealed = s->sealed;
	c->complete = s->complete;
	c->item_count = s->item_count;
	return 0;
}

static void say_age(char *out, size_t cap, int64_t s)
{
	if (s >= 2 * 86400)
		snprintf(out, cap, "%" PRId64 " days", s / 86400);
	else if (s >= 2 * 3600)
		snprintf(out, cap, "%" PRId64 " hours", s / 3600);
	else if (s >= 120)
		snprintf(out, cap, "%" PRId64 " minutes", s / 60);
	else
		snprintf(out, cap, "%" PRId64 " seconds", s < 0 ? 0 : s);
}

/* how far in the future a grant's date may be (clocks set by NTP step by less) */
#define GRANT_CLOCK_SKEW_S 300

struct grant_pick {
	struct job *j;
	int64_t now;
	bool has_hash;
	uint8_t hash[STORE_DIGEST_SIZE];
	int64_t id;
	char why[256]; /* why the newest candidate does not do, when none does */
};

static int grant_pick_cb(void *ctx, int64_t id)
{
	struct grant_pick *g = ctx;
	struct job *j = g->j;
	struct index *ix = j->pf->d.cache->index;
	uint64_t ttl_s = j->pf->d.cfg->grant_ttl_ms / 1000;
	struct snap_copy sc = { 0 };
	struct index_grant gr;
	struct index_snapshot_stats st;
	char a[32], b[32];
	bool first = !g->why[0];

	if (index_snapshot_get(ix, id, snap_copy_cb, &sc) < 0)
		return 0;
	if (j->version_arg[0] && strcmp(j->version_arg, "latest") != 0 &&
	    strcmp(j->version_arg, sc.version) != 0)
		return 0;
	if (index_grant_get(ix, j->uid, id, &gr) < 0)
		return 0;
	if (g->has_hash && gr.has_key_hash &&
	    memcmp(g->hash, gr.key_hash, STORE_DIGEST_SIZE) != 0) {
		if (first)
			snprintf(g->why, sizeof(g->why),
				 "not entitled offline: this key is not the one last checked for "
				 "'%.60s'; read it once with the server reachable",
				 sc.project_name);
		return 0;
	}
	if (ttl_s == 0) {
		if (first)
			snprintf(g->why, sizeof(g->why),
				 "not entitled offline: grant_ttl is 0 (every read asks the server)");
		return 0;
	}
	if (gr.checked_at > g->now + GRANT_CLOCK_SKEW_S) {
		/* recorded while the clock was ahead: its age is unknown, and trusting it would
		 * stretch offline entitlement past grant_ttl by however far the clock was off */
		if (first) {
			say_age(a, sizeof(a), gr.checked_at - g->now);
			snprintf(g->why, sizeof(g->why),
				 "not entitled offline: the last check of '%.60s' is dated %s in the "
				 "future (the clock was ahead, or moved back); read it once with the "
				 "server reachable", sc.project_name, a);
		}
		return 0;
	}
	if (g->now - gr.checked_at > (int64_t)ttl_s) {
		if (first) {
			say_age(a, sizeof(a), g->now - gr.checked_at);
			say_age(b, sizeof(b), (int64_t)ttl_s);
			snprintf(g->why, sizeof(g->why),
				 "not entitled offline: last checked %s ago, grant_ttl is %s", a, b);
		}
		return 0;
	}
	/* sealed and complete needs no count (index.h); otherwise the count decides, and
	 * words the refusal */
	if ((!sc.sealed || !sc.complete) &&
	    (index_snapshot_stats(ix, id, &st) < 0 || !sc.sealed || st.items != st.items_stored)) {
		if (first)
			snprintf(g->why, sizeof(g->why),
				 "not available offline: the newest snapshot of '%.60s' you may "
				 "read is not complete (%" PRId64 " of %" PRId64 " items stored)",
				 sc.project_name, st.items_stored, st.items);
		return 0;
	}
	g->id = id;
	return 1;
}

/*
 * The newest complete snapshot of the job's project (and version, if one was named) that
 * j's uid holds a grant for within grant_ttl, proved with the same key when the job has
 * one. 0 with *ret_id, or -ENOENT with the reason in `why`.
 */
int find_grant(struct job *j, int64_t *ret_id, char *why, size_t whylen)
{
	struct grant_pick g = { .j = j, .now = (int64_t)time(NULL) };
	const char *k = j->key ? secret_str(j->key) : "";

	if (k[0])
		g.has_hash = key_hash(j->pf, j->key, g.hash) == 0;
	index_grant_newest(j->pf->d.cache->index, j->uid, INDEX_SOURCE_DATAMINT, j->server,
			   j->project_arg, grant_pick_cb, &g);
	explicit_bzero(g.hash, sizeof(g.hash));
	if (g.id > 0) {
		*ret_id = g.id;
		return 0;
	}
	if (why) {
		if (g.why[0])
			snprintf(why, whylen, "%s", g.why);
		else
			snprintf(why, whylen,
				 "not entitled offline: no earlier check of '%.60s' at %.80s with "
				 "this user's key is in the cache",
				 j->project_arg, j->server);
	}
	return -ENOENT;
}

/* Serves the job from snapshot `id` under the uid's grant, without the server. */
void serve_from_grant(struct job *j, int64_t id, const char *notice)
{
	struct snap_copy sc = { 0 };
	struct dm_project *proj;
	struct dm_error e = { 0 };

	index_snapshot_get(j->pf->d.cache->index, id, snap_copy_cb, &sc);
	proj = calloc(1, sizeof(*proj));
	if (proj) {
		proj->id = strdup(sc.project_id);
		proj->name = strdup(sc.project_name);
		proj->dataset_id = strdup("");
		proj->version = strdup(sc.version);
	}
	if (!proj || !proj->id || !proj->name || !proj->dataset_id || !proj->version) {
		dm_project_free(proj);
		e.err = -ENOMEM;
		snprintf(e.message, sizeof(e.message), "out of memory");
		fail_job(j, &e);
		return;
	}
	dm_project_free(j->proj);
	j->proj = proj;
	j->snapshot_id = id;
	j->offline = true;
	snprintf(j->notice, sizeof(j->notice), "%s", notice);
	log_job(LOG_LVL_NOTICE, LOG_GRP_FETCH, j->id, (unsigned)j->uid, proj->name,
		"job %" PRIu64 ": uid %u reads '%s' version '%s' from the cache: %s", j->id,
		(unsigned)j->uid, proj->name, proj->version, notice);
	start_downloading(j);
}

/* The server could not be reached: a valid grant answers instead, if there is one. */
bool fall_back(struct job *j, const char *reason)
{
	char notice[192];

	if (j->final || j->offline || j->fallback_id <= 0 || j->state != DMC_JOB_RESOLVING)
		return false;
	snprintf(notice, sizeof(notice), "served from cache: server unreachable (%.140s)",
		 reason);
	serve_from_grant(j, j->fallback_id, notice);
	return true;
}

/* Errors after which the cache may answer: the server was not reached, or failed. */
bool unreachable(const struct dm_error *e)
{
	return e->err == -DMC_E_UPSTREAM_TRANSIENT || e->http_status >= 500 ||
	       (e->err < 0 && e->err > -4096 && e->http_status == 0);
}

/* ---- online OPENs from a fresh grant (docs/security.md, "Online OPEN") ---- */

/*
 * The snapshot an online OPEN of `uid` with `key` may be answered from at once, without
 * waiting for the server: the one find_grant() picks (the newest complete snapshot of the
 * project, or of the version named, within grant_ttl), when its grant was proved WITH THIS
 * KEY at most grant_recheck ago. The caller still checks with the server in the background
 * (a job), whose refusal withdraws the grant (withdraw_grants()). 0 and *ret_id, or
 * -ENOENT (or -ENOMEM).
 */
int fresh_grant(struct prefetch *p, uid_t uid, const char *server, const char *project,
		const char *version, struct dmc_str key, int64_t *ret_id)
{
	uint64_t window_s = p->d.cfg->grant_recheck_ms / 1000;
	int64_t now = (int64_t)time(NULL), id = 0;
	uint8_t h[STORE_DIGEST_SIZE];
	struct index_grant gr;
	struct job tmp;
	int rc = -ENOENT;

	if (!window_s || !key.len)
		return -ENOENT;
	memset(&tmp, 0, sizeof(tmp));
	tmp.pf = p;
	tmp.uid = uid;
	tmp.server = (char *)server;
	tmp.project_arg = (char *)project;
	tmp.version_arg = (char *)version;
	tmp.key = secret_new(key.ptr, key.len);
	if (!tmp.key)
		return -ENOMEM;
	if (find_grant(&tmp, &id, NULL, 0) == 0 && key_hash(p, tmp.key, h) == 0 &&
	    index_grant_get(p->d.cache->index, uid, id, &gr) == 0 && gr.has_key_hash &&
	    memcmp(gr.key_hash, h, sizeof(h)) == 0 && gr.checked_at <= now + GRANT_CLOCK_SKEW_S &&
	    now - gr.checked_at <= (int64_t)window_s) {
		*ret_id = id;
		rc = 0;
	}
	explicit_bzero(h, sizeof(h));
	secret_free(tmp.key);
	return rc;
}

/* Answers an OPEN (its ready callback) with snapshot `id`, as a job that listed it would. */
void answer_from_grant(struct prefetch *p, int64_t id, prefetch_ready_cb cb, void *ctx)
{
	struct snap_copy sc = { 0 };
	struct prefetch_ready r = { 0 };

	int rc = index_snapshot_get(p->d.cache->index, id, snap_copy_cb, &sc);

	if (rc < 0) {
		r.err = -1;
		r.code = rc == -ENOMEM ? DMC_E_OVERLOADED : DMC_E_INTERNAL;
		r.message = rc == -ENOENT ? "the snapshot went away"
					  : "cannot read the snapshot from the index: try again";
		cb(ctx, &r);
		return;
	}
	p->opens_from_grant++;
	r.snapshot_id = id;
	r.items = (uint64_t)sc.item_count;
	r.project_id = sc.project_id;
	r.project_name = sc.project_name;
	r.version = sc.version;
	cb(ctx, &r);
}

#define WITHDRAW_MAX 64 /* snapshots of one project looked at per refusal */

struct id_list {
	int64_t ids[WITHDRAW_MAX];
	unsigned n;
};

static int collect_id(void *ctx, int64_t id)
{
	struct id_list *l = ctx;

	l->ids[l->n++] = id;
	return l->n == WITHDRAW_MAX;
}

/*
 * The server refused `j`'s key for its project (401 or 403, or 404 while resolving or
 * listing: the key does not see it): the uid's grants of that project at that server that
 * this key proved (or that carry no key hash) are withdrawn, so that no later OPEN is
 * answered from them, online or offline.
 */
void withdraw_grants(struct job *j, const struct dm_error *e)
{
	if (!j->offline && (j->state == DMC_JOB_RESOLVING || j->state == DMC_JOB_LISTING))
		withdraw_grants_refused(j, e);
}

/* The same for the answer to a job's resolve, whatever the job became meanwhile (it may have
 * been answered from a grant when the server was slow). */
void withdraw_grants_refused(struct job *j, const struct dm_error *e)
{
	struct prefetch *p = j->pf;
	struct index *ix = p->d.cache->index;
	struct id_list l = { .n = 0 };
	uint8_t h[STORE_DIGEST_SIZE];
	bool has = false;
	unsigned n = 0;

	if (j->source != DMC_SOURCE_DATAMINT || !j->key || !j->server ||
	    (e->http_status != 401 && e->http_status != 403 && e->http_status != 404))
		return;
	has = key_hash(p, j->key, h) == 0;
	index_grant_newest(ix, j->uid, INDEX_SOURCE_DATAMINT, j->server, j->project_arg, collect_id,
			   &l);
	if (j->proj && j->proj->id && strcmp(j->proj->id, j->project_arg) != 0 &&
	    l.n < WITHDRAW_MAX)
		index_grant_newest(ix, j->uid, INDEX_SOURCE_DATAMINT, j->server, j->proj->id,
				   collect_id, &l);
	for (unsigned i = 0; i < l.n; i++) {
		struct index_grant gr;
		if (index_grant_get(ix, j->uid, l.ids[i], &gr) < 0)
			continue;
		if (gr.has_key_hash && (!has || memcmp(gr.key_hash, h, sizeof(h)) != 0))
			continue; /* proved by another key of this uid */
		if (index_grant_delete(ix, j->uid, l.ids[i]) == 0)
			n++;
	}
	explicit_bzero(h, sizeof(h));
	if (!n)
		return;
	if (index_flush(ix) < 0) {
		log_warn(STORE, "job %" PRIu64 ": cannot withdraw uid %u's grants: %s", j->id,
			 (unsigned)j->uid, index_errmsg(ix));
		return;
	}
	p->grants_withdrawn += n;
	log_job(LOG_LVL_NOTICE, LOG_GRP_FETCH, j->id, (unsigned)j->uid, j->project_arg,
		"job %" PRIu64 ": the server refused uid %u's key for '%s' (HTTP %ld): %u grant(s) "
		"withdrawn", j->id, (unsigned)j->uid, j->project_arg, (long)e->http_status, n);
}
