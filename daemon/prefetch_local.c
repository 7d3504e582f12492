/*
 * prefetch's local dataset folders (DMC_SOURCE_LOCAL; local.h, proto.h LOCAL_NEED and
 * LOCAL_FILES): dataset.json parsed on the threadpool, the snapshot listed again, the
 * files asked from the client a window at a time and read through its descriptors on the
 * threadpool into the store, within per-uid and total bounds of reads at once.
 * Loop thread; local_task_work() and local_scan_work() run on the threadpool and touch
 * only their task or job.
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
/* A folder of at least this many items gives what its parse took back (malloc_trim). */
#define LOCAL_TRIM_ITEMS 10000u
#define LOCAL_READS_MAX 3u

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
	j->scan_err = local_parse(lj->json_fd, j->project_arg, lj->early, &lj->l, j->scan_msg,
				  sizeof(j->scan_msg));
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

/* ---- proofs: every item proved again by each job that lists the folder ----
 *
 * A listing whose items were put again (dataset.json changed) forgets every item's content
 * at once (index_local_relist()). An unchanged listing leaves the rows as they are, and
 * the job proves each item again, writing only what changed (a file read again, a size);
 * an item whose proof fails is forgotten at once (local_failed()). Either way the listing
 * starts the snapshot's proof record (struct lproof, one bit per item, set by any job's
 * proof from then on): while it exists, prefetch_item_unproved() trusts a row only when its
 * bit is set. It goes when a job of that listing has tried every item (each row is then
 * proved or forgotten); a job that ends before (its client gone) leaves it, so that the
 * items it did not reach are not served by an earlier proof, and nothing is written for
 * them. Serve is told of every listing (PREFETCH_RELISTED): the rows its regions kept
 * must not hand an item in place by what an earlier proof found.
 */

/* More records than this: the oldest one's snapshot is trusted in nothing until listed
 * again (its id goes to p->distrust). */
#define LPROOFS_MAX 32u

static struct lproof *lproof_of(struct prefetch *p, int64_t id)
{
	for (uint32_t i = 0; i < p->n_lproofs; i++)
		if (p->lproofs[i].snapshot_id == id)
			return &p->lproofs[i];
	return NULL;
}

static void lproof_drop(struct prefetch *p, struct lproof *lp)
{
	free(lp->bits);
	*lp = p->lproofs[--p->n_lproofs];
}

static void distrust_add(struct prefetch *p, int64_t id)
{
	for (uint32_t i = 0; i < p->n_distrust; i++)
		if (p->distrust[i] == id)
			return;
	if (p->n_distrust == p->cap_distrust) {
		uint32_t nc = p->cap_distrust ? p->cap_distrust * 2 : 8;
		int64_t *nd = realloc(p->distrust, nc * sizeof(*nd));
		if (!nd)
			return;
		p->distrust = nd;
		p->cap_distrust = nc;
	}
	p->distrust[p->n_distrust++] = id;
}

static void distrust_drop(struct prefetch *p, int64_t id)
{
	for (uint32_t i = 0; i < p->n_distrust;)
		if (p->distrust[i] == id)
			p->distrust[i] = p->distrust[--p->n_distrust];
		else
			i++;
}

void local_proofs_clear(struct prefetch *p)
{
	while (p->n_lproofs)
		lproof_drop(p, &p->lproofs[0]);
	free(p->lproofs);
	p->lproofs = NULL;
	free(p->distrust);
	p->distrust = NULL;
	p->n_distrust = p->cap_distrust = 0;
}

/* A new proof record of `n` items for snapshot `id`, listed by `j` (replacing the one
 * there); false without memory. */
