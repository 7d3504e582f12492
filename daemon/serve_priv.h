/*
 * serve's private declarations: the state the parts of serve (serve.c, serve_arena.c,
 * serve_frames.c, serve_masks.c, serve_request.c, serve_stream.c, serve_region.c) share, and the functions
 * one part calls in another. Not for the rest of the daemon: its interface is serve.h.
 * Everything here belongs to the loop thread; threadpool works touch only what their
 * own work structure hands them.
 */
#ifndef DMC_SERVE_PRIV_H
#define DMC_SERVE_PRIV_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include <jansson.h>

#include "arena.h"
#include "decode.h"
#include "decode_pool.h"
#include "hot.h"
#include "policy.h"
#include "prefetch.h"
#include "proto.h"
#include "region.h"
#include "serve.h"
#include "store.h"

struct index_item;
struct secret;

#define REPLY_MAX (DMC_HEADER_SIZE + DMC_FRAME_MAX)
#define MSG_MAX 400
/* Items of one connection being read, decoded or held for arena space at once: what bounds
 * the daemon's memory for a client, whatever it asks for in one GET. */
#define INFLIGHT_MAX 8
#define JOB_FAILED_MAX 32 /* struct serve's job_failed[] */

struct greq;
struct mask_work;
struct rawm;
struct refetch;
struct sconn;
struct share;
struct stream;

enum gi_state {
	GI_NEW,
	GI_WAIT_ITEM,  /* a job is downloading it */
	GI_BUSY,       /* reading or decoding */
	GI_WAIT_SPACE, /* decoded into `hold`, waiting for arena space */
	GI_DONE,
};

struct gitem {
	struct greq *rq;
	uint64_t index;
	uint64_t item;  /* the whole item: index, or its item when frame by frame */
	int64_t frame;  /* the frame of a frame-by-frame handle, else -1 */
	enum gi_state state;
	uint32_t status;
	char msg[MSG_MAX];

	/* from the index */
	uint8_t raw[STORE_DIGEST_SIZE];
	uint64_t raw_len;
	char *record; /* the resource record JSON */

	/* work */
	uv_work_t work;
	int work_err;
	uint8_t *in;   /* the stored bytes, for the decoder */
	const uint8_t *rd_digest; /* what read_work reads into `in`: rd_len bytes */
	uint64_t rd_len;
	struct decode_job job;
	char key[STORE_HEX_SIZE + 1]; /* the decoder's quarantine key: the content's digest */
	uint8_t *hold; /* tensor + header JSON (dlen bytes), when not in the hot set */
	uint64_t dlen;
	struct hot_entry *he; /* or the bytes are there: referenced */
	bool from_cache;
	bool counted;  /* in sc->inflight */
	uint8_t tensor_digest[STORE_DIGEST_SIZE];
	bool has_meta_blob;
	uint8_t meta_digest[STORE_DIGEST_SIZE];

	struct mask_work *mw; /* a mask item in the making (DMC_OPEN_MASKS) */
	struct rawm *rm;      /* the stored mask files being gathered (RAW | MASKS) */
	struct refetch *rf;   /* waiting for a re-fetch's job to list (GI_WAIT_ITEM) */
	bool refetched;       /* its blob was found bad once: fetched again, not twice */

	/* the result */
	struct decode_desc desc;
	uint64_t off, nbytes, moff, mlen;
	bool in_region; /* off is in the handle's region, not in the arena */
	struct rentry *re; /* a STREAM item's tensor pinned in the region while its batch is
			    * laid out (serve_stream.c); then the connection's pin (sc->pins) */
};

/* Frame-by-frame: item k's frames are the items start[k] .. start[k+1]-1. Shared by a
 * handle and the requests that copied it. */
struct fmap {
	unsigned refs;
	uint64_t n;        /* whole items */
	uint64_t start[];  /* n + 1 entries */
};

/* Segmentation masks: the dataset's label names, sorted; label k is code k + 1. */
struct lset {
	unsigned refs;
	uint32_t n;
	char *json;    /* ,"labels":[...] : added to every mask item's metadata */
	char *names[];
};

/*
 * Where an OPEN's dataset comes from, and the key it was opened with: what a re-fetch of an
 * item found bad on read needs (reliability.md C5). The key is held in a struct secret
 * (locked, not dumped) for as long as the handle is open and a request copying it runs,
 * and no longer: CLOSE, or the connection's end, wipes it. Remote (Datamint) OPENs only:
 * a local folder is read through the client's descriptors, which the daemon does not keep.
 */
