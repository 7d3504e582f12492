/*
 * serve's mask handles (DMC_OPEN_MASKS; see serve.h): the dataset's label set learnt at
 * OPEN from the records' segmentation annotations (struct lset; kept in the index for the
 * next OPEN of the snapshot, INDEX_PROBE_LABELS), the making of a mask
 * item (each mask read, decoded in a worker and painted into a uint8 label map aligned
 * with its image), and, with DMC_OPEN_RAW, the stored mask files gathered back to back.
 * Loop thread; stored bytes are read on the threadpool (serve_request.c's read).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cache.h"
#include "conf.h"
#include "decode.h"
#include "decode_pool.h"
#include "index.h"
#include "log.h"
#include "serve_priv.h"
#include "store.h"

void lset_unref(struct lset *l)
{
	if (!l || --l->refs)
		return;
	for (uint32_t i = 0; i < l->n; i++)
		free(l->names[i]);
	free(l->json);
	free(l);
}

/* ---- segmentation masks: one label map per item, aligned with its image ---- */

/* The segmentation annotations of a resource record: calls `fn` for each. */
struct seg_ann {
	const char *identifier;
	const char *key;   /* its id: the key of mask_blobs */
	const char *blob;  /* hex digest, or NULL when the mask is not stored */
	int64_t frame;     /* frame_index, or -1 for the whole image */
	int64_t value;     /* the label value inside a label-map file, or -1: any nonzero */
};

static int record_segs(json_t *rec, int (*fn)(void *ctx, const struct seg_ann *a), void *ctx)
{
	json_t *anns = json_object_get(rec, "annotations"), *blobs = json_object_get(rec, "mask_blobs");
	size_t i;
	json_t *a;
	int rc;

	if (!json_is_array(anns))
		return 0;
	json_array_foreach(anns, i, a) {
		json_t *t = json_object_get(a, "annotation_type"), *v;
		struct seg_ann sa = { .frame = -1, .value = -1 };
		if (!json_is_string(t))
			t = json_object_get(a, "type");
		if (!json_is_string(t) || strcmp(json_string_value(t), "segmentation") != 0)
			continue;
		v = json_object_get(a, "identifier");
		if (!json_is_string(v))
			v = json_object_get(a, "name");
		if (!json_is_string(v))
			continue;
		sa.identifier = json_string_value(v);
		v = json_object_get(a, "id");
		sa.key = json_is_string(v) ? json_string_value(v) : "";
		v = json_object_get(blobs, sa.key);
		sa.blob = json_is_string(v) ? json_string_value(v) : NULL;
		v = json_object_get(a, "frame_index");
		if (!v || json_is_null(v))
			v = json_object_get(a, "index");
		if (json_is_integer(v) && json_integer_value(v) >= 0)
			sa.frame = json_integer_value(v);
		v = json_object_get(a, "values");
		if (json_is_integer(v) && json_integer_value(v) >= 0)
			sa.value = json_integer_value(v);
		if ((rc = fn(ctx, &sa)) != 0)
			return rc;
	}
	return 0;
}

struct name_set {
	char **names;
	uint32_t n, cap;
};

static int collect_name(void *ctx, const struct seg_ann *a)
{
	struct name_set *ns = ctx;

	for (uint32_t i = 0; i < ns->n; i++)
		if (strcmp(ns->names[i], a->identifier) == 0)
			return 0;
	if (ns->n == MASK_LABELS_MAX)
		return -DMC_E_LIMIT_EXCEEDED;
	if (ns->n == ns->cap) {
		uint32_t nc = ns->cap ? ns->cap * 2 : 16;
		char **nn = realloc(ns->names, nc * sizeof(*nn));
		if (!nn)
			return -ENOMEM;
		ns->names = nn;
		ns->cap = nc;
	}
	if (!(ns->names[ns->n] = strdup(a->identifier)))
		return -ENOMEM;
	ns->n++;
	return 0;
}

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The label names an earlier OPEN recorded for this snapshot as it is (a JSON array), into
 * `ns`: 0, or -ENOENT when there are none to trust. */
