/*
 * prefetch's local dataset folders (DMC_SOURCE_LOCAL; local.h, proto.h LOCAL_NEED and
 * LOCAL_FILES), the walk: the files asked from the client a window at a time (and ahead
 * of the walk for the items GETs wait for), read through its descriptors on the
 * threadpool into the store, within per-uid and total bounds of reads at once. The
 * listing (dataset.json, its kept identity and item table) is prefetch_local_list.c's,
 * the proofs prefetch_local_proof.c's.
 * Loop thread; local_task_work() runs on the threadpool and touches only its task.
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

/* ---- local dataset folders ----
 *
 * Read through the requesting client's descriptors, never by path (local.h has the trust
 * design, proto.h the LOCAL_NEED / LOCAL_FILES exchange). The job: dataset.json's
 * descriptor is parsed on the threadpool (local_scan_*), the snapshot (per uid) is listed
 * again (its items put again only when dataset.json's bytes changed:
 * INDEX_PROBE_LOCAL_LISTING) with every item's content to be proved again (see "proofs"
 * below), then local_pump() asks
 * the client for the files a window at a time (whole items, at most DMC_FDS_MAX paths),
 * and starts a task per
 * item once its descriptors are in: fstat (regular files only) and, unless the uid's own
 * earlier read of the same inode with the same size, mtime and ctime is on record, a read
 * on the threadpool that hashes the bytes into the store (local_task_*). The next window is
 * asked for when the previous one is handed to tasks, so a job holds at most one window
 * of descriptors besides those of its running tasks.
 *
 * An OPEN is answered before dataset.json is parsed when the descriptor shows the identity
 * that this uid's own earlier, stable parse recorded (struct local_seen, local_early()):
 * the snapshot is listed again from that parse, and the parse that follows only gives the
 * job its paths (local_parsed_late()). The job's table keeps ids and paths only; the
 * records are in the index once listed.
 */

/*
 * Reads of local files on the threadpool at once, per uid and for all: a descriptor that
 * fstat() calls regular may still block in read (a FUSE file of the user's); it then holds
 * one thread at most, of its uid's two, and never the last free one of the pool (4).
 */
#define LOCAL_READS_PER_UID 2u
#define LOCAL_READS_MAX 3u
/* A mapped item table's pages are given back every this many items walked. */
#define TABLE_TRIM_ITEMS 65536u

/* A task's files: the image (k = 0) and its masks, with what fstat said of each. */
struct local_files {
	uint32_t n;
	int64_t read_bytes;
	int fail_k;             /* the file whose read failed */
	struct {
		int fd;
		bool hit;       /* linked by the uid's earlier read of this inode */
		bool stable;    /* unchanged while read, and not changed just before */
		struct stat st;
	} f[];
};

static void local_reads_next(struct prefetch *p);

void local_job_free(struct job *j)
{
	struct local_job *lj = j->lj;

	if (!lj)
		return;
	for (uint32_t k = 0; k < lj->win_n; k++)
		if (lj->win_fds[k] >= 0)
			close(lj->win_fds[k]);
	if (lj->json_fd >= 0)
		close(lj->json_fd);
	local_dataset_free(lj->l);
	local_dataset_free(lj->scanned);
	free(lj);
	j->lj = NULL;
}

static void local_files_free(struct local_files *lf)
{
	if (!lf)
		return;
	for (uint32_t k = 0; k < lf->n; k++)
		if (lf->f[k].fd >= 0)
			close(lf->f[k].fd);
	free(lf);
}

static const char *local_reason(int err)
{
	switch (err) {
	case EXDEV: return "outside the dataset folder";
	case ELOOP: return "a symbolic link (not followed)";
	case EINVAL: return "not a regular file";
	case EAGAIN: return "reading it would block";
	}
	return strerror(err);
}

static int64_t ts_ns(const struct timespec *t)
{
	return (int64_t)t->tv_sec * 1000000000ll + t->tv_nsec;
}

