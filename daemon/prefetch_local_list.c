/*
 * prefetch's local dataset folders, the listing: dataset.json parsed on the threadpool
 * (or the uid's kept item table mapped, local_table.h), the snapshot listed from it (or
 * from the identity of the uid's own earlier stable parse, before anything is read), and
 * the parse's identity and table kept for the next OPEN. prefetch_local.c has the design
 * and the walk that follows.
 * Loop thread; local_scan_work() and table_write_work() run on the threadpool and touch
 * only their job.
 */
#include <errno.h>
#include <inttypes.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "conn.h"
#include "datamint.h"
#include "local.h"
#include "local_table.h"
#include "log.h"
#include "index.h"
#include "prefetch_priv.h"
#include "store.h"

/* A folder of at least this many items gives what its parse took back (malloc_trim). */
#define LOCAL_TRIM_ITEMS 10000u

/* ---- dataset.json's identity: a listing answered before the parse ---- */

void local_seen_clear(struct prefetch *p)
{
	for (unsigned i = 0; i < LOCAL_SEEN_MAX; i++) {
		struct local_seen *e = &p->local_seen[i];
		free(e->root);
		free(e->name);
		free(e->version);
		memset(e, 0, sizeof(*e));
	}
}

/* The entry of (uid, folder), or NULL. */
static struct local_seen *seen_find(struct prefetch *p, uid_t uid, const char *root)
{
	for (unsigned i = 0; i < LOCAL_SEEN_MAX; i++)
		if (p->local_seen[i].root && p->local_seen[i].uid == uid &&
		    strcmp(p->local_seen[i].root, root) == 0)
			return &p->local_seen[i];
	return NULL;
}

static void seen_forget(struct local_seen *e)
{
	free(e->root);
	free(e->name);
	free(e->version);
	memset(e, 0, sizeof(*e));
}

static bool listing_unchanged(struct index *ix, int64_t id, const uint8_t *digest, uint32_t n);

/* INDEX_PROBE_LOCAL_SEEN's row: the identity, the digest, the count. */
#define SEEN_ROW (5 * 8 + STORE_DIGEST_SIZE + 4)