static bool lproof_begin(struct job *j, int64_t id, uint32_t n)
{
	struct prefetch *p = j->pf;
	struct lproof *lp = lproof_of(p, id);
	uint8_t *bits = calloc((size_t)n / 8 + 1, 1);

	if (!bits)
		return false;
	if (!lp && p->n_lproofs == LPROOFS_MAX) {
		/* the oldest record goes: nothing of its snapshot is trusted until listed again */
		struct lproof *old = &p->lproofs[0];
		for (uint32_t i = 1; i < p->n_lproofs; i++)
			if (p->lproofs[i].gen < old->gen)
				old = &p->lproofs[i];
		distrust_add(p, old->snapshot_id);
		lproof_drop(p, old);
	}
	if (!lp) {
		if (!(p->n_lproofs % 8)) {
			struct lproof *nl = realloc(p->lproofs, (p->n_lproofs + 8) * sizeof(*nl));
			if (!nl) {
				free(bits);
				return false;
			}
			p->lproofs = nl;
		}
		lp = &p->lproofs[p->n_lproofs++];
	} else {
		free(lp->bits);
	}
	lp->snapshot_id = id;
	lp->gen = ++p->lproof_gen;
	lp->n = n;
	lp->bits = bits;
	j->lj->gen = lp->gen;
	distrust_drop(p, id);
	if (p->item_hook)
		p->item_hook(p->item_hook_ctx, id, PREFETCH_RELISTED, 0, NULL);
	return true;
}

/* Snapshot `id` listed again: `put` (its items put again from a changed dataset.json) or
 * not, `n` items. Every item is proved again before it is served. */
static int relist(struct job *j, int64_t id, uint32_t n, bool put)
{
	struct prefetch *p = j->pf;
	struct lproof *lp;
	int rc;

	j->lj->n_items = n;
	if (!put && lproof_begin(j, id, n)) {
		j->lj->kept = true;
		return 0;
	}
	/* put again, or no memory for the record: every item's content forgotten now */
	rc = index_local_relist(p->d.cache->index, id, n);
	if (rc < 0)
		return rc;
	if (!lproof_begin(j, id, n)) {
		/* the rows hold nothing an earlier proof found: none is trusted wrongly */
		if ((lp = lproof_of(p, id)))
			lproof_drop(p, lp);
		distrust_drop(p, id);
		if (p->item_hook)
			p->item_hook(p->item_hook_ctx, id, PREFETCH_RELISTED, 0, NULL);
	}
	return 0;
}

void local_proved(struct job *j, int64_t idx)
{
	struct lproof *lp = lproof_of(j->pf, j->snapshot_id);

	if (lp && idx >= 0 && idx < (int64_t)lp->n)
		lp->bits[idx / 8] |= (uint8_t)(1u << (idx % 8));
}

void local_failed(struct job *j, int64_t idx)
{
	struct prefetch *p = j->pf;

	if (j->snapshot_id <= 0 || idx < 0)
		return;
	if (index_local_forget(p->d.cache->index, j->snapshot_id, idx, idx + 1) == 0) {
		j->lj->forgot = true;
		p->local_forgotten++;
	} else {
		distrust_add(p, j->snapshot_id);
	}
}

void local_relist_end(struct job *j, uint32_t state)
{
	struct local_job *lj = j->lj;
	struct prefetch *p = j->pf;
	struct index *ix = p->d.cache->index;
	struct lproof *lp;

	if (!lj || !lj->gen)
		return;
	if (lj->forgot && index_flush(ix) < 0) {
		/* a failed proof's row may still say what an earlier proof found */
		log_err(FETCH, "job %" PRIu64 ": cannot forget the items of snapshot %" PRId64
			       " it could not prove again (%s): the snapshot is not served until it "
			       "is listed again", j->id, j->snapshot_id, index_errmsg(ix));
		distrust_add(p, j->snapshot_id);
	}
	/* every item tried since the record began: each row is proved or forgotten */
	lp = lproof_of(p, j->snapshot_id);
	if (lp && lp->gen == lj->gen && state != DMC_JOB_CANCELLED && lj->tried >= lp->n)
		lproof_drop(p, lp);
	lj->gen = 0;
}

bool prefetch_item_unproved(struct prefetch *p, int64_t id, int64_t idx)
{
	const struct lproof *lp;

	for (uint32_t i = 0; i < p->n_distrust; i++)
		if (p->distrust[i] == id)
			return true;
	lp = lproof_of(p, id);
	return lp && (idx < 0 || idx >= (int64_t)lp->n || !(lp->bits[idx / 8] & (1u << (idx % 8))));
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
	rc = relist(j, j->snapshot_id, s->n, false);
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
	local_listing_free(lj->l);
	if (lj->l->n >= LOCAL_TRIM_ITEMS)
		malloc_trim(0);
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
		rc = relist(j, id, lj->l->n, false);
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
			rc = relist(j, id, lj->l->n, true);
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
	start_downloading(j); /* -> job_pump -> local_pump */
}