static void local_read_key(const struct job *j, const struct stat *st, struct index_local_read *r)
{
	memset(r, 0, sizeof(*r));
	r->uid = (uint32_t)j->uid;
	r->dev = (uint64_t)st->st_dev;
	r->ino = (uint64_t)st->st_ino;
	r->size = (int64_t)st->st_size;
	r->mtime_ns = ts_ns(&st->st_mtim);
	r->ctime_ns = ts_ns(&st->st_ctim);
}

static const char *local_file_path(const struct task *t, uint32_t k)
{
	const struct local_dataset *l = t->job->lj->l;

	return k == 0 ? local_item_path(l, (uint32_t)t->idx)
		      : local_mask_path(l, (uint32_t)t->idx, k - 1);
}

/* index_item_get(): the item's record as the index holds it (with its masks' digests of an
 * earlier read, replaced when this task records its own). */
static int local_meta_of(void *ctx, const struct index_item *item)
{
	struct task *t = ctx;

	t->meta = item->meta ? strndup(item->meta, item->meta_len) : strdup("{}");
	t->meta_len = item->meta ? item->meta_len : 2;
	return t->meta ? 0 : -ENOMEM;
}

static void local_task_work(uv_work_t *w)
{
	struct task *t = w->data;
	struct store *store = t->job->pf->d.cache->store;
	struct local_files *lf = t->lfiles;
	struct timespec now;
	int rc = 0;

	clock_gettime(CLOCK_REALTIME, &now);
	for (uint32_t k = 0; k < lf->n && rc == 0; k++) {
		struct store_blob_info *info = k == 0 ? &t->info : &t->minfo[k - 1];
		struct store_writer *wr = NULL;
		struct stat after;
		off_t off = 0;
		ssize_t n;

		if (lf->f[k].hit)
			continue;
		lf->fail_k = (int)k;
		rc = store_writer_open(store, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, &wr);
		/* pread from 0: the client's offset is not ours; O_NONBLOCK: never wait */
		while (rc == 0 && (n = pread(lf->f[k].fd, t->buf, SINK_BUF, off)) != 0) {
			if (n < 0) {
				if (errno == EINTR)
					continue;
				rc = -errno;
				break;
			}
			off += n;
			rc = store_writer_write(wr, t->buf, (size_t)n);
		}
		if (rc == 0)
			rc = store_writer_commit(wr, NULL, info);
		else
			store_writer_abort(wr);
		lf->read_bytes += off;
		/* the shortcut is recorded only for a file that did not change while read and
		 * whose last change is not too recent to be told apart (see LOCAL_RACY_NS) */
		lf->f[k].stable =
			rc == 0 && fstat(lf->f[k].fd, &after) == 0 &&
			after.st_size == lf->f[k].st.st_size && after.st_size == off &&
			ts_ns(&after.st_mtim) == ts_ns(&lf->f[k].st.st_mtim) &&
			ts_ns(&after.st_ctim) == ts_ns(&lf->f[k].st.st_ctim) &&
			ts_ns(&after.st_ctim) < ts_ns(&now) - LOCAL_RACY_NS &&
			ts_ns(&after.st_mtim) < ts_ns(&now) - LOCAL_RACY_NS;
		close(lf->f[k].fd);
		lf->f[k].fd = -1;
	}
	t->work_err = rc;
}

static void local_task_after(uv_work_t *w, int status)
{
	struct task *t = w->data;
	struct job *j = t->job;
	struct cache *cache = j->pf->d.cache;
	struct local_files *lf = t->lfiles;
	int rc = t->work_err;

	(void)status;
	t->work_busy = false;
	t->lfiles = NULL;
	local_reads_next(j->pf); /* this read's slot */
	release_reservation(t);
	j->bytes_done += (uint64_t)lf->read_bytes;
	if (rc < 0) {
		/* what was committed before the failure stays as a blob for reconciliation */
		char full[160];
		t->res.err = rc == -EAGAIN ? -DMC_E_IO : rc;
		snprintf(t->res.message, sizeof(t->res.message), "%.100s: %.140s",
			 local_file_path(t, (uint32_t)lf->fail_k),
			 rc == -DMC_E_CACHE_FULL ? cache_full_text(j->pf, full, sizeof(full))
			 : rc <= -DMC_E_FIRST_ ? dmc_error_text((uint32_t)-rc)
					       : local_reason(-rc));
		local_files_free(lf);
		task_next_step(t);
		return;
	}
	for (uint32_t k = 0; k < lf->n; k++) {
		struct store_blob_info *info = k == 0 ? &t->info : &t->minfo[k - 1];
		uint8_t *digest = k == 0 ? t->file_digest : t->mask_digests[k - 1];
		struct index_local_read r;
		if (lf->f[k].hit)
			continue;
		cache_record_blob(cache, info);
		store_unpin(cache->store, info->digest);
		memcpy(digest, info->digest, STORE_DIGEST_SIZE);
		if (lf->f[k].stable) {
			local_read_key(j, &lf->f[k].st, &r);
			memcpy(r.digest, info->digest, STORE_DIGEST_SIZE);
			index_local_read_put(cache->index, &r);
		}
	}
	local_files_free(lf);
	t->mask_i = t->n_masks;
	t->phase = TP_MASKS;
	j->pf->items_downloaded++;
	task_next_step(t);
}