struct origin {
	unsigned refs;
	char *project, *version, *server;
	struct secret *key;
};

struct handle {
	uint64_t id;
	int64_t snapshot_id;
	uint64_t items;
	uint32_t flags, dtype;
	struct dmc_policy pol; /* with DMC_OPEN_POLICY, else zero (policy.h) */
	struct fmap *frames;  /* with DMC_OPEN_FRAMES */
	struct lset *labels;  /* with DMC_OPEN_MASKS */
	struct origin *origin; /* NULL: nothing is fetched again (local, offline) */
	struct region *rg;     /* with DMC_OPEN_REGIONS: the snapshot's region, or NULL */
	struct handle *next;
};

struct greq {
	struct sconn *sc;
	uint32_t request_id;
	uint64_t placed; /* arena bytes its items hold: not the client's to release yet */
	unsigned pins;  /* loops stepping its items: freed only when none is left */
	bool replied;
	struct stream *st; /* a batch of a STREAM, or NULL for a GET */
	uint64_t batch_no;
	bool ready; /* a STREAM batch whose items are all done, waiting to be sent */
	struct handle h; /* a copy: CLOSE may come while the request runs */
	uint32_t n, done;
	uint64_t arrived_ns; /* uv_hrtime() when the GET came (metrics.h) */
	struct greq *next;
	struct gitem items[];
};

struct pending_open {
	struct sconn *sc;
	uint32_t request_id;
	uint32_t flags, dtype;
	struct dmc_policy pol;
	uint64_t arena_bytes;
	/* frame-by-frame: the snapshot once listed, and its frame counts being learnt */
	bool listed, waiting_job;
	int64_t snapshot_id;
	uint64_t items;
	char *project_id, *project_name, *version;
	uint32_t *counts;
	struct fmap *fm;
	struct lset *labels;
	struct origin *origin;
	uint64_t next_item;
	unsigned probing;
	bool failed;
	uint64_t arrived_ns; /* uv_hrtime() when the OPEN came (metrics.h) */
	struct pending_open *next;
};

struct sconn {
	struct serve *s;
	struct conn *c; /* NULL once the connection closed */
	struct arena arena;
	bool has_arena;
	struct handle *handles;
	uint64_t next_handle;
	struct greq *reqs;
	struct pending_open *opens;
	struct stream *streams;
	struct refetch *refetches; /* re-fetches whose jobs have not listed yet */
	uint8_t *frame; /* replies are built here: allocated once, not per batch */
	bool arena_sent;
	struct share *sh;  /* its uid's shares */
	uint64_t shm;      /* bytes of its arena counted in sh->shm and the total */
	bool growing;      /* a grow_work runs */
	bool grow_wanted;  /* waits for its uid's growth to end, to grow in turn */
	int grow_err;      /* the last growth failed: no more */
	unsigned busy; /* works and decode jobs in flight */
	unsigned decoding;
	unsigned inflight; /* items reading, decoding or holding bytes: at most INFLIGHT_MAX */
	bool pumping;
	bool yielding;       /* a pump_items() continues after the loop's other work */
	uint64_t pump_bytes; /* placed by the running pump_items() */
	/* regions (serve_region.c): the ids of those passed to the client, and the tensors it
	 * holds in them, by the arena offset of their metadata (what it releases) */
	uint64_t *rg_sent;
	uint32_t n_rg_sent, cap_rg_sent;
	struct rpin {
		uint64_t moff;
		struct rentry *e;
	} *pins;
	uint32_t n_pins, cap_pins;
	struct sconn *next, *prev;
};

/*
 * What one uid holds over all its connections (fair shares; the caps: docs/operations.md).
 *
 * Shared memory counts the bytes committed in its arenas (faulted in by the daemon, or
 * being faulted in), not their reserved sizes: committed bytes are what takes memory from
 * other users, and a reserved but untouched arena costs nothing (its memfd is sparse).
 * Each arena's reserved size is clamped to shm_max_per_uid, so that one arena alone never
 * promises more than its uid may commit. Pages a client faults in itself by reading holes
 * of its own mapping are not counted: they are charged to that client's memory (cgroup,
 * RSS, OOM score), like any memory it allocates.
 */
struct share {
	uid_t uid;
	unsigned refs;     /* connections and arena drops pointing here */
	uint64_t shm;      /* bytes committed in its arenas (shm_max_per_uid) */
	unsigned inflight; /* items read, decoded or held (decode_max_per_uid) */
	bool starved;      /* a connection of it waits for an inflight place */
	bool growing;      /* one of its arenas is being faulted in */
	struct share *next;
};

