/*
 * prefetch's private declarations: the state the parts of prefetch (prefetch.c,
 * prefetch_grant.c, prefetch_list.c, prefetch_download.c, prefetch_local.c,
 * prefetch_cache.c, prefetch_decode.c) share, and the functions one part calls in another. Not for the rest
 * of the daemon: its interface is prefetch.h. Everything here belongs to the loop thread;
 * threadpool works touch only what their own work structure hands them.
 */
#ifndef DMC_PREFETCH_PRIV_H
#define DMC_PREFETCH_PRIV_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "datamint.h"
#include "fetch.h"
#include "index.h"
#include "local.h"
#include "prefetch.h"
#include "proto.h"
#include "store.h"

struct secret;
struct tier_req;

#define SINK_BUF (1u << 20)  /* bytes gathered before a write on the threadpool */
#define RATE_WINDOW 5        /* seconds of samples for the rate */

struct job;
struct task;
struct pdec;

/* Who hears of a job: a connection (events and the final reply), or a callback inside the
 * daemon (prefetch_attach), told once when the snapshot is listed or the job failed. */
struct sub {
	struct conn *c;
	uint32_t request_id;
	prefetch_ready_cb cb;
	void *ctx;
	struct sub *next;
};

/*
 * What a parse of a folder's dataset.json gave one uid (prefetch_local.c): its identity as
 * that uid's own descriptor showed it (unchanged while read, not changed just before), and
 * the snapshot listed from it. A later OPEN of the same uid whose descriptor shows the same
 * identity is listed and answered from this before dataset.json is read again.
 */
#define LOCAL_SEEN_MAX 32
struct local_seen {
	uid_t uid;
	char *root, *name, *version; /* NULL: a free slot */
	struct local_stamp stamp;
	int64_t snapshot_id;
	uint8_t digest[STORE_DIGEST_SIZE];
	uint32_t n;
	uint64_t used; /* the least recently used goes first */
};

/* A local snapshot's items proved since its last listing (prefetch_local.c "proofs"). */
struct lproof {
	int64_t snapshot_id;
	uint64_t gen; /* which listing: the higher, the later */
	uint32_t n;
	uint8_t *bits;
};

struct prefetch {
	struct prefetch_deps d;
	struct local_seen local_seen[LOCAL_SEEN_MAX];
	uint64_t local_seen_clock;
	/* local folders' proof records (prefetch_local.c "proofs"), and the snapshots none of
	 * whose rows is trusted until listed again (a failed index write, a record dropped) */
	struct lproof *lproofs;
	uint32_t n_lproofs;
	uint64_t lproof_gen;
	int64_t *distrust;
	uint32_t n_distrust, cap_distrust;
	uint64_t local_parses_skipped; /* OPENs listed before dataset.json was read */
	uint64_t local_seen_loaded; /* identities of earlier parses read from the index */
	struct job *jobs;
	struct task *downloads; /* tasks with a transfer in flight, for sharing */
	uint8_t salt[32];       /* of the key hashes in grants (index "key_salt") */
	uint64_t lost_seen;     /* index_batches_lost() at the last commit_index() */
	bool (*is_open)(void *ctx, int64_t id); /* the serving side's open snapshots */
	void *is_open_ctx;
	bool has_salt;
	uint64_t next_job_id;
	uv_timer_t flush_timer;
	bool closing;
	bool timer_closed;
	prefetch_item_cb item_hook;
	void *item_hook_ctx;
	struct prefetch_hot_hooks hot; /* decoded ahead, kept in memory; room NULL: none */
	/* STATUS counters */
	uint64_t items_downloaded, items_revalidated, items_shared, items_failed;
	uint64_t bytes_downloaded;
	uint64_t jobs_started;
	/* online OPENs answered from a fresh grant, and grants withdrawn on a refusal */
	uint64_t opens_from_grant, grants_withdrawn;
	uint64_t local_listings_kept; /* local folders whose unchanged listing was kept */
	uint64_t local_forgotten; /* items a listing kept did not prove again, forgotten */
	uint64_t local_ahead; /* local items whose files were asked ahead of the walk */
	/* local item tables (local_table.h): written, mapped instead of a parse, refused */
	uint64_t local_tables_written, local_tables_mapped, local_tables_refused;
	struct tier *tier;      /* the cluster tier (tier.h); NULL: none */
};