/* Reads of local files in work now: of `uid`, and of everyone. */
static void local_reads_count(struct prefetch *p, uid_t uid, unsigned *ret_uid,
			      unsigned *ret_all)
{
	*ret_uid = *ret_all = 0;
	for (struct job *j = p->jobs; j; j = j->next) {
		if (!j->lj)
			continue;
		for (struct task *t = j->tasks; t; t = t->next)
			if (t->lfiles && t->work_busy) {
				++*ret_all;
				*ret_uid += j->uid == uid;
			}
	}
}

static bool local_read_may_start(struct prefetch *p, uid_t uid)
{
	unsigned mine, all;

	local_reads_count(p, uid, &mine, &all);
	return mine < LOCAL_READS_PER_UID && all < LOCAL_READS_MAX;
}

/* Queues the read of a task whose t->lfiles is set. */
static void local_task_queue(struct task *t)
{
	t->work.data = t;
	t->work_busy = true;
	if (uv_queue_work(t->job->pf->d.loop, &t->work, local_task_work, local_task_after) != 0) {
		struct local_files *lf = t->lfiles;
		t->work_busy = false;
		t->lfiles = NULL;
		local_files_free(lf);
		task_finish(t, -ENOMEM, "cannot queue the read", 0);
	}
}

/* A task waiting for a read slot (t->lfiles set, no work), or NULL. */
static struct task *local_parked(struct job *j)
{
	for (struct task *t = j->tasks; t; t = t->next)
		if (t->lfiles && !t->work_busy)
			return t;
	return NULL;
}

/* Ends a parked task: its job was cancelled. */
static void local_parked_cancel(struct task *t)
{
	struct local_files *lf = t->lfiles;

	t->lfiles = NULL;
	local_files_free(lf);
	task_finish(t, -DMC_E_CANCELLED, "cancelled", 0);
}

/* A read slot is free: parked tasks of cancelled jobs end, the others start in turn. */
static void local_reads_next(struct prefetch *p)
{
	for (;;) {
		struct task *t = NULL;
		for (struct job *j = p->jobs; j && !t; j = j->next)
			if (j->lj && (t = local_parked(j)) && !j->cancelled &&
			    !local_read_may_start(p, j->uid))
				t = NULL;
		if (!t)
			return;
		if (t->job->cancelled)
			local_parked_cancel(t);
		else
			local_task_queue(t);
	}
}

/* Item `i` of the folder gets a task with its descriptors (taken: fds[k] < 0 with errs[k]
 * the client's errno); proved by the inode shortcut at once, or read on the threadpool. */