struct serve {
	struct serve_deps d;
	struct sconn *conns;
	struct share *shares;
	uint64_t shm_total;    /* bytes committed in all arenas (shm_max) */
	uint64_t shm_refusals; /* OPENs and items refused by a cap */
	bool closing; /* serve_free() ran: freed with its last connection state */
	unsigned stores; /* tensor stores in flight on the threadpool */
	uint64_t gets, items_served, items_decoded, items_from_tensor_cache, items_failed;
	uint64_t bytes_served, tensors_stored;
	uint64_t hot_ahead; /* tensors decoded ahead that went into the hot set */
	uint64_t waits_for_space;
	uint64_t streams, batches_sent;
	uint64_t stream_items_in_place; /* STREAM items handed in a region (no copy) */
	/* blobs found bad (damaged, gone, unreadable) on a GET's read, and re-fetches */
	uint64_t bad_reads, refetches, refetches_failed;
	/* OPEN's reads of every item (frame probes, records read for labels), and the OPENs
	 * answered from what an earlier one recorded in the index instead */
	uint64_t frame_probes, label_reads, open_stored_hits;
	/* arenas of closed connections kept for their uid's next connection (serve_arena.c) */
	struct pooled_arena *pool;
	unsigned n_pool;
	uint64_t pool_hits;
	unsigned drops;          /* arenas being unmapped on the threadpool */
	uint64_t arena_dropping; /* their bytes: still the daemon's until then */
	struct hot hot;
	struct regions regions; /* hot tensors handed in place (region.h); budget hot_max */
	/* items whose download failed for good in a job still running: a GET of one fails at
	 * once instead of waiting for the job's end (forgotten when the job ends) */
	struct failed_item {
		int64_t snapshot_id, idx;
		uid_t uid; /* the job's: its words go to this uid's GETs only */
		int err;
		char message[160]; /* the job's words (a local file: its path and errno) */
	} *failed;
	uint32_t n_failed, cap_failed;
	/* the last jobs that failed as a whole, by snapshot: an item they left missing fails
	 * with the job's words instead of "not in the cache", for a GET of the job's uid
	 * (forgotten when the snapshot's next job ends; the oldest of JOB_FAILED_MAX goes
	 * first) */
	struct job_failed {
		int64_t snapshot_id;
		uid_t uid;
		int err;
		char message[200];
	} job_failed[JOB_FAILED_MAX];
	uint32_t n_job_failed;
};

/* An item's row in the index, as on_item_row() fills it. */
struct lookup {
	bool found, stored;
	uint8_t blob[STORE_DIGEST_SIZE];
	char *record;
};

/* What make_room() found (serve_arena.c). */
enum room {
	ROOM_WAIT,   /* the arena is growing: try again when it has */
	ROOM_FULL,   /* grown whole: only a RELEASE makes room */
	ROOM_CAPPED, /* a cap (or a failed growth) forbids it: the reason is in `why` */
};

#define MASK_LABELS_MAX 255 /* codes are uint8, 0 is the background */

/* A STREAM (serve_stream.c); its batches are requests (struct greq) with `st` set. */
struct stream {
	struct sconn *sc;
	uint32_t request_id;
	struct handle h; /* a copy, as for GET */
	struct dmc_stream_req m;
	uint64_t per_rank, nbatches;
	uint64_t next_prep, next_send;
	unsigned preparing;   /* batches made and not sent (in work or ready) */
	unsigned outstanding; /* batches sent and not released */
	uint64_t sent_off[DMC_STREAM_AHEAD_MAX + 1];
	struct greq *ready;   /* batches done, by batch number */
	bool stopped, sending, ended;
	unsigned pins;        /* calls using it: freed only when none is left */
	/* the batch being copied into the arena on the threadpool, and its event */
	struct greq *copying;
	unsigned copies_left;
	uint64_t copy_doff, copy_moff;
	uint8_t *ev;
	size_t ev_len;
	struct copy_part {
		uv_work_t work;
		struct stream *st;
		uint32_t from, to;
	} parts[2];
	int err;              /* the reason a stream ended early */
	char why[MSG_MAX];
	struct stream *next;
};

/* ---- what one part calls in another, by the file that defines it ---- */

