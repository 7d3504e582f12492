/*
 * serve's frame-by-frame handles (DMC_OPEN_FRAMES; see serve.h): the frame map (struct
 * fmap: item k's frames are flat indices start[k] .. start[k+1]-1) and the probes that
 * learn every item's frame count at OPEN, at most PROBES_MAX at once, by reading the
 * stored bytes on the threadpool and asking the decoders for the shape. The counts of a
 * complete snapshot are then kept in the index (INDEX_PROBE_FRAMES), and the next OPEN
 * reads them in one row instead of probing again.
 * Loop thread; fprobe_read() runs on the threadpool and touches only its probe.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "conn.h"
#include "decode.h"
#include "decode_pool.h"
#include "index.h"
#include "log.h"
#include "serve_priv.h"
#include "store.h"

struct fmap *fmap_ref(struct fmap *m)
{
	if (m)
		m->refs++;
	return m;
}

void fmap_unref(struct fmap *m)
{
	if (m && --m->refs == 0)
		free(m);
}

/* The whole item and frame of flat index `i` (< start[n]). */
uint64_t fmap_find(const struct fmap *m, uint64_t i, uint32_t *ret_frame)
{
	uint64_t lo = 0, hi = m->n;

	while (hi - lo > 1) {
		uint64_t mid = lo + (hi - lo) / 2;
		if (m->start[mid] <= i)
			lo = mid;
		else
			hi = mid;
	}
	*ret_frame = (uint32_t)(i - m->start[lo]);
	return lo;
}

/* ---- what an earlier OPEN learnt, kept in the index ---- */

static int whole_cb(void *ctx, const struct index_snapshot *snap)
{
	*(bool *)ctx = snap->sealed && snap->complete;
	return 0;
}

/* Sealed, and every item stored (index.h keeps the flag without counting). */
bool snapshot_whole(struct index *ix, int64_t snapshot_id)
{
	bool whole = false;

	return index_snapshot_get(ix, snapshot_id, whole_cb, &whole) == 0 && whole;
}

/* The frame map from the counts an earlier OPEN recorded, or NULL when there are none
 * (or they do not fit this snapshot as it is). */
static struct fmap *frames_stored(struct pending_open *po)
{
	struct index *ix = po->sc->s->d.cache->index;
	struct fmap *fm = NULL;
	uint8_t *data = NULL;
	size_t len = 0;

	if (!snapshot_whole(ix, po->snapshot_id) ||
	    index_probe_get(ix, po->snapshot_id, INDEX_PROBE_FRAMES, (void **)&data, &len) < 0)
		return NULL;
	if (len == po->items * 4 &&
	    (fm = malloc(sizeof(*fm) + (po->items + 1) * sizeof(fm->start[0])))) {
		fm->refs = 1;
		fm->n = po->items;
		fm->start[0] = 0;
		for (uint64_t k = 0; k < po->items; k++) {
			const uint8_t *b = data + 4 * k;
			uint32_t c = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
				     (uint32_t)b[3] << 24;
			if (c == 0) { /* never recorded so: probe again */
				free(fm);
				fm = NULL;
				break;
			}
			fm->start[k + 1] = fm->start[k] + c;
		}
	}
	free(data);
	return fm;
}

/* Keeps the counts just probed for the next OPEN, if the snapshot is still whole. */
static void frames_record(struct pending_open *po)
{
	struct index *ix = po->sc->s->d.cache->index;
	uint8_t *data;
	int rc;

	if (!snapshot_whole(ix, po->snapshot_id) || !(data = malloc(po->items * 4 + 1)))
		return;
	for (uint64_t k = 0; k < po->items; k++) {
		uint32_t c = po->counts[k];
		data[4 * k] = (uint8_t)c;
		data[4 * k + 1] = (uint8_t)(c >> 8);
		data[4 * k + 2] = (uint8_t)(c >> 16);
		data[4 * k + 3] = (uint8_t)(c >> 24);
	}
	rc = index_probe_put(ix, po->snapshot_id, INDEX_PROBE_FRAMES, data, po->items * 4);
	if (rc == 0)
		rc = index_flush(ix);
	if (rc < 0)
		log_warn(SERVE, "cannot record the frame counts of snapshot %" PRId64 ": %s",
			 po->snapshot_id, index_errmsg(ix));
	free(data);
}

/* ---- frame-by-frame: every item's frame count, learnt by probes in the decoders ---- */

#define PROBES_MAX 4 /* probes of one OPEN at once */

struct fprobe {
	struct pending_open *po;
	uint64_t k;
	uint8_t raw[STORE_DIGEST_SIZE];
	uint64_t raw_len;
	uint8_t *in;
	int err;
	char key[STORE_HEX_SIZE + 1];
	uv_work_t work;
	struct decode_job job;
};