static int labels_stored(struct index *ix, int64_t snapshot_id, struct name_set *ns)
{
	struct seg_ann a = { 0 };
	char *data = NULL;
	size_t len = 0, i;
	json_t *arr, *v;
	int rc = 0;

	if (!snapshot_whole(ix, snapshot_id) ||
	    index_probe_get(ix, snapshot_id, INDEX_PROBE_LABELS, (void **)&data, &len) < 0)
		return -ENOENT;
	arr = json_loadb(data, len, 0, NULL);
	free(data);
	if (!json_is_array(arr)) {
		json_decref(arr);
		return -ENOENT;
	}
	json_array_foreach(arr, i, v) {
		if (!json_is_string(v)) {
			rc = -ENOENT;
			break;
		}
		a.identifier = json_string_value(v);
		if ((rc = collect_name(ns, &a)) < 0)
			break;
	}
	json_decref(arr);
	if (rc < 0) {
		for (uint32_t k = 0; k < ns->n; k++)
			free(ns->names[k]);
		free(ns->names);
		memset(ns, 0, sizeof(*ns));
	}
	return rc;
}

/* The sorted segmentation label names of every item of the snapshot: recorded by an
 * earlier OPEN of the snapshot as it is, or read from every item's record (and then
 * recorded). */
int masks_labels(struct pending_open *po, struct lset **ret, uint64_t *ret_bad)
{
	struct index *ix = po->sc->s->d.cache->index;
	struct name_set ns = { 0 };
	struct lset *l = NULL;
	json_t *arr = NULL;
	bool stored = labels_stored(ix, po->snapshot_id, &ns) == 0;
	int rc = 0;

	if (stored)
		po->sc->s->open_stored_hits++;
	for (uint64_t k = 0; !stored && k < po->items && rc == 0; k++) {
		struct lookup lk = { 0 };
		json_t *rec;
		po->sc->s->label_reads++;
		if (index_item_get(ix, po->snapshot_id, (int64_t)k, on_item_row, &lk) < 0 ||
		    !lk.found || !lk.stored) {
			free(lk.record);
			*ret_bad = k;
			rc = -DMC_E_NOT_FOUND_OR_DENIED;
			break;
		}
		rec = json_loads(lk.record, 0, NULL);
		free(lk.record);
		if (rec)
			rc = record_segs(rec, collect_name, &ns);
		json_decref(rec);
	}
	if (rc == 0) {
		qsort(ns.names, ns.n, sizeof(*ns.names), cmp_names);
		l = calloc(1, sizeof(*l) + (size_t)ns.n * sizeof(l->names[0]));
		arr = json_array();
		if (!l || !arr)
			rc = -ENOMEM;
	}
	for (uint32_t i = 0; rc == 0 && i < ns.n; i++)
		if (json_array_append_new(arr, json_string(ns.names[i])) != 0)
			rc = -ENOMEM;
	if (rc == 0) {
		char *t = json_dumps(arr, JSON_COMPACT);
		size_t n = t ? strlen(t) + 12 : 0;
		l->json = t ? malloc(n) : NULL;
		if (l->json)
			snprintf(l->json, n, ",\"labels\":%s", t);
		else
			rc = -ENOMEM;
		if (rc == 0 && !stored && snapshot_whole(ix, po->snapshot_id) &&
		    (index_probe_put(ix, po->snapshot_id, INDEX_PROBE_LABELS, t, strlen(t)) < 0 ||
		     index_flush(ix) < 0))
			log_warn(SERVE, "cannot record the labels of snapshot %" PRId64 ": %s",
				 po->snapshot_id, index_errmsg(ix));
		free(t);
	}
	json_decref(arr);
	if (rc == 0) {
		l->refs = 1;
		l->n = ns.n;
		for (uint32_t i = 0; i < ns.n; i++)
			l->names[i] = ns.names[i];
		free(ns.names);
		*ret = l;
		return 0;
	}
	for (uint32_t i = 0; i < ns.n; i++)
		free(ns.names[i]);
	free(ns.names);
	if (l) {
		free(l->json);
		free(l);
	}
	return rc;
}

/*
 * A mask item: the image is probed for its shape (F, H, W); then each segmentation mask of
 * the record is read, decoded in a worker, and painted into a uint8 (F, 1, H, W) label map
 * with its label's code: a frame-scoped mask on its frame, an image-scoped one on every
 * frame (frame for frame when it has as many, else its single frame on all). A mask of
 * another size is resampled to the image's by nearest neighbour. Pixels are the label
 * where the mask is nonzero, or where it equals the annotation's "values" for label-map
 * files; later annotations paint over earlier ones.
 */
