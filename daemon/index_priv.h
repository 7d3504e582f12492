/*
 * index's private parts, shared by index.c (the database: opening, schema, statements,
 * errors, batching) and index_rows.c (the rows: snapshots, items, blobs, grants, probes,
 * local listings). Whoever holds the struct index: the loop thread (index.h).
 */
#ifndef DMC_INDEX_PRIV_H
#define DMC_INDEX_PRIV_H

#include <stdbool.h>
#include <stdint.h>

#include <sqlite3.h>

#include "index.h"

enum stmt_id {
	S_BEGIN,
	S_COMMIT,
	S_ROLLBACK,
	S_SNAP_FIND,
	S_SNAP_INSERT,
	S_SNAP_GET,
	S_SNAP_LIST,
	S_SNAP_SEAL,
	S_SNAP_COMPLETE,
	S_SNAP_STATS,
	S_SNAP_DEL_ITEMS,
	S_SNAP_DEL,
	S_SNAP_LINK,
	S_ITEM_PUT,
	S_ITEM_SET_BLOB,
	S_ITEM_GET,
	S_ITEM_PAGE_ALL,
	S_ITEM_PAGE_MISSING,
	S_ITEM_FIND_STORED,
	S_BLOB_PUT,
	S_BLOB_GET,
	S_BLOB_DEL,
	S_BLOB_TOUCH,
	S_BLOB_TOTALS,
	S_LRU_FIRST,
	S_LRU_NEXT,
	S_BLOB_SEEN,
	S_PASS_MAX,
	S_PASS_DROP,
	S_BLOBS_BYTE,
	S_CLOCK,
	S_ITEM_SET_CONTENT,
	S_ITEM_SET_CONTENT_META,
	S_ITEM_HAS,
	S_ITEM_ADD_BLOB,
	S_ITEM_FIND_PRIOR,
	S_SNAP_DEL_ITEM_BLOBS,
	S_BLOBS_UNREFERENCED,
	S_TENSOR_PUT,
	S_TENSOR_GET,
	S_TENSOR_DEL,
	S_GRANT_PUT,
	S_GRANT_GET,
	S_GRANT_DEL,
	S_GRANT_DEL_SNAP,
	S_GRANT_NEWEST,
	S_META_GET,
	S_META_PUT,
	S_BLOB_SNAPSHOTS,
	S_SNAP_LRU,
	S_SNAP_BLOBS,
	/* local folders (schema 4 -> 5) */
	S_LOCAL_READ_FIND,
	S_LOCAL_READ_PUT,
	S_LOCAL_CLEAR,
	S_LOCAL_TRIM,
	S_LOCAL_SIZE,
	/* what OPEN learnt of a snapshot (schema 5 -> 6) */
	S_PROBE_GET,
	S_PROBE_PUT,
	S_COUNT_
};

struct index {
	sqlite3 *db;
	char dir[4096]; /* the directory of index.db: is its file system read-only? (ix_fail()) */
	bool read_only; /* a write failed on a read-only file system (index_read_only()) */
	uint64_t lost;   /* batches rolled back after an error (index_batches_lost()) */
	sqlite3_stmt *stmt[S_COUNT_];
	bool in_tx;
	unsigned pending;
	int64_t clock; /* last access time handed out */
	bool complete_tracked; /* the triggers keep `complete` true only while it is true */
	/* first bytes whose blob rows were written or deleted since index_open(), bit b % 8 of
	 * byte b / 8 (index_blobs_touched()) */
	uint8_t touched[32];
	char msg[256];
};

/* ---- index.c's helpers for index_rows.c ---- */

int ix_batch(struct index *ix);
int ix_bind_digest(sqlite3_stmt *st, int col, const uint8_t *d);
int ix_bind_text(sqlite3_stmt *st, int col, const char *s);
int ix_check_snap_id(int64_t id);
int ix_check_str(const char *s, bool nullable);
int ix_fail(struct index *ix, int rc);
int ix_fail_batch(struct index *ix, int rc);
int64_t ix_key_hi(int64_t snap);
int64_t ix_key_lo(int64_t snap);
int ix_run_write(struct index *ix, sqlite3_stmt *st);
sqlite3_stmt *ix_stmt(struct index *ix, enum stmt_id id);
int64_t ix_tick(struct index *ix);

static inline void ix_touch(struct index *ix, uint8_t first)
{
	ix->touched[first / 8] |= (uint8_t)(1u << (first % 8));
}

#endif