static void frames_fail(struct pending_open *po, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void frames_fail(struct pending_open *po, int err, const char *fmt, ...)
{
	char msg[MSG_MAX];
	va_list ap;

	if (po->failed)
		return;
	po->failed = true;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (po->sc->c)
		conn_send_error(po->sc->c, po->request_id, code_of(err), NULL, "%s", msg);
}

static void fprobe_done(struct decode_job *job)
{
	struct fprobe *fp = job->data;
	struct pending_open *po = fp->po;

	if (job->status < 0)
		frames_fail(po, job->status, "item %" PRIu64 ": %s", fp->k,
			    job->err[0] ? job->err : "cannot read its frame count");
	else if (job->desc.src_frames == 0)
		frames_fail(po, -DMC_E_DECODE_FAILED, "item %" PRIu64 " has no frames", fp->k);
	else
		po->counts[fp->k] = job->desc.src_frames;
	free(fp->in);
	free(fp);
	po->probing--;
	frames_step(po);
}

static void fprobe_read(uv_work_t *w)
{
	struct fprobe *fp = w->data;
	struct store *store = fp->po->sc->s->d.cache->store;
	uint64_t got = 0;

	fp->err = store_read(store, fp->raw, fp->in, fp->raw_len, &got);
	if (fp->err == 0 && got != fp->raw_len)
		fp->err = -DMC_E_INTEGRITY;
}

static void fprobe_read_after(uv_work_t *w, int status)
{
	struct fprobe *fp = w->data;
	struct pending_open *po = fp->po;
	int rc;

	(void)status;
	if (fp->err == 0 && !po->failed && po->sc->c) {
		memset(&fp->job, 0, sizeof(fp->job));
		fp->job.in = fp->in;
		fp->job.in_len = fp->raw_len;
		fp->job.probe_only = true;
		fp->job.data = fp;
		store_digest_hex(fp->raw, fp->key);
		fp->job.resource = fp->key;
		rc = decode_pool_submit(po->sc->s->d.pool, &fp->job, fprobe_done);
		if (rc == 0)
			return;
		fp->err = rc;
	}
	if (fp->err)
		frames_fail(po, fp->err, "item %" PRIu64 ": the cached copy is damaged or gone: "
			    "prefetch the dataset again", fp->k);
	free(fp->in);
	free(fp);
	po->probing--;
	frames_step(po);
}

/* Starts probes while few are running; answers the OPEN when every count is in. */
void frames_step(struct pending_open *po)
{
	struct sconn *sc = po->sc;
	struct index *ix = sc->s->d.cache->index;

	if (!po->counts && !po->failed && sc->c && po->next_item == 0) {
		struct fmap *fm = frames_stored(po);
		if (fm) {
			sc->s->open_stored_hits++;
			open_reply(po, po->snapshot_id, fm->start[po->items], po->project_id,
				   po->project_name, po->version, fm, NULL);
			return;
		}
	}
	if (!po->counts && !po->failed) {
		po->counts = calloc(po->items ? po->items : 1, sizeof(*po->counts));
		if (!po->counts)
			frames_fail(po, -ENOMEM, "out of memory");
	}
	while (!po->failed && sc->c && po->next_item < po->items && po->probing < PROBES_MAX) {
		uint64_t k = po->next_item++;
		struct lookup l = { 0 };
		struct index_blob b;
		struct fprobe *fp;

		if (index_item_get(ix, po->snapshot_id, (int64_t)k, on_item_row, &l) < 0 ||
		    !l.found || !l.stored || index_blob_get(ix, l.blob, &b) != 0) {
			free(l.record);
			frames_fail(po, -DMC_E_NOT_FOUND_OR_DENIED,
				    "item %" PRIu64 " is not in the cache: frame-by-frame reading needs "
				    "every item stored; prefetch the dataset again", k);
			break;
		}
		free(l.record);
		fp = calloc(1, sizeof(*fp));
		if (fp)
			fp->in = malloc(b.raw_size ? (size_t)b.raw_size : 1);
		if (!fp || !fp->in) {
			if (fp)
				free(fp);
			frames_fail(po, -ENOMEM, "out of memory");
			break;
		}
		fp->po = po;
		fp->k = k;
		memcpy(fp->raw, l.blob, STORE_DIGEST_SIZE);
		fp->raw_len = (uint64_t)b.raw_size;
		fp->work.data = fp;
		po->probing++;
		sc->s->frame_probes++;
		if (uv_queue_work(sc->s->d.loop, &fp->work, fprobe_read, fprobe_read_after) != 0) {
			po->probing--;
			free(fp->in);
			free(fp);
			frames_fail(po, -ENOMEM, "cannot queue a read");
			break;
		}
	}
	if (po->probing)
		return;
	if (!po->failed && sc->c) {
		struct fmap *fm = malloc(sizeof(*fm) + (po->items + 1) * sizeof(fm->start[0]));
		if (fm) {
			fm->refs = 1;
			fm->n = po->items;
			fm->start[0] = 0;
			for (uint64_t k = 0; k < po->items; k++)
				fm->start[k + 1] = fm->start[k] + po->counts[k];
			frames_record(po);
			open_reply(po, po->snapshot_id, fm->start[po->items], po->project_id,
				   po->project_name, po->version, fm, NULL);
			return;
		} else {
			frames_fail(po, -ENOMEM, "out of memory");
		}
	}
	open_done(po);
}