static void local_task_begin(struct job *j, uint32_t i, const int *fds, const int32_t *errs)
{
	struct prefetch *p = j->pf;
	struct cache *cache = p->d.cache;
	const struct local_dataset *l = j->lj->l;
	const struct local_item *it = &l->items[i];
	uint32_t nf = 1 + it->n_masks;
	struct local_files *lf = calloc(1, sizeof(*lf) + nf * sizeof(lf->f[0]));
	struct task *t = calloc(1, sizeof(*t));
	char msg[FETCH_MESSAGE_MAX];
	uint64_t reserve = 0;
	bool all_hit = true;
	int rc;

	if (lf) {
		lf->n = nf;
		for (uint32_t k = 0; k < nf; k++)
			lf->f[k].fd = fds[k];
	} else {
		for (uint32_t k = 0; k < nf; k++)
			if (fds[k] >= 0)
				close(fds[k]);
	}
	if (!t) {
		local_files_free(lf);
		record_error(j, -ENOMEM, 0, 0, local_item_id(l, i), "out of memory");
		j->items_failed++;
		j->lj->tried++;
		local_failed(j, i);
		return;
	}
	t->job = j;
	t->idx = i;
	t->kind = STORE_KIND_RAW;
	t->resource_id = strdup(local_item_id(l, i));
	t->next = j->tasks;
	if (j->tasks)
		j->tasks->prev = t;
	j->tasks = t;
	j->running++;
	t->n_masks = it->n_masks;
	t->buf = malloc(SINK_BUF);
	t->masks = calloc(nf, sizeof(*t->masks));
	t->minfo = calloc(nf, sizeof(*t->minfo));
	t->mask_digests = calloc(nf, STORE_DIGEST_SIZE);
	/* the record is needed to add the masks' digests to it: the index has it (put from
	 * these very dataset.json bytes by local_scan_after()) */
	if (it->n_masks && index_item_get(cache->index, j->snapshot_id, i, local_meta_of, t) < 0)
		t->meta = NULL;
	if (!lf || !t->resource_id || (it->n_masks && !t->meta) || !t->buf || !t->masks ||
	    !t->minfo || !t->mask_digests) {
		local_files_free(lf);
		task_finish(t, -ENOMEM, "out of memory", 0);
		return;
	}
	for (uint32_t k = 0; k < it->n_masks; k++) {
		t->masks[k].annotation_id = strdup(local_mask_id(l, i, k));
		if (!t->masks[k].annotation_id) {
			local_files_free(lf);
			task_finish(t, -ENOMEM, "out of memory", 0);
			return;
		}
	}
	/* every descriptor: the client's errno, or fstat as a regular file, then the uid's
	 * own earlier read of the same inode, unchanged (size, mtime and ctime) */
	for (uint32_t k = 0; k < nf; k++) {
		struct index_local_read r;
		int err = errs[k];
		if (!err && (fstat(lf->f[k].fd, &lf->f[k].st) != 0 || !S_ISREG(lf->f[k].st.st_mode)))
			err = EINVAL;
		if (err) {
			snprintf(msg, sizeof(msg), "%.160s: %.80s", local_file_path(t, k),
				 local_reason(err));
			local_files_free(lf);
			task_finish(t, err == EACCES || err == EPERM || err == ENOENT ||
						       err == ELOOP || err == EXDEV
					       ? -DMC_E_NOT_FOUND_OR_DENIED
					       : -DMC_E_IO,
				    msg, 0);
			return;
		}
		local_read_key(j, &lf->f[k].st, &r);
		if (index_local_read_find(cache->index, &r) == 0) {
			lf->f[k].hit = true;
			memcpy(k == 0 ? t->file_digest : t->mask_digests[k - 1], r.digest,
			       STORE_DIGEST_SIZE);
		} else {
			all_hit = false;
			reserve += (uint64_t)lf->f[k].st.st_size;
		}
	}
	t->size = (int64_t)lf->f[0].st.st_size;
	index_local_item_size(cache->index, j->snapshot_id, t->idx, t->size);
	j->bytes_total += reserve; /* what is read */
	if (all_hit) {
		local_files_free(lf);
		j->items_cached++;
		t->mask_i = t->n_masks;
		t->phase = TP_MASKS;
		task_next_step(t);
		return;
	}
	rc = cache_reserve(cache, reserve);
	if (rc < 0) {
		char full[160];
		local_files_free(lf);
		task_finish(t, rc, rc == -DMC_E_CACHE_FULL ? cache_full_text(j->pf, full, sizeof(full))
							   : "cannot make room", 0);
		return;
	}
	t->reserved = reserve ? reserve : 1;
	if (!reserve)
		store_release(cache->store, 0);
	t->lfiles = lf;
	if (local_read_may_start(p, j->uid))
		local_task_queue(t);
	/* else parked: local_reads_next() starts it when a read ends */
}