enum task_phase {
	TP_FILE,
	TP_MASKS,
};

struct task {
	struct job *job;
	struct task *next, *prev;   /* job->tasks */
	struct task *dnext, *dprev; /* prefetch->downloads while downloading */
	struct task *leader;        /* downloading the same resource for another job */
	struct task *followers;     /* tasks waiting for this one's download */
	struct task *fnext;

	int64_t idx;
	char *resource_id;
	int64_t size;
	char *meta;
	size_t meta_len;

	/* the transfer and its sink */
	struct fetch_xfer *x;
	struct store_writer *wr;
	uint8_t *buf, *wbuf; /* filling, and being written on the threadpool */
	size_t len, wlen;
	bool work_busy;
	bool paused;
	bool restart;        /* discard what the writer has and start a new blob */
	bool starting;       /* read from the index, not started yet */
	bool writer_open;    /* a work opened a writer that is not committed or aborted */
	bool done_pending;   /* the transfer ended while a work was busy */
	/* for the work on the threadpool, set before it is queued */
	bool w_restart, w_commit, w_abort, w_has_expected;
	uint8_t w_expected[STORE_DIGEST_SIZE];
	struct fetch_result res;
	uv_work_t work;
	int work_err;
	struct store_blob_info info;
	bool has_expected;
	uint8_t expected[STORE_DIGEST_SIZE];
	uint64_t reserved;
	char etag[FETCH_ETAG_MAX];
	enum store_kind kind;

	/* the cluster tier (tier.h): the mapping read, then the blob's file imported */
	struct tier_req *treq;
	bool import;          /* the transfer is a tier blob GET into an import writer */
	bool from_upstream;   /* the file came from Datamint: upload it to the tier */
	bool tier_fallback;   /* the tier failed: Datamint once the partial blob is dropped */
	bool drop_after;      /* to_tier: the blob is new here; removed once uploaded */

	/* revalidation of an earlier version */
	bool has_prior;
	uint8_t prior[STORE_DIGEST_SIZE];
	uint32_t integrity_tries; /* bodies that did not match the server's digest */

	/* LOCAL: the files are read on the threadpool, masks included, in one work */
	struct local_files *lfiles;
	struct store_blob_info *minfo;

	/* masks of segmentations, fetched after the file */
	enum task_phase phase;
	struct dm_mask *masks;
	uint32_t n_masks, mask_i;
	uint8_t (*mask_digests)[STORE_DIGEST_SIZE];
	uint8_t file_digest[STORE_DIGEST_SIZE];
	char file_etag[FETCH_ETAG_MAX];
};

#define WANT_MAX 256u /* items waited for ahead of a job's walk (more wait for the walk) */

struct job {
	struct prefetch *pf;
	struct job *next, *prev;
	uint64_t id;
	uid_t uid;
	uint32_t source;
	char *server;
	char origin[256];
	char *project_arg;
	char *version_arg;
	struct secret *key;
	struct dm_client dmc;

	struct dm_project *proj;
	struct dm_annotations *ann;
	struct local_job *lj;    /* LOCAL: see "local dataset folders" */
	uv_work_t scan_work;
	int scan_err;
	char scan_msg[FETCH_MESSAGE_MAX];
	int64_t snapshot_id;
	uint32_t state;
	bool final;     /* the final reply went out */
	bool freeing;   /* unlinked; the tick timer is closing */
	bool cancelled;
	unsigned pending; /* outstanding dm_* requests */

	uint64_t list_offset;
	int64_t next_idx;
	int64_t scan_from;
	bool scan_done;
	bool known_complete; /* sealed and complete at the start: nothing was scanned */
	/* Items a client waits for that the walk has not reached (prefetch_want()): taken
	 * first when a task ends, before the walk's next page. `taken` has a bit per index
	 * taken so (grown on demand, at most one bit per item): the walk skips those, so that
	 * an item is neither fetched twice nor counted twice when it fails. */
	int64_t want[WANT_MAX];
	unsigned want_head, want_n;
	uint8_t *taken;
	size_t taken_len; /* bytes */
	struct task *tasks;
	uint32_t running;
	bool pumping, pump_again;