struct mask_seg {
	uint8_t digest[STORE_DIGEST_SIZE];
	int64_t frame, value;
	uint8_t code;
};

struct mask_work {
	struct mask_seg *segs;
	uint32_t n, cap, cur;
	uint32_t frames, height, width;
	uint8_t *out;
	char why[MSG_MAX];
};

void mask_work_free(struct gitem *gi)
{
	if (!gi->mw)
		return;
	free(gi->mw->segs);
	free(gi->mw->out);
	free(gi->mw);
	gi->mw = NULL;
}

struct seg_collect {
	struct mask_work *mw;
	const struct lset *labels;
	int err;
};

static int collect_seg(void *ctx, const struct seg_ann *a)
{
	struct seg_collect *sc = ctx;
	struct mask_work *mw = sc->mw;
	struct mask_seg *m;
	uint32_t code = 0;

	for (uint32_t i = 0; i < sc->labels->n; i++)
		if (strcmp(sc->labels->names[i], a->identifier) == 0)
			code = i + 1;
	if (!code)
		return 0; /* not in the set the OPEN saw: a record cannot change in a snapshot */
	if (!a->blob || strlen(a->blob) != 2 * STORE_DIGEST_SIZE) {
		snprintf(mw->why, sizeof(mw->why), "the mask of annotation '%s' (%s) is not stored",
			 a->key, a->identifier);
		return -DMC_E_NOT_FOUND_OR_DENIED;
	}
	if (mw->n == mw->cap) {
		uint32_t nc = mw->cap ? mw->cap * 2 : 4;
		struct mask_seg *ns = realloc(mw->segs, nc * sizeof(*ns));
		if (!ns)
			return -ENOMEM;
		mw->segs = ns;
		mw->cap = nc;
	}
	m = &mw->segs[mw->n];
	for (unsigned i = 0; i < STORE_DIGEST_SIZE; i++) {
		unsigned v;
		if (sscanf(a->blob + 2 * i, "%2x", &v) != 1) {
			snprintf(mw->why, sizeof(mw->why), "annotation '%s': a bad mask digest", a->key);
			return -DMC_E_INTEGRITY;
		}
		m->digest[i] = (uint8_t)v;
	}
	m->frame = a->frame;
	m->value = a->value;
	m->code = (uint8_t)code;
	mw->n++;
	return 0;
}

static double tensor_value(const void *p, enum decode_dtype t, uint64_t i)
{
	switch (t) {
	case DECODE_DTYPE_U8: return ((const uint8_t *)p)[i];
	case DECODE_DTYPE_I8: return ((const int8_t *)p)[i];
	case DECODE_DTYPE_U16: return ((const uint16_t *)p)[i];
	case DECODE_DTYPE_I16: return ((const int16_t *)p)[i];
	case DECODE_DTYPE_U32: return ((const uint32_t *)p)[i];
	case DECODE_DTYPE_I32: return ((const int32_t *)p)[i];
	case DECODE_DTYPE_U64: return (double)((const uint64_t *)p)[i];
	case DECODE_DTYPE_I64: return (double)((const int64_t *)p)[i];
	case DECODE_DTYPE_F32: return ((const float *)p)[i];
	case DECODE_DTYPE_F64: return ((const double *)p)[i];
	default: return 0;
	}
}

/* Paints one decoded mask into the label map; -DMC_E_DECODE_FAILED when it cannot fit. */
static int mask_paint(struct mask_work *mw, const struct mask_seg *m, const void *px,
		      const struct decode_desc *d)
{
	uint64_t plane = (uint64_t)d->height * d->width, chans = d->channels;

	if (!d->frames || !d->height || !d->width)
		return -DMC_E_DECODE_FAILED;
	if (m->frame >= (int64_t)mw->frames) {
		snprintf(mw->why, sizeof(mw->why), "a mask of frame %" PRId64 " for an image of %u "
			 "frames", m->frame, mw->frames);
		return -DMC_E_DECODE_FAILED;
	}
	if (m->frame < 0 && d->frames != 1 && d->frames != mw->frames) {
		snprintf(mw->why, sizeof(mw->why), "a mask of %u frames for an image of %u",
			 d->frames, mw->frames);
		return -DMC_E_DECODE_FAILED;
	}
	for (uint32_t f = 0; f < mw->frames; f++) {
		uint64_t sf;
		if (m->frame >= 0 && f != (uint64_t)m->frame)
			continue;
		sf = m->frame >= 0 || d->frames == 1 ? 0 : f;
		for (uint32_t y = 0; y < mw->height; y++) {
			uint64_t sy = (uint64_t)y * d->height / mw->height;
			uint8_t *row = mw->out + ((uint64_t)f * mw->height + y) * mw->width;
			for (uint32_t x = 0; x < mw->width; x++) {
				uint64_t sx = (uint64_t)x * d->width / mw->width;
				/* channel 0: gray, or R of the client's white-on-black RGB masks */
				double v = tensor_value(px, d->dtype, sf * chans * plane + sy * d->width + sx);
				if (m->value >= 0 ? v == (double)m->value : v != 0)
					row[x] = m->code;
			}
		}
	}
	return 0;
}