static void put_le64(uint8_t *p, uint64_t v)
{
	for (unsigned i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

/* The parse's identity, kept with the snapshot (empty: none holds) for the next start. */
static void seen_record(struct index *ix, int64_t id, const struct local_dataset *l)
{
	uint8_t row[SEEN_ROW];

	if (!l->stable) {
		index_probe_put(ix, id, INDEX_PROBE_LOCAL_SEEN, row, 0);
		return;
	}
	put_le64(row, l->stamp.dev);
	put_le64(row + 8, l->stamp.ino);
	put_le64(row + 16, (uint64_t)l->stamp.size);
	put_le64(row + 24, (uint64_t)l->stamp.mtime_ns);
	put_le64(row + 32, (uint64_t)l->stamp.ctime_ns);
	memcpy(row + 40, l->digest, STORE_DIGEST_SIZE);
	row[40 + STORE_DIGEST_SIZE] = (uint8_t)l->n;
	row[41 + STORE_DIGEST_SIZE] = (uint8_t)(l->n >> 8);
	row[42 + STORE_DIGEST_SIZE] = (uint8_t)(l->n >> 16);
	row[43 + STORE_DIGEST_SIZE] = (uint8_t)(l->n >> 24);
	index_probe_put(ix, id, INDEX_PROBE_LOCAL_SEEN, row, sizeof(row));
}

struct seen_find_ctx {
	uid_t uid;
	const char *root;
	int64_t id;
	char *name, *version;
};

/* The uid's latest snapshot of the folder (snapshots come by id). */
static int seen_snap_cb(void *ctx, const struct index_snapshot *s)
{
	struct seen_find_ctx *f = ctx;
	char *name, *version;

	if (s->source != INDEX_SOURCE_FOLDER || s->owner != (int64_t)f->uid || !s->project_id ||
	    strcmp(s->project_id, f->root) != 0 || !s->project_name || !s->version)
		return 0;
	name = strdup(s->project_name);
	version = strdup(s->version);
	if (!name || !version) {
		free(name);
		free(version);
		return 0;
	}
	free(f->name);
	free(f->version);
	f->name = name;
	f->version = version;
	f->id = s->id;
	return 0;
}

/*
 * Nothing in memory for (uid, folder), as after a start: what the index kept of the uid's
 * own last stable parse (INDEX_PROBE_LOCAL_SEEN) becomes the entry, when the snapshot is
 * still listed from those bytes (the same check as for an entry made in this run).
 */
static struct local_seen *seen_load(struct prefetch *p, uid_t uid, const char *root)
{
	struct index *ix = p->d.cache->index;
	struct seen_find_ctx f = { uid, root, 0, NULL, NULL };
	struct local_seen *e = NULL;
	uint8_t *row = NULL;
	size_t len = 0;
	uint32_t n;

	if (index_snapshot_list(ix, seen_snap_cb, &f) < 0 || !f.id ||
	    index_probe_get(ix, f.id, INDEX_PROBE_LOCAL_SEEN, (void **)&row, &len) < 0 ||
	    len != SEEN_ROW)
		goto out;
	n = (uint32_t)row[40 + STORE_DIGEST_SIZE] | (uint32_t)row[41 + STORE_DIGEST_SIZE] << 8 |
	    (uint32_t)row[42 + STORE_DIGEST_SIZE] << 16 | (uint32_t)row[43 + STORE_DIGEST_SIZE] << 24;
	if (!listing_unchanged(ix, f.id, row + 40, n))
		goto out;
	e = &p->local_seen[0];
	for (unsigned i = 0; i < LOCAL_SEEN_MAX && e->root; i++)
		if (!p->local_seen[i].root || p->local_seen[i].used < e->used)
			e = &p->local_seen[i];
	seen_forget(e);
	e->root = strdup(root);
	e->name = f.name;
	e->version = f.version;
	f.name = f.version = NULL;
	if (!e->root) {
		seen_forget(e);
		e = NULL;
		goto out;
	}
	e->uid = uid;
	e->stamp.dev = get_le64(row);
	e->stamp.ino = get_le64(row + 8);
	e->stamp.size = (int64_t)get_le64(row + 16);
	e->stamp.mtime_ns = (int64_t)get_le64(row + 24);
	e->stamp.ctime_ns = (int64_t)get_le64(row + 32);
	e->snapshot_id = f.id;
	memcpy(e->digest, row + 40, STORE_DIGEST_SIZE);
	e->n = n;
	e->used = ++p->local_seen_clock;
	p->local_seen_loaded++;
out:
	free(row);
	free(f.name);
	free(f.version);
	return e;
}

/* Records what the job's parse gave, when dataset.json was stable while read; else forgets
 * what an earlier one gave. */
static void seen_put(struct job *j, int64_t snapshot_id)
{
	struct prefetch *p = j->pf;
	const struct local_dataset *l = j->lj->l;
	struct local_seen *e = seen_find(p, j->uid, j->project_arg);

	if (!e && l->stable) {
		e = &p->local_seen[0];
		for (unsigned i = 0; i < LOCAL_SEEN_MAX && e->root; i++)
			if (!p->local_seen[i].root || p->local_seen[i].used < e->used)
				e = &p->local_seen[i];
	}
	seen_record(p->d.cache->index, snapshot_id, l);
	if (!e)
		return;
	seen_forget(e);
	if (!l->stable)
		return;
	e->root = strdup(j->project_arg);
	e->name = strdup(l->name);
	e->version = strdup(l->version);
	if (!e->root || !e->name || !e->version) {
		seen_forget(e);
		return;
	}
	e->uid = j->uid;
	e->stamp = l->stamp;
	e->snapshot_id = snapshot_id;
	memcpy(e->digest, l->digest, sizeof(e->digest));
	e->n = l->n;
	e->used = ++p->local_seen_clock;
}

void local_scan_prepare(struct job *j)
{
	struct local_seen *e = seen_find(j->pf, j->uid, j->project_arg);

	if (!e)
		e = seen_load(j->pf, j->uid, j->project_arg);

	j->lj->want_set = e != NULL;
	if (e)
		j->lj->want = e->stamp;
}

void local_scan_work(uv_work_t *w)
{
	struct job *j = w->data;
	struct local_job *lj = j->lj;
	struct local_stamp now;
	struct stat st;

	/* the descriptor shows the identity an earlier parse of this uid recorded: listed
	 * from that (local_scan_after) before anything is read */
	lj->hit = false;
	if (!lj->early && lj->want_set && fstat(lj->json_fd, &st) == 0 && S_ISREG(st.st_mode)) {
		local_stamp_of(&st, &now);
		if (memcmp(&now, &lj->want, sizeof(now)) == 0) {
			lj->hit = true;
			return;
		}
	}
	/* listed early: the table this uid's parse of those bytes left, else the parse */
	if (lj->early && lj->table_try) {
		lj->table_rc = local_table_map(store_dir(j->pf->d.cache->store), j->uid,
					       lj->table_digest, lj->table_n, j->project_arg,
					       &lj->scanned);
		if (lj->table_rc == 0) {
			j->scan_err = 0;
			return;
		}
	}
	j->scan_err = local_parse(lj->json_fd, j->project_arg, lj->early, &lj->scanned,
				  j->scan_msg, sizeof(j->scan_msg));
}

/* ---- item tables kept on disk (local_table.h) ---- */

struct tables_keep {
	struct {
		uid_t uid;
		int64_t id;
		char *root;
		uint8_t digest[STORE_DIGEST_SIZE];
	} *e;
	size_t n, cap;
};

static int tables_snap_cb(void *ctx, const struct index_snapshot *s)
{
	struct tables_keep *k = ctx;

	if (s->source != INDEX_SOURCE_FOLDER || !s->project_id)
		return 0;
	if (k->n == k->cap) {
		size_t cap = k->cap ? 2 * k->cap : 16;
		void *v = realloc(k->e, cap * sizeof(*k->e));
		if (!v)
			return -ENOMEM;
		k->e = v;
		k->cap = cap;
	}
	if (!(k->e[k->n].root = strdup(s->project_id)))
		return -ENOMEM;
	k->e[k->n].uid = (uid_t)s->owner;
	k->e[k->n++].id = s->id;
	return 0;
}

static bool tables_keep_cb(void *ctx, uid_t uid, const uint8_t *digest)
{
	const struct tables_keep *k = ctx;

	for (size_t i = 0; i < k->n; i++)
		if (k->e[i].uid == uid && memcmp(k->e[i].digest, digest, STORE_DIGEST_SIZE) == 0)
			return true;
	return false;
}

/* A table stays while the uid's latest snapshot of a folder keeps the identity of a parse
 * of its bytes (INDEX_PROBE_LOCAL_SEEN): only such a listing can map it. */
void local_tables_gc(struct prefetch *p)
{
	struct index *ix = p->d.cache->index;
	struct tables_keep k = { 0 }, keep = { 0 };
	int removed, rc;

	rc = index_snapshot_list(ix, tables_snap_cb, &k);
	if (rc == 0 && k.n && !(keep.e = calloc(k.n, sizeof(*keep.e))))
		rc = -ENOMEM;
	for (size_t i = 0; i < k.n && rc == 0; i++) {
		uint8_t *row = NULL;
		size_t len = 0;
		bool latest = true;
		/* only the uid's latest snapshot of a folder is listed early (seen_load()) */
		for (size_t o = 0; o < k.n && latest; o++)
			latest = !(k.e[o].uid == k.e[i].uid && k.e[o].id > k.e[i].id &&
				   strcmp(k.e[o].root, k.e[i].root) == 0);
		if (latest &&
		    index_probe_get(ix, k.e[i].id, INDEX_PROBE_LOCAL_SEEN, (void **)&row, &len) == 0 &&
		    len == SEEN_ROW) {
			memcpy(keep.e[keep.n].digest, row + 40, STORE_DIGEST_SIZE);
			keep.e[keep.n++].uid = k.e[i].uid;
		}
		free(row);
	}
	for (size_t i = 0; i < k.n; i++)
		free(k.e[i].root);
	free(k.e);
	if (rc == 0) { /* nothing is removed on a doubt */
		removed = local_table_gc(store_dir(p->d.cache->store), tables_keep_cb, &keep);
		if (removed > 0)
			log_info(FETCH, "removed %d item table%s of dataset.json parses no longer "
				 "listed", removed, removed == 1 ? "" : "s");
	}
	free(keep.e);
}

static void table_write_work(uv_work_t *w)
{
	struct job *j = w->data;
	struct local_job *lj = j->lj;

	lj->table_rc = local_table_write(store_dir(j->pf->d.cache->store), j->uid, lj->l);
}

static void table_write_after(uv_work_t *w, int status)
{
	struct job *j = w->data;

	(void)status;
	j->pending--;
	if (j->lj->table_rc == 0) {
		j->pf->local_tables_written++;
		local_tables_gc(j->pf);
	} else {
		log_debug(FETCH, "job %" PRIu64 ": the item table of '%.200s' not kept: %s",
			  j->id, j->project_arg, strerror(-j->lj->table_rc));
	}
	job_maybe_free(j);
}

/* A stable parse whose listing holds: its table is kept for the next OPEN listed early. */
static void table_keep(struct job *j)
{
	struct local_job *lj = j->lj;

	if (!lj->l || lj->l->map || !lj->l->stable || !lj->l->n || j->pf->closing)
		return;
	lj->table_work.data = j;
	if (uv_queue_work(j->pf->d.loop, &lj->table_work, table_write_work, table_write_after) == 0)
		j->pending++;
}

/* The row INDEX_PROBE_LOCAL_LISTING of a listing: dataset.json's digest, the item count. */
static void listing_row(const uint8_t *digest, uint32_t n, uint8_t row[STORE_DIGEST_SIZE + 4])
{
	memcpy(row, digest, STORE_DIGEST_SIZE);
	row[STORE_DIGEST_SIZE] = (uint8_t)n;
	row[STORE_DIGEST_SIZE + 1] = (uint8_t)(n >> 8);
	row[STORE_DIGEST_SIZE + 2] = (uint8_t)(n >> 16);
	row[STORE_DIGEST_SIZE + 3] = (uint8_t)(n >> 24);
}

static int listing_record(struct index *ix, int64_t id, const struct local_dataset *l)
{
	uint8_t row[STORE_DIGEST_SIZE + 4];

	listing_row(l->digest, l->n, row);
	return index_probe_put(ix, id, INDEX_PROBE_LOCAL_LISTING, row, sizeof(row));
}

struct listing_snap {
	bool sealed;
	int64_t item_count;
};

static int listing_snap_cb(void *ctx, const struct index_snapshot *s)
{
	struct listing_snap *ls = ctx;

	ls->sealed = s->sealed;
	ls->item_count = s->item_count;
	return 0;
}

/* The snapshot's items were put from these very dataset.json bytes, and are all there. */
static bool listing_unchanged(struct index *ix, int64_t id, const uint8_t *digest, uint32_t n)
{
	uint8_t want[STORE_DIGEST_SIZE + 4];
	struct listing_snap ls = { 0 };
	void *row = NULL;
	size_t len = 0;
	bool same;

	if (index_snapshot_get(ix, id, listing_snap_cb, &ls) < 0 || !ls.sealed ||
	    ls.item_count != (int64_t)n ||
	    index_probe_get(ix, id, INDEX_PROBE_LOCAL_LISTING, &row, &len) < 0)
		return false;
	listing_row(digest, n, want);
	same = len == sizeof(want) && memcmp(row, want, sizeof(want)) == 0;
	free(row);
	return same;
}


struct folder_snap {
	uid_t uid;
	const char *root, *version;
	bool ok;
};

static int folder_snap_cb(void *ctx, const struct index_snapshot *s)
{
	struct folder_snap *f = ctx;

	f->ok = s->source == INDEX_SOURCE_FOLDER && s->owner == (int64_t)f->uid &&
		s->project_id && strcmp(s->project_id, f->root) == 0 && s->version &&
		strcmp(s->version, f->version) == 0;
	return 0;
}

static int queue_scan(struct job *j)
{
	j->scan_work.data = j;
	if (uv_queue_work(j->pf->d.loop, &j->scan_work, local_scan_work, local_scan_after) != 0)
		return -ENOMEM;
	j->pending++;
	return 0;
}

/*
 * dataset.json's descriptor shows the identity this uid's earlier parse recorded (struct
 * local_seen): the uid's own snapshot, still listed from those very bytes, is listed again
 * (every item to be proved again, as always) and the OPEN answered now; the parse for the
 * paths follows on the threadpool, and the job asks for files once it is in. False: the
 * record does not hold (any more), and the job reads dataset.json first.
 */
static bool local_early(struct job *j)
{
	struct local_job *lj = j->lj;
	struct prefetch *p = j->pf;
	struct index *ix = p->d.cache->index;
	struct local_seen *s = seen_find(p, j->uid, j->project_arg);
	struct folder_snap f = { j->uid, j->project_arg, NULL, false };
	struct dm_error e = { 0 };
	struct dm_project *proj;
	int rc;

	if (!s || memcmp(&s->stamp, &lj->want, sizeof(s->stamp)) != 0 ||
	    (j->version_arg[0] && strcmp(j->version_arg, "latest") != 0 &&
	     strcmp(j->version_arg, s->version) != 0))
		return false;
	f.version = s->version;
	if (index_snapshot_get(ix, s->snapshot_id, folder_snap_cb, &f) < 0 || !f.ok ||
	    !listing_unchanged(ix, s->snapshot_id, s->digest, s->n)) {
		seen_forget(s);
		return false;
	}
	proj = calloc(1, sizeof(*proj));
	if (proj) {
		proj->id = strdup(j->project_arg);
		proj->name = strdup(s->name);
		proj->dataset_id = strdup("");
		proj->version = strdup(s->version);
	}
	if (!proj || !proj->id || !proj->name || !proj->dataset_id || !proj->version) {
		dm_project_free(proj);
		return false;
	}
	j->proj = proj;
	j->snapshot_id = s->snapshot_id;
	s->used = ++p->local_seen_clock;
	p->local_listings_kept++;
	p->local_parses_skipped++;
	lj->early = true;
	lj->table_try = true;
	memcpy(lj->table_digest, s->digest, sizeof(lj->table_digest));
	lj->table_n = s->n;
	rc = local_relist(j, j->snapshot_id, s->n, false);
	if (rc == 0)
		rc = index_flush(ix);
	if (rc < 0) {
		e.err = rc;
		snprintf(e.message, sizeof(e.message), "cannot record the snapshot: %s",
			 index_errmsg(ix));
		fail_job(j, &e);
		return true;
	}
	if (queue_scan(j) < 0) {
		e.err = -ENOMEM;
		snprintf(e.message, sizeof(e.message), "cannot start");
		fail_job(j, &e);
		return true;
	}
	start_downloading(j); /* -> notify_ready: the OPEN is answered */
	return true;
}

/* The parse of a job listed early is in: the same bytes the listing came from, then the
 * files are asked for; else the job fails (the folder changed under the OPEN). */
static void local_parsed_late(struct job *j)
{
	struct local_job *lj = j->lj;
	struct index *ix = j->pf->d.cache->index;
	struct local_seen *s;

	if (j->scan_err < 0 || !listing_unchanged(ix, j->snapshot_id, lj->l->digest, lj->l->n)) {
		if ((s = seen_find(j->pf, j->uid, j->project_arg)))
			seen_forget(s);
		record_error(j, j->scan_err < 0 ? j->scan_err : -DMC_E_IO, 0, 0, NULL,
			     j->scan_err < 0 ? j->scan_msg
					     : "dataset.json changed while the folder was opened: "
					       "open it again");
		job_finish(j, DMC_JOB_FAILED);
		return;
	}
	if (lj->l->map) {
		j->pf->local_tables_mapped++;
	} else {
		if (lj->table_rc == -EBADMSG) {
			j->pf->local_tables_refused++;
			log_warn(FETCH, "job %" PRIu64 ": the item table of '%.200s' failed its "
				 "checks: removed, dataset.json parsed instead", j->id, j->project_arg);
		}
		local_listing_free(lj->l);
		if (lj->l->n >= LOCAL_TRIM_ITEMS)
			malloc_trim(0);
		table_keep(j);
	}
	local_pump(j);
}

void local_scan_after(uv_work_t *w, int status)
{
	struct job *j = w->data;
	struct local_job *lj = j->lj;
	struct index *ix = j->pf->d.cache->index;
	struct dm_error e = { 0 };
	struct dm_project *proj;
	int64_t id;
	bool created;
	int rc = 0;

	(void)status;
	j->pending--;
	/* the work's table is the loop's from here (local_pump() reads lj->l meanwhile) */
	if (lj->scanned) {
		local_dataset_free(lj->l);
		lj->l = lj->scanned;
		lj->scanned = NULL;
	}
	if (!j->final && lj->hit) {
		if (local_early(j))
			return;
		lj->want_set = false; /* the record does not hold: dataset.json is read now */
		if (queue_scan(j) == 0)
			return;
		e.err = -ENOMEM;
		snprintf(e.message, sizeof(e.message), "cannot start");
		fail_job(j, &e);
		return;
	}
	close(lj->json_fd);
	lj->json_fd = -1;
	if (j->final) {
		job_maybe_free(j);
		return;
	}
	if (lj->early) {
		local_parsed_late(j);
		return;
	}
	if (j->scan_err < 0) {
		e.err = j->scan_err == -EACCES || j->scan_err == -ENOENT ? -DMC_E_NOT_FOUND_OR_DENIED
									   : j->scan_err;
		snprintf(e.message, sizeof(e.message), "%s", j->scan_msg);
		fail_job(j, &e);
		return;
	}
	proj = calloc(1, sizeof(*proj));
	if (proj) {
		proj->id = strdup(lj->l->root);
		proj->name = strdup(lj->l->name);
		proj->dataset_id = strdup("");
		proj->version = strdup(lj->l->version);
	}
	if (!proj || !proj->id || !proj->name || !proj->dataset_id || !proj->version) {
		dm_project_free(proj);
		e.err = -ENOMEM;
		fail_job(j, &e);
		return;
	}
	j->proj = proj;
	if (j->version_arg[0] && strcmp(j->version_arg, "latest") != 0 &&
	    strcmp(j->version_arg, proj->version) != 0) {
		e.err = -DMC_E_NOT_FOUND_OR_DENIED;
		snprintf(e.message, sizeof(e.message), "the folder holds version '%.80s'",
			 proj->version);
		fail_job(j, &e);
		return;
	}
	/* the uid's own snapshot (owner): it holds what this uid's descriptors proved */
	{
		struct index_snapshot key = {
			.source = INDEX_SOURCE_FOLDER,
			.server_url = "",
			.project_id = proj->id,
			.project_name = proj->name,
			.version = proj->version,
			.created_at = (int64_t)time(NULL),
			.owner = (int64_t)j->uid,
		};
		rc = index_snapshot_get_or_create(ix, &key, &id, &created);
	}
	j->snapshot_id = rc == 0 ? id : 0;
	/* every item's content is proved again every time, by this job's descriptors (by its
	 * digest, or by the uid's own unchanged inode). The items themselves are put again,
	 * their contents forgotten at once, only when dataset.json's bytes differ from those
	 * they were last put from (or their count does); else they wait for their proofs
	 * (relist_begin()) */
	if (rc == 0 && !created && listing_unchanged(ix, id, lj->l->digest, lj->l->n)) {
		j->pf->local_listings_kept++;
		rc = local_relist(j, id, lj->l->n, false);
	} else if (rc == 0) {
		for (uint32_t i = 0; i < lj->l->n && rc == 0; i++) {
			struct index_item item = {
				.snapshot_id = id,
				.idx = i,
				.resource_id = local_item_id(lj->l, i),
				.filename = local_item_filename(lj->l, i),
				.mimetype = local_item_mimetype(lj->l, i),
				.size = 0, /* known at fstat */
				.etag = NULL,
			};
			item.meta = local_item_meta(lj->l, i, &item.meta_len);
			rc = index_item_put(ix, &item);
		}
		if (rc == 0)
			rc = local_relist(j, id, lj->l->n, true);
		if (rc == 0)
			rc = index_snapshot_seal(ix, id);
		if (rc == 0)
			rc = listing_record(ix, id, lj->l);
	}
	if (rc == 0)
		rc = index_flush(ix);
	/* the records are in the index now: the job keeps ids and paths only (local.h) */
	local_listing_free(lj->l);
	if (lj->l->n >= LOCAL_TRIM_ITEMS)
		malloc_trim(0); /* what the parse and the listing took goes back to the system */
	if (rc < 0) {
		e.err = rc;
		snprintf(e.message, sizeof(e.message), "cannot record the snapshot: %s",
			 index_errmsg(ix));
		fail_job(j, &e);
		return;
	}
	seen_put(j, id); /* a later OPEN of this uid may be listed from this parse */
	table_keep(j);   /* ... and map its table */
	start_downloading(j); /* -> job_pump -> local_pump */
}