	uint64_t items_total, items_done, items_cached, items_failed;
	uint64_t bytes_total, bytes_done;
	uint64_t samples[RATE_WINDOW + 1];
	unsigned n_samples;
	uint64_t rate, eta_ms;

	struct dmc_error_msg first_error; /* strings point into the buffers below */
	char first_resource[128];
	char first_message[FETCH_MESSAGE_MAX];

	struct sub *subs;
	uv_timer_t tick;
	bool tick_closed;

	/* offline reads (docs/security.md, "Offline") */
	bool offline;          /* served from a grant: nothing is downloaded */
	bool want_offline;     /* the client asked not to contact the server */
	bool allow_partial;    /* start even if the snapshot cannot fit (OPEN, --allow-partial) */
	bool warned_full;      /* "cache full" was logged for this job */
	int64_t fallback_id;   /* a snapshot a valid grant allows if the server is unreachable */
	uint64_t started_ms;
	char notice[192];      /* said with the final record: "served from cache: ..." */
	/* decoding ahead (DMC_PREFETCH_DECODE, prefetch_decode.c) */
	bool decode;           /* asked for: decode the stored items before the end */
	uint32_t shard_rank, shard_world; /* fetch only items at rank modulo world (1: all) */
	bool to_tier;          /* fill the cluster tier, not the cache (DMC_PREFETCH_TO_TIER) */
	bool decode_over;      /* the decoding ran (or will not): job_finish ends the job */
	struct pdec *dec;      /* while decoding */
};

/* A LOCAL job's side (prefetch_local.c): its client, the descriptors it was sent. */
struct local_job {
	struct local_dataset *l;
	struct local_dataset *scanned; /* the threadpool's, until local_scan_after() takes it */
	int json_fd;
	struct conn *c;         /* the client whose descriptors are read; NULL once gone */
	uint32_t request_id;    /* its PREFETCH or OPEN */
	uint32_t need_first, need_n; /* the LOCAL_NEED waiting for its LOCAL_FILES */
	uint32_t win_first, win_n;   /* the descriptors received, not handed to tasks yet */
	int win_fds[DMC_FDS_MAX];    /* -1: taken, or none (win_errs says why) */
	int32_t win_errs[DMC_FDS_MAX];
	uint32_t next_item;     /* the next item to start */
	uint32_t next_path;     /* the first path not asked for yet */
	bool pumping, pump_again;
	/* an earlier parse's identity of dataset.json (struct local_seen), compared on the
	 * threadpool with the descriptor's; hit: listed from it, then parsed for the paths */
	struct local_stamp want;
	bool want_set, hit, early;
	/* the proof record its listing began (struct lproof; 0: none), the items it tried
	 * (proved or failed), whether it forgot a row (a failed proof) */
	uint64_t gen;
	uint32_t tried;
	bool forgot;
	/* listed from an unchanged listing of n_items: the rows keep earlier proofs */
	bool kept;
	uint32_t n_items;
	/* the LOCAL_NEED waiting is of items a GET waits for (local_need_ahead()): these,
	 * in order; once in, the window is theirs, not the walk's */
	bool need_ahead, win_ahead;
	uint32_t ahead_items[DMC_FDS_MAX], ahead_n, ahead_seq;
	/* the item table kept on disk (local_table.h): listed early, the job maps the one
	 * of (uid, table_digest) before it parses; a stable parse's table is written by
	 * table_work */
	bool table_try;
	int table_rc;
	uint8_t table_digest[STORE_DIGEST_SIZE];
	uint32_t table_n;
	uint32_t trimmed_at; /* next_item when the mapping's pages were last given back */
	uv_work_t table_work;
};
/* VERIFY hashes every blob: on the threadpool, then the index is corrected on the loop. */
struct verify_req {
	struct prefetch *p;
	struct conn *c; /* NULL once the connection closed */
	uint32_t request_id;
	uv_work_t work;
	uv_mutex_t lock;
	uint8_t (*bad)[STORE_DIGEST_SIZE];
	uint32_t n_bad, cap_bad;
	uint64_t ok, bad_count, bytes;
	int rc;
	struct verify_req *next;
};

/* ---- what one part calls in another, by the file that defines it ---- */