static void mask_next(struct gitem *gi);

static void mask_fail(struct gitem *gi, int err, const char *what)
{
	char msg[MSG_MAX];

	snprintf(msg, sizeof(msg), "%s", gi->mw && gi->mw->why[0] ? gi->mw->why : what);
	free(gi->in);
	gi->in = NULL;
	mask_work_free(gi);
	item_fail(gi, err, msg);
}

static void on_mask_decoded(struct decode_job *job)
{
	struct gitem *gi = job->data;
	struct sconn *sc = gi->rq->sc;
	int rc;

	sc->busy--;
	sc->decoding--;
	free(gi->in);
	gi->in = NULL;
	if (!sc->c) {
		mask_work_free(gi);
		abandon(gi);
		return;
	}
	if (job->status < 0) {
		mask_fail(gi, job->status, job->err[0] ? job->err : "cannot decode a mask");
		return;
	}
	if (!gi->mw->out) {
		/* the image's probe: the label map takes its shape */
		struct mask_work *mw = gi->mw;
		uint64_t n;
		mw->frames = job->desc.frames;
		mw->height = job->desc.height;
		mw->width = job->desc.width;
		n = (uint64_t)mw->frames * mw->height * mw->width;
		if (n == 0 || n > sc->s->d.cfg->max_decode_bytes) {
			mask_fail(gi, -DMC_E_LIMIT_EXCEEDED, "the image is too large for a label map");
			return;
		}
		mw->out = calloc(1, n + 5);
		if (!mw->out) {
			mask_fail(gi, -ENOMEM, "out of memory");
			return;
		}
		mask_next(gi);
		return;
	}
	rc = mask_paint(gi->mw, &gi->mw->segs[gi->mw->cur], job->out, &job->desc);
	if (rc < 0) {
		mask_fail(gi, rc, "a mask does not fit its image");
		return;
	}
	gi->mw->cur++;
	mask_next(gi);
}

/* The image was read (gi->in) or a mask was (gi->in, with mw->cur): decode it. */
static void mask_read_after(uv_work_t *w, int status)
{
	struct gitem *gi = w->data;
	struct sconn *sc = gi->rq->sc;
	bool image = gi->mw->out == NULL;
	int rc;

	(void)status;
	sc->busy--;
	if (!sc->c) {
		free(gi->in);
		gi->in = NULL;
		mask_work_free(gi);
		abandon(gi);
		return;
	}
	if (gi->work_err < 0) {
		mask_fail(gi, gi->work_err, "a cached copy is damaged or gone: prefetch the dataset "
			  "again");
		return;
	}
	memset(&gi->job, 0, sizeof(gi->job));
	gi->job.in = gi->in;
	gi->job.in_len = gi->rd_len;
	gi->job.probe_only = image; /* the image: only its shape */
	gi->job.data = gi;
	store_digest_hex(gi->rd_digest, gi->key);
	gi->job.resource = gi->key;
	sc->busy++;
	sc->decoding++;
	rc = decode_pool_submit(sc->s->d.pool, &gi->job, on_mask_decoded);
	if (rc < 0) {
		sc->busy--;
		sc->decoding--;
		mask_fail(gi, rc, gi->job.err[0] ? gi->job.err : "cannot decode");
	}
}