/* serve_arena.c */
struct share *share_get(struct serve *s, uid_t uid);
bool share_may_start(struct share *sh, const struct config *cfg);
void share_wake(struct serve *s, struct share *sh, struct sconn *except);
enum room make_room(struct sconn *sc, uint64_t len, char *why, size_t whylen);
void grow_ahead(struct sconn *sc);
int arena_make(struct sconn *sc, uint64_t want, char *why, size_t whylen);
void arena_release(struct serve *s, struct arena *a, struct share *sh, uint64_t shm);
/* The connection state goes: its arena goes to the pool or is released (takes sc->sh). */
void arena_retire(struct sconn *sc);
/* Pooled arenas: those idle past ARENA_POOL_IDLE_MS (all: `all`) are unmapped now. */
void arena_pool_expire(struct serve *s, bool all);
uint64_t arena_pool_bytes(const struct serve *s);

/* serve_region.c */
struct region *region_for_open(struct sconn *sc, int64_t snapshot_id, uint32_t flags,
			       bool *ret_send);
void region_sent(struct sconn *sc, const struct region *rg);
bool region_place(struct gitem *gi);
bool region_release(struct sconn *sc, uint64_t moff);
void region_pins_drop(struct sconn *sc);
uint32_t region_batch_take(struct greq *rq);
void region_batch_undo(struct greq *rq);
void region_batch_pin(struct greq *rq, uint64_t moff);

/* serve_frames.c */
struct fmap *fmap_ref(struct fmap *m);
void fmap_unref(struct fmap *m);
uint64_t fmap_find(const struct fmap *m, uint64_t i, uint32_t *ret_frame);
struct index;
bool snapshot_whole(struct index *ix, int64_t snapshot_id);
void frames_step(struct pending_open *po);

/* serve_masks.c */
void lset_unref(struct lset *l);
int masks_labels(struct pending_open *po, struct lset **ret, uint64_t *ret_bad);
void mask_work_free(struct gitem *gi);
void mask_start(struct gitem *gi);
void rawm_free(struct gitem *gi);
void rawm_start(struct gitem *gi);

/* serve_request.c */
void settle(struct gitem *gi, enum gi_state state);
uint32_t code_of(int err);
const uint8_t *gi_bytes(const struct gitem *gi);
void gi_drop(struct gitem *gi);
uint64_t meta_len(const struct gitem *gi);
void meta_write(const struct gitem *gi, uint8_t *p);
void abandon(struct gitem *gi);
void item_fail(struct gitem *gi, int err, const char *msg);
struct handle *handle_find(struct sconn *sc, uint64_t id);
int start_read(struct gitem *gi, const uint8_t *digest, uint64_t len,
	       uv_after_work_cb after);
void refetch_free(struct refetch *rf);
struct gitem *refetch_waiter(struct sconn *sc, const struct refetch *rf);
void retry_space(struct sconn *sc);
bool client_holds_space(struct sconn *sc);
void item_got_bytes(struct gitem *gi);
void req_free(struct greq *rq);
void req_unpin(struct greq *rq);
void item_desc_write(struct dmc_writer *w, const struct gitem *gi);
void req_maybe_reply(struct greq *rq);
void on_get(struct serve *s, struct conn *c, const struct dmc_header *h,
	    const uint8_t *payload);
void pump_items(struct sconn *sc);

/* serve_stream.c */
void stream_batch_done(struct greq *rq);
void stream_stop(struct stream *st, int err, const char *why);
void streams_released(struct sconn *sc, uint64_t off);
void streams_kick(struct sconn *sc);
void on_stream(struct serve *s, struct conn *c, const struct dmc_header *h,
	       const uint8_t *payload);
void on_stop(struct serve *s, struct conn *c, const struct dmc_header *h,
	     const uint8_t *payload);

/* serve.c */
void handle_copy_refs(struct handle *h);
void handle_drop_refs(struct handle *h);
struct sconn *sconn_of(struct serve *s, struct conn *c, bool create);
int on_item_row(void *ctx, const struct index_item *it);
void open_done(struct pending_open *po);
void open_reply(struct pending_open *po, int64_t snapshot_id, uint64_t items,
		const char *project_id, const char *project_name, const char *version,
		struct fmap *fm, struct lset *labels);
struct greq *first_with_new(struct sconn *sc);
void sconn_maybe_free(struct sconn *sc);
void serve_maybe_destroy(struct serve *s);
/* The record of the last failed job of `snapshot_id` run by `uid`, or NULL. */
const struct job_failed *serve_job_failed(const struct serve *s, int64_t snapshot_id,
					  uid_t uid);

#endif