/* Sends LOCAL_NEED for `n` paths from `first`; the job then waits for its LOCAL_FILES. */
static int send_need(struct local_job *lj, uint32_t first, const char *const *paths,
		     uint32_t n)
{
	uint8_t *frame;
	int len, rc;

	if (!lj->c)
		return -ENOTCONN;
	frame = malloc(DMC_HEADER_SIZE + DMC_FRAME_MAX);
	if (!frame)
		return -ENOMEM;
	len = dmc_local_need_encode(first, paths, n, lj->request_id, frame,
				    DMC_HEADER_SIZE + DMC_FRAME_MAX);
	rc = len > 0 ? conn_send(lj->c, frame, (size_t)len) : -EINVAL;
	free(frame);
	if (rc < 0)
		return rc;
	lj->need_first = first;
	lj->need_n = n;
	return 0;
}

/* The paths of a mapped table are checked again as they are asked for (local_table.h). */
static bool paths_ok(const struct local_dataset *l, const char *const *paths, uint32_t n)
{
	for (uint32_t k = 0; l->map && k < n; k++)
		if (!local_table_path_ok(paths[k]))
			return false;
	return true;
}

#define TABLE_DAMAGED                                                                      \
	"the daemon's saved table of dataset.json is damaged (removed): open the folder again"

/* A mapped table held a path that leaves the folder: it goes, and the job fails; the next
 * OPEN parses dataset.json. */
static void table_refused(struct job *j)
{
	struct local_job *lj = j->lj;

	j->pf->local_tables_refused++;
	local_table_remove(store_dir(j->pf->d.cache->store), j->uid, lj->table_digest);
	log_warn(FETCH, "job %" PRIu64 ": the item table of '%.200s' holds a path that leaves "
		 "the folder: removed", j->id, j->project_arg);
	record_error(j, -DMC_E_IO, 0, 0, NULL, TABLE_DAMAGED);
	/* the GETs that wait for the items asked ahead hear why */
	for (uint32_t i = 0; i < lj->ahead_n && j->pf->item_hook; i++)
		j->pf->item_hook(j->pf->item_hook_ctx, j->snapshot_id, lj->ahead_items[i],
				 j->uid, -DMC_E_IO, TABLE_DAMAGED);
	lj->ahead_n = 0;
	job_finish(j, DMC_JOB_FAILED);
}

/* Asks the client for the next window of paths: whole items, at most DMC_FDS_MAX. */
static int local_need(struct job *j)
{
	struct local_job *lj = j->lj;
	const struct local_dataset *l = lj->l;
	const char *paths[DMC_FDS_MAX];
	uint32_t first = lj->next_path, n = 0, item;
	int rc;

	if (!lj->c)
		return -ENOTCONN;
	/* the item whose image is next_path, then as many whole items as fit */
	for (item = lj->next_item; item < l->n && l->items[item].first_path < first; item++)
		;
	for (; item < l->n && n + 1 + l->items[item].n_masks <= DMC_FDS_MAX; item++) {
		paths[n++] = local_item_path(l, item);
		for (uint32_t k = 0; k < l->items[item].n_masks; k++)
			paths[n++] = local_mask_path(l, item, k);
	}
	if (n == 0)
		return 0;
	if (!paths_ok(l, paths, n))
		return -EBADMSG;
	if ((rc = send_need(lj, first, paths, n)) < 0)
		return rc;
	lj->next_path = first + n;
	return 0;
}

bool local_want_done(const struct job *j, int64_t idx)
{
	const struct local_job *lj = j->lj;

	if (taken_test(j, idx))
		return true;
	if (!lj->l)
		return false; /* listed early: the parse is not in yet */
	return idx < 0 || idx >= (int64_t)lj->l->n ||
	       lj->l->items[idx].first_path < lj->next_path;
}

/*
 * Asks the client for the files of the items GETs wait for (prefetch_want()), ahead of the
 * walk: whole items, at most DMC_FDS_MAX paths, `first` DMC_LOCAL_AHEAD with a sequence
 * number. Each is marked taken, so that the walk skips it (closing the descriptors its own
 * window brings for it). 1: asked; 0: nothing to ask; < 0: the send failed.
 */