/* prefetch.c */
uint32_t window(const struct prefetch *p);
struct dmc_str dstr(const char *s);
void job_progress(const struct job *j, struct dmc_progress *m);
void send_progress(struct job *j, const struct dmc_progress *m, bool more);
void job_finish(struct job *j, uint32_t state);
void record_error(struct job *j, int err, long http_status, uint32_t retry_after,
		  const char *resource, const char *msg);
void fail_job(struct job *j, const struct dm_error *e);
bool shares_across_users(const struct job *j);
void job_maybe_free(struct job *j);
void job_cancel(struct job *j);
void start_downloading(struct job *j);
const char *cache_full_text(struct prefetch *p, char *buf, size_t cap);

/* prefetch_grant.c */
void load_salt(struct prefetch *p);
void grant(struct job *j);
bool may_see_uid(struct prefetch *p, uid_t uid, int64_t snapshot_id);
bool may_see(struct prefetch *p, const struct conn *c, int64_t snapshot_id);
int find_grant(struct job *j, int64_t *ret_id, char *why, size_t whylen);
void serve_from_grant(struct job *j, int64_t id, const char *notice);
bool fall_back(struct job *j, const char *reason);
bool unreachable(const struct dm_error *e);
int fresh_grant(struct prefetch *p, uid_t uid, const char *server, const char *project,
		const char *version, struct dmc_str key, int64_t *ret_id);
void answer_from_grant(struct prefetch *p, int64_t id, prefetch_ready_cb cb, void *ctx);
void withdraw_grants(struct job *j, const struct dm_error *e);
void withdraw_grants_refused(struct job *j, const struct dm_error *e);

/* prefetch_list.c */
void on_resolved(void *ctx, const struct dm_error *e, struct dm_project *proj);

/* prefetch_download.c */
void dm_on_retry(void *ctx, const char *message);
void release_reservation(struct task *t);
void task_next_step(struct task *t);
void task_finish(struct task *t, int err, const char *msg, long http_status);
int task_from_item(void *ctx, const struct index_item *it);
bool job_fetches(const struct job *j, int64_t idx);
/* Items taken ahead of the walk (a bit per index in j->taken). */
bool taken_test(const struct job *j, int64_t idx);
int taken_set(struct job *j, int64_t idx);
void task_start(struct task *t);
void job_pump(struct job *j);

/* prefetch_local.c */
void local_job_free(struct job *j);
void local_seen_clear(struct prefetch *p);
void local_pump(struct job *j);
/* Item `idx` is proved by this job's descriptors (task_next_step()), or its proof failed
 * (task_finish(): its row forgets its content). */
/* The snapshot `id` of job j's folder is listed (its n items put again when `put`): its
 * proof record begins, serve is told (prefetch_local_proof.c). */
int local_relist(struct job *j, int64_t id, uint32_t n, bool put);
void local_proved(struct job *j, int64_t idx);
void local_failed(struct job *j, int64_t idx);
/* Whether a wanted item of a local job needs nothing more: taken ahead already, or its
 * files asked for by the walk. */
bool local_want_done(const struct job *j, int64_t idx);
/* The job ends (job_finish(), first): its listing's proof record goes when every item was
 * tried. */
void local_relist_end(struct job *j, uint32_t state);
void local_proofs_clear(struct prefetch *p);
/* Removes the item tables no folder snapshot's recorded parse wants (at start). */
void local_tables_gc(struct prefetch *p);
void on_local_files(struct prefetch *p, struct conn *c, const struct dmc_header *h,
		    const uint8_t *payload);
void local_conn_closed(struct prefetch *p, struct conn *c);
/* Before the scan is queued (loop thread): what an earlier parse of the uid recorded. */
void local_scan_prepare(struct job *j);
void local_scan_work(uv_work_t *w);
void local_scan_after(uv_work_t *w, int status);

/* prefetch_cache.c */
void on_list(struct prefetch *p, struct conn *c, const struct dmc_header *h,
	     const uint8_t *payload);
void on_evict(struct prefetch *p, struct conn *c, const struct dmc_header *h,
	      const uint8_t *payload);
void on_verify(struct prefetch *p, struct conn *c, const struct dmc_header *h,
	       const uint8_t *payload);

/* prefetch_decode.c */
/* Called by job_finish(): true when the job goes on decoding (job_finish is called again,
 * with `state`, once that is over), false when the job ends now. */
bool decode_ahead(struct job *j, uint32_t state);

extern struct verify_req *verifies;

#endif