/* Reads and decodes the next mask, or hands over the finished label map. */
static void mask_next(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	struct mask_work *mw = gi->mw;
	struct index_blob b;

	if (mw->cur == mw->n) {
		gi->desc = (struct decode_desc){ .format = DECODE_FORMAT_PNG,
						 .codec = DECODE_CODEC_NONE,
						 .src_dtype = DECODE_DTYPE_U8,
						 .dtype = DECODE_DTYPE_U8,
						 .frames = mw->frames, .channels = 1,
						 .height = mw->height, .width = mw->width,
						 .src_frames = mw->frames };
		gi->nbytes = (uint64_t)mw->frames * mw->height * mw->width;
		gi->desc.nbytes = gi->nbytes;
		gi->hold = mw->out; /* + "null": no header of its own */
		memcpy(gi->hold + gi->nbytes, "null", 4);
		gi->dlen = 4;
		mw->out = NULL;
		mask_work_free(gi);
		item_got_bytes(gi);
		return;
	}
	if (index_blob_get(sc->s->d.cache->index, mw->segs[mw->cur].digest, &b) != 0) {
		mask_fail(gi, -DMC_E_NOT_FOUND_OR_DENIED, "a mask is not in the cache: prefetch the "
			  "dataset again");
		return;
	}
	if (start_read(gi, mw->segs[mw->cur].digest, (uint64_t)b.raw_size, mask_read_after) < 0)
		mask_fail(gi, -ENOMEM, "cannot start a read");
}

/* Starts a mask item: its segmentations from the record, then the image's shape. */
void mask_start(struct gitem *gi)
{
	struct seg_collect c = { 0 };
	json_t *rec;
	int rc;

	gi->mw = calloc(1, sizeof(*gi->mw));
	if (!gi->mw) {
		item_fail(gi, -ENOMEM, "out of memory");
		return;
	}
	c.mw = gi->mw;
	c.labels = gi->rq->h.labels;
	rec = json_loads(gi->record, 0, NULL);
	rc = rec ? record_segs(rec, collect_seg, &c) : 0;
	json_decref(rec);
	if (rc < 0) {
		mask_fail(gi, rc, "cannot read the item's segmentations");
		return;
	}
	if (start_read(gi, gi->raw, gi->raw_len, mask_read_after) < 0)
		mask_fail(gi, -ENOMEM, "cannot start the read");
}

/*
 * RAW | MASKS: item i is the segmentation files the daemon stored for item i (those its
 * record's mask_blobs name), back to back in the order of the record's annotations, uint8
 * (1, 1, 1, bytes). What follows the bytes in `hold` (the "dicom" slot of meta_write) is
 * `null,"files":[{"id": <annotation id>, "bytes": n}, ...]`, so the metadata reads
 * {"resource": ..., "dicom": null, "files": [...]}: where each file starts and ends.
 */
struct rawm_part {
	uint8_t digest[STORE_DIGEST_SIZE];
	uint64_t len;
};

struct rawm {
	struct rawm_part *parts;
	uint32_t n, cap, cur;
	json_t *files; /* [{"id", "bytes"}] */
	uint8_t *out;
	uint64_t total, at;
	char why[MSG_MAX];
};

void rawm_free(struct gitem *gi)
{
	if (!gi->rm)
		return;
	free(gi->rm->parts);
	json_decref(gi->rm->files);
	free(gi->rm->out);
	free(gi->rm);
	gi->rm = NULL;
}

struct rawm_collect {
	struct rawm *rm;
	struct index *ix;
};

static int rawm_collect(void *ctx, const struct seg_ann *a)
{
	struct rawm_collect *c = ctx;
	struct rawm *rm = c->rm;
	struct index_blob b;
	json_t *f;

	if (!a->blob)
		return 0; /* no file of its own (or not a mask the daemon keeps) */
	if (rm->n == rm->cap) {
		uint32_t nc = rm->cap ? rm->cap * 2 : 4;
		struct rawm_part *np = realloc(rm->parts, nc * sizeof(*np));
		if (!np)
			return -ENOMEM;
		rm->parts = np;
		rm->cap = nc;
	}
	if (store_digest_parse(a->blob, strlen(a->blob), rm->parts[rm->n].digest) < 0) {
		snprintf(rm->why, sizeof(rm->why), "annotation '%s': a bad mask digest", a->key);
		return -DMC_E_INTEGRITY;
	}
	if (index_blob_get(c->ix, rm->parts[rm->n].digest, &b) != 0) {
		snprintf(rm->why, sizeof(rm->why), "the mask of annotation '%s' is not in the cache: "
			 "prefetch the dataset again", a->key);
		return -DMC_E_NOT_FOUND_OR_DENIED;
	}
	rm->parts[rm->n].len = (uint64_t)b.raw_size;
	f = json_pack("{s:s, s:I}", "id", a->key, "bytes", (json_int_t)b.raw_size);
	if (!f || json_array_append_new(rm->files, f) < 0)
		return -ENOMEM;
	rm->total += (uint64_t)b.raw_size;
	rm->n++;
	return 0;
}