static int local_need_ahead(struct job *j)
{
	struct local_job *lj = j->lj;
	const struct local_dataset *l = lj->l;
	const char *paths[DMC_FDS_MAX];
	uint32_t n = 0, first;
	int rc;

	lj->ahead_n = 0;
	while (j->want_n) {
		int64_t idx = j->want[j->want_head];
		const struct local_item *it;

		if (local_want_done(j, idx)) {
			j->want_head = (j->want_head + 1) % WANT_MAX;
			j->want_n--;
			continue;
		}
		it = &l->items[idx];
		if (n + 1 + it->n_masks > DMC_FDS_MAX)
			break; /* the next window */
		j->want_head = (j->want_head + 1) % WANT_MAX;
		j->want_n--;
		if (taken_set(j, idx) < 0)
			continue; /* out of memory: the walk brings it */
		lj->ahead_items[lj->ahead_n++] = (uint32_t)idx;
		paths[n++] = local_item_path(l, (uint32_t)idx);
		for (uint32_t k = 0; k < it->n_masks; k++)
			paths[n++] = local_mask_path(l, (uint32_t)idx, k);
	}
	if (n == 0)
		return 0;
	if (!paths_ok(l, paths, n))
		return -EBADMSG;
	first = DMC_LOCAL_AHEAD | (++lj->ahead_seq & ~DMC_LOCAL_AHEAD);
	if ((rc = send_need(lj, first, paths, n)) < 0)
		return rc;
	lj->need_ahead = true;
	j->pf->local_ahead += lj->ahead_n;
	return 1;
}

/* The descriptors of a window asked ahead: a task for each of its items, whatever the
 * walk's window allows (a GET waits for them). */
static void local_start_ahead(struct job *j)
{
	struct local_job *lj = j->lj;
	uint32_t k = 0;

	for (uint32_t i = 0; i < lj->ahead_n && !j->final; i++) {
		uint32_t item = lj->ahead_items[i];
		uint32_t nf = 1 + lj->l->items[item].n_masks;
		local_task_begin(j, item, lj->win_fds + k, lj->win_errs + k);
		for (uint32_t m = 0; m < nf; m++)
			lj->win_fds[k + m] = -1; /* the task's now */
		k += nf;
	}
	for (; k < lj->win_n; k++) /* the job ended meanwhile */
		if (lj->win_fds[k] >= 0) {
			close(lj->win_fds[k]);
			lj->win_fds[k] = -1;
		}
	lj->ahead_n = 0;
	lj->win_n = 0;
	lj->win_ahead = false;
}

/* job_pump() of a local job: tasks from the received window, the next LOCAL_NEED, the end.
 * The job is held (pending) while it pumps: a LOCAL_NEED whose send fails closes the
 * connection, which cancels and would free the job under us. */
void local_pump(struct job *j)
{
	struct local_job *lj = j->lj;
	struct prefetch *p = j->pf;
	int rc;

	if (!lj->l)
		return; /* listed early: the paths come with the parse (local_scan_after) */
	if (lj->pumping) {
		lj->pump_again = true;
		return;
	}
	lj->pumping = true;
	j->pending++;
	do {
		lj->pump_again = false;
		if (lj->win_n && lj->win_ahead)
			local_start_ahead(j);
		while (!j->final && lj->win_n && lj->next_item < lj->l->n && j->running < window(p)) {
			const struct local_item *it = &lj->l->items[lj->next_item];
			uint32_t k = it->first_path - lj->win_first;
			if (it->first_path < lj->win_first ||
			    it->first_path + 1 + it->n_masks > lj->win_first + lj->win_n)
				break;
			if (taken_test(j, lj->next_item)) {
				/* its files came ahead of the walk: these are not needed */
				for (uint32_t m = 0; m <= it->n_masks; m++)
					if (lj->win_fds[k + m] >= 0) {
						close(lj->win_fds[k + m]);
						lj->win_fds[k + m] = -1;
					}
				lj->next_item++;
				continue;
			}
			local_task_begin(j, lj->next_item++, lj->win_fds + k, lj->win_errs + k);
			for (uint32_t m = 0; m <= it->n_masks; m++)
				lj->win_fds[k + m] = -1; /* the task's now */
		}
		if (j->final)
			break;
		if (lj->l->map && lj->next_item - lj->trimmed_at >= TABLE_TRIM_ITEMS) {
			local_table_trim(lj->l); /* the walk's pages go back to the page cache */
			lj->trimmed_at = lj->next_item;
		}
		if (lj->win_n && (lj->next_item >= lj->l->n ||
				  lj->l->items[lj->next_item].first_path >= lj->win_first + lj->win_n))
			lj->win_n = 0; /* handed out whole */
		if (!lj->win_n && !lj->need_n &&
		    (j->want_n || lj->next_path < lj->l->n_paths)) {
			rc = local_need_ahead(j);
			if (rc == 0 && lj->next_path < lj->l->n_paths)
				rc = local_need(j);
			if (j->final)
				break; /* the send closed the connection, which cancelled the job */
			if (rc == -EBADMSG) {
				table_refused(j);
				break;
			}
			if (rc < 0) {
				record_error(j, -DMC_E_CANCELLED, 0, 0, NULL,
					     "the client that opened the files went away");
				job_finish(j, DMC_JOB_CANCELLED);
				break;
			}
		}
		if (lj->next_item >= lj->l->n && j->running == 0) {
			job_finish(j, j->items_failed ? DMC_JOB_FAILED : DMC_JOB_DONE);
			break;
		}
	} while (lj->pump_again && !j->final);
	lj->pumping = false;
	j->pending--;
	job_maybe_free(j);
}

/* LOCAL_FILES: the descriptors of the paths the job asked for. */
void on_local_files(struct prefetch *p, struct conn *c, const struct dmc_header *h,
		    const uint8_t *payload)
{
	struct local_job *lj = NULL;
	struct job *j;
	int32_t errs[DMC_FDS_MAX];
	int fds[DMC_FDS_MAX];
	uint32_t first, n, got, f = 0;

	for (j = p->jobs; j; j = j->next)
		if (!j->final && j->lj && j->lj->c == c && j->lj->request_id == h->request_id) {
			lj = j->lj;
			break;
		}
	if (!lj)
		return; /* the job ended meanwhile: the connection closes the descriptors */
	if (dmc_local_files_decode(payload, h->length, h->nfds, &first, &n, errs, DMC_FDS_MAX) !=
		    DMC_PROTO_OK ||
	    !lj->need_n || first != lj->need_first || n != lj->need_n) {
		record_error(j, -DMC_E_PROTOCOL, 0, 0, NULL,
			     "the client sent files that were not asked for");
		job_finish(j, DMC_JOB_FAILED);
		return;
	}
	got = conn_take_fds(c, fds, h->nfds);
	if (got != h->nfds) {
		for (uint32_t k = 0; k < got; k++)
			close(fds[k]);
		record_error(j, -DMC_E_PROTOCOL, 0, 0, NULL, "descriptors missing");
		job_finish(j, DMC_JOB_FAILED);
		return;
	}
	for (uint32_t k = 0; k < n; k++) {
		lj->win_errs[k] = errs[k];
		lj->win_fds[k] = errs[k] == 0 ? fds[f++] : -1;
	}
	lj->win_first = first;
	lj->win_n = n;
	lj->win_ahead = lj->need_ahead;
	lj->need_n = 0;
	lj->need_ahead = false;
	local_pump(j);
}

/* The feeding client is gone: its job cannot read anything more. */
void local_conn_closed(struct prefetch *p, struct conn *c)
{
	for (struct job *j = p->jobs, *n; j; j = n) {
		n = j->next;
		if (j->lj && j->lj->c == c) {
			struct task *t;
			j->lj->c = NULL;
			if (!j->final)
				job_cancel(j);
			/* parked reads end now (the job may be freed with its last task) */
			while ((t = local_parked(j))) {
				bool last = !t->next && !t->prev;
				local_parked_cancel(t);
				if (last)
					break;
			}
		}
	}
}