static void rawm_fail(struct gitem *gi, int err, const char *what)
{
	char msg[MSG_MAX];

	snprintf(msg, sizeof(msg), "%s", gi->rm && gi->rm->why[0] ? gi->rm->why : what);
	free(gi->in);
	gi->in = NULL;
	rawm_free(gi);
	item_fail(gi, err, msg);
}

static void rawm_next(struct gitem *gi);

static void rawm_read_after(uv_work_t *w, int status)
{
	struct gitem *gi = w->data;
	struct sconn *sc = gi->rq->sc;
	struct rawm *rm = gi->rm;

	(void)status;
	sc->busy--;
	if (!sc->c) {
		free(gi->in);
		gi->in = NULL;
		rawm_free(gi);
		abandon(gi);
		return;
	}
	if (gi->work_err < 0) {
		rawm_fail(gi, gi->work_err, "a cached mask is damaged or gone: prefetch the dataset "
			  "again");
		return;
	}
	memcpy(rm->out + rm->at, gi->in, rm->parts[rm->cur].len);
	rm->at += rm->parts[rm->cur].len;
	free(gi->in);
	gi->in = NULL;
	rm->cur++;
	rawm_next(gi);
}

static void rawm_next(struct gitem *gi)
{
	static const char key[] = "null,\"files\":";
	const size_t klen = sizeof(key) - 1;
	struct rawm *rm = gi->rm;
	char *files;
	size_t flen;

	if (rm->cur < rm->n) {
		if (start_read(gi, rm->parts[rm->cur].digest, rm->parts[rm->cur].len,
			       rawm_read_after) < 0)
			rawm_fail(gi, -ENOMEM, "cannot start a read");
		return;
	}
	files = json_dumps(rm->files, JSON_COMPACT);
	flen = files ? strlen(files) : 0;
	if (!files || !(gi->hold = malloc(rm->total + klen + flen + 1))) {
		free(files);
		rawm_fail(gi, -ENOMEM, "out of memory");
		return;
	}
	memcpy(gi->hold, rm->out, rm->total);
	memcpy(gi->hold + rm->total, key, klen);
	memcpy(gi->hold + rm->total + klen, files, flen);
	free(files);
	gi->dlen = klen + flen;
	gi->nbytes = rm->total;
	gi->desc = (struct decode_desc){ .codec = DECODE_CODEC_NONE,
					 .src_dtype = DECODE_DTYPE_U8, .dtype = DECODE_DTYPE_U8,
					 .frames = 1, .channels = 1, .height = 1,
					 .width = (uint32_t)rm->total, .src_frames = 1,
					 .nbytes = rm->total };
	rawm_free(gi);
	item_got_bytes(gi);
}

void rawm_start(struct gitem *gi)
{
	struct rawm_collect c;
	json_t *rec;
	int rc;

	gi->rm = calloc(1, sizeof(*gi->rm));
	if (!gi->rm || !(gi->rm->files = json_array())) {
		rawm_fail(gi, -ENOMEM, "out of memory");
		return;
	}
	c.rm = gi->rm;
	c.ix = gi->rq->sc->s->d.cache->index;
	rec = json_loads(gi->record, 0, NULL);
	rc = rec ? record_segs(rec, rawm_collect, &c) : 0;
	json_decref(rec);
	if (rc == 0 && gi->rm->total > UINT32_MAX) {
		rc = -DMC_E_LIMIT_EXCEEDED;
		snprintf(gi->rm->why, sizeof(gi->rm->why), "the masks are larger than 4 GiB");
	}
	if (rc == 0 && !(gi->rm->out = malloc(gi->rm->total ? gi->rm->total : 1)))
		rc = -ENOMEM;
	if (rc < 0) {
		rawm_fail(gi, rc, "cannot read the item's segmentations");
		return;
	}
	rawm_next(gi);
}
