/*
 * index's rows (index.h): snapshots, items, blobs and the start's reconciliation, what
 * the prefetcher asks, decoded tensors, grants, small settings, what OPEN learnt of a
 * snapshot, eviction by snapshot, local folders. Every statement comes from index.c's
 * table (ix_stmt()), every error goes through ix_fail(). Loop thread (index.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sqlite3.h>

#include "index.h"
#include "index_priv.h"
#include "proto.h"

/* ---- snapshots ---- */

int index_snapshot_find(struct index *ix, int source, const char *server_url,
			const char *project_id, const char *version, int64_t owner, int64_t *ret_id)
{
	sqlite3_stmt *st;
	int rc, r;

	if ((r = ix_check_str(server_url, false)) < 0 || (r = ix_check_str(project_id, false)) < 0 ||
	    (r = ix_check_str(version, false)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_FIND);
	sqlite3_bind_int(st, 1, source);
	ix_bind_text(st, 2, server_url);
	ix_bind_text(st, 3, project_id);
	ix_bind_text(st, 4, version);
	sqlite3_bind_int64(st, 5, owner);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*ret_id = sqlite3_column_int64(st, 0);
		r = 0;
	} else {
		r = rc == SQLITE_DONE ? -ENOENT : ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_snapshot_get_or_create(struct index *ix, const struct index_snapshot *key,
				 int64_t *ret_id, bool *ret_created)
{
	sqlite3_stmt *st;
	int64_t id;
	int r;

	if (key->source != INDEX_SOURCE_DATAMINT && key->source != INDEX_SOURCE_FOLDER)
		return -EINVAL;
	if ((r = ix_check_str(key->project_name, false)) < 0)
		return r;
	r = index_snapshot_find(ix, key->source, key->server_url, key->project_id, key->version,
				key->owner, &id);
	if (r == 0) {
		*ret_id = id;
		if (ret_created)
			*ret_created = false;
		return 0;
	}
	if (r != -ENOENT)
		return r;
	if ((r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_INSERT);
	sqlite3_bind_int(st, 1, key->source);
	ix_bind_text(st, 2, key->server_url);
	ix_bind_text(st, 3, key->project_id);
	ix_bind_text(st, 4, key->project_name);
	ix_bind_text(st, 5, key->version);
	sqlite3_bind_int64(st, 6, key->created_at);
	sqlite3_bind_int64(st, 7, key->owner);
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	id = sqlite3_last_insert_rowid(ix->db);
	if (ix_check_snap_id(id) < 0) {
		/* 2^31 snapshots: the item key layout has no room for more. */
		(void)ix_fail_batch(ix, SQLITE_FULL);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	*ret_id = id;
	if (ret_created)
		*ret_created = true;
	return 0;
}

static void snap_from_row(sqlite3_stmt *st, struct index_snapshot *s)
{
	s->id = sqlite3_column_int64(st, 0);
	s->source = sqlite3_column_int(st, 1);
	s->server_url = (const char *)sqlite3_column_text(st, 2);
	s->project_id = (const char *)sqlite3_column_text(st, 3);
	s->project_name = (const char *)sqlite3_column_text(st, 4);
	s->version = (const char *)sqlite3_column_text(st, 5);
	s->created_at = sqlite3_column_int64(st, 6);
	s->sealed = sqlite3_column_int(st, 7) != 0;
	s->complete = sqlite3_column_int(st, 8) != 0;
	s->item_count = sqlite3_column_int64(st, 9);
	s->total_bytes = sqlite3_column_int64(st, 10);
	s->owner = sqlite3_column_int64(st, 11);
}

/* Steps `st`, passing each row to `cb`; returns rows visited or a negative code. */
static int walk_snapshots(struct index *ix, sqlite3_stmt *st, index_snapshot_cb cb, void *ctx)
{
	int rc, n = 0, r = 0;
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		struct index_snapshot s;
		snap_from_row(st, &s);
		if (!ix->complete_tracked)
			s.complete = false;
		n++;
		if (cb && (r = cb(ctx, &s)) < 0)
			break;
	}
	if (r >= 0 && rc != SQLITE_DONE && rc != SQLITE_ROW)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r < 0 ? r : n;
}

int index_snapshot_get(struct index *ix, int64_t id, index_snapshot_cb cb, void *ctx)
{
	sqlite3_stmt *st;
	int r;
	if (ix_check_snap_id(id) < 0)
		return -ENOENT;
	st = ix_stmt(ix, S_SNAP_GET);
	sqlite3_bind_int64(st, 1, id);
	r = walk_snapshots(ix, st, cb, ctx);
	return r < 0 ? r : r == 0 ? -ENOENT : 0;
}

int index_snapshot_list(struct index *ix, index_snapshot_cb cb, void *ctx)
{
	int r = walk_snapshots(ix, ix_stmt(ix, S_SNAP_LIST), cb, ctx);
	return r < 0 ? r : 0;
}

int index_snapshot_seal(struct index *ix, int64_t id)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_check_snap_id(id)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_SEAL);
	sqlite3_bind_int64(st, 1, id);
	sqlite3_bind_int64(st, 2, ix_key_lo(id));
	sqlite3_bind_int64(st, 3, ix_key_hi(id));
	return ix_run_write(ix, st);
}

int index_snapshot_set_complete(struct index *ix, int64_t id, bool complete)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_check_snap_id(id)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_COMPLETE);
	sqlite3_bind_int64(st, 1, id);
	sqlite3_bind_int(st, 2, complete ? 1 : 0);
	return ix_run_write(ix, st);
}

int index_snapshot_stats(struct index *ix, int64_t id, struct index_snapshot_stats *ret)
{
	sqlite3_stmt *st;
	int rc, r;
	if ((r = ix_check_snap_id(id)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_STATS);
	sqlite3_bind_int64(st, 1, ix_key_lo(id));
	sqlite3_bind_int64(st, 2, ix_key_hi(id));
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		ret->items = sqlite3_column_int64(st, 0);
		ret->items_stored = sqlite3_column_int64(st, 1);
		ret->bytes = sqlite3_column_int64(st, 2);
		ret->bytes_stored = sqlite3_column_int64(st, 3);
		r = 0;
	} else {
		r = ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_snapshot_delete(struct index *ix, int64_t id)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_check_snap_id(id)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_DEL_ITEMS);
	sqlite3_bind_int64(st, 1, ix_key_lo(id));
	sqlite3_bind_int64(st, 2, ix_key_hi(id));
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_DEL_ITEM_BLOBS);
	sqlite3_bind_int64(st, 1, ix_key_lo(id));
	sqlite3_bind_int64(st, 2, ix_key_hi(id));
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	st = ix_stmt(ix, S_GRANT_DEL_SNAP);
	sqlite3_bind_int64(st, 1, id);
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_DEL);
	sqlite3_bind_int64(st, 1, id);
	return ix_run_write(ix, st);
}

int index_snapshot_link_stored(struct index *ix, int64_t id, int64_t *ret_linked)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_check_snap_id(id)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	{
		/* only between snapshots of the same owner: never another user's content */
		sqlite3_stmt *g = ix_stmt(ix, S_SNAP_GET);
		int64_t owner = -2;
		sqlite3_bind_int64(g, 1, id);
		if (sqlite3_step(g) == SQLITE_ROW)
			owner = sqlite3_column_int64(g, 11);
		sqlite3_reset(g);
		st = ix_stmt(ix, S_SNAP_LINK);
		sqlite3_bind_int64(st, 1, ix_key_lo(id));
		sqlite3_bind_int64(st, 2, ix_key_hi(id));
		sqlite3_bind_int64(st, 3, owner);
	}
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	if (ret_linked)
		*ret_linked = sqlite3_changes64(ix->db);
	return 0;
}

/* ---- items ---- */

static int item_key(int64_t snap, int64_t idx, int64_t *ret_key)
{
	if (ix_check_snap_id(snap) < 0 || idx < 0 || idx >= INDEX_ITEMS_MAX)
		return -EINVAL;
	*ret_key = ix_key_lo(snap) | idx;
	return 0;
}

int index_item_put(struct index *ix, const struct index_item *it)
{
	sqlite3_stmt *st;
	int64_t key;
	int r;

	if ((r = item_key(it->snapshot_id, it->idx, &key)) < 0)
		return r;
	if ((r = ix_check_str(it->resource_id, false)) < 0 ||
	    (r = ix_check_str(it->filename, false)) < 0 ||
	    (r = ix_check_str(it->mimetype, false)) < 0 || (r = ix_check_str(it->etag, true)) < 0)
		return r;
	if (it->size < 0)
		return -EINVAL;
	if (it->meta && it->meta_len > INDEX_META_MAX)
		return -DMC_E_LIMIT_EXCEEDED;
	if ((r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_ITEM_PUT);
	sqlite3_bind_int64(st, 1, key);
	ix_bind_text(st, 2, it->resource_id);
	ix_bind_text(st, 3, it->filename);
	ix_bind_text(st, 4, it->mimetype);
	sqlite3_bind_int64(st, 5, it->size);
	ix_bind_text(st, 6, it->etag);
	if (it->has_blob)
		ix_bind_digest(st, 7, it->blob);
	if (it->meta)
		sqlite3_bind_text64(st, 8, it->meta, it->meta_len, SQLITE_STATIC, SQLITE_UTF8);
	return ix_run_write(ix, st);
}

int index_item_set_blob(struct index *ix, int64_t snapshot_id, int64_t idx,
			const uint8_t digest[INDEX_DIGEST_SIZE])
{
	sqlite3_stmt *st;
	int64_t key;
	int r;
	if ((r = item_key(snapshot_id, idx, &key)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_ITEM_SET_BLOB);
	sqlite3_bind_int64(st, 1, key);
	ix_bind_digest(st, 2, digest);
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	return sqlite3_changes(ix->db) == 1 ? 0 : -ENOENT;
}

static void item_from_row(sqlite3_stmt *st, struct index_item *it)
{
	int64_t key = sqlite3_column_int64(st, 0);
	const void *blob = sqlite3_column_blob(st, 6);

	memset(it, 0, sizeof(*it));
	it->snapshot_id = key >> 32;
	it->idx = key & (INDEX_ITEMS_MAX - 1);
	it->resource_id = (const char *)sqlite3_column_text(st, 1);
	it->filename = (const char *)sqlite3_column_text(st, 2);
	it->mimetype = (const char *)sqlite3_column_text(st, 3);
	it->size = sqlite3_column_int64(st, 4);
	it->etag = (const char *)sqlite3_column_text(st, 5);
	if (blob && sqlite3_column_bytes(st, 6) == INDEX_DIGEST_SIZE) {
		memcpy(it->blob, blob, INDEX_DIGEST_SIZE);
		it->has_blob = true;
	}
	it->meta = (const char *)sqlite3_column_text(st, 7);
	it->meta_len = it->meta ? (size_t)sqlite3_column_bytes(st, 7) : 0;
	it->stored = sqlite3_column_int(st, 8) != 0;
}

int index_item_get(struct index *ix, int64_t snapshot_id, int64_t idx, index_item_cb cb,
		   void *ctx)
{
	sqlite3_stmt *st;
	int64_t key;
	int rc, r;
	if (item_key(snapshot_id, idx, &key) < 0)
		return -ENOENT;
	st = ix_stmt(ix, S_ITEM_GET);
	sqlite3_bind_int64(st, 1, key);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		struct index_item it;
		item_from_row(st, &it);
		r = cb ? cb(ctx, &it) : 0;
		if (r > 0)
			r = 0;
	} else {
		r = rc == SQLITE_DONE ? -ENOENT : ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_items_page(struct index *ix, int64_t snapshot_id, int64_t from, unsigned limit,
		     enum index_items_filter filter, index_item_cb cb, void *ctx,
		     int64_t *ret_next)
{
	sqlite3_stmt *st;
	int64_t lo, next = -1;
	int rc, n = 0, r = 0;

	if (limit == 0 || limit > INDEX_PAGE_MAX)
		return -EINVAL;
	if (from < 0)
		from = 0;
	if (from >= INDEX_ITEMS_MAX || ix_check_snap_id(snapshot_id) < 0) {
		if (ret_next)
			*ret_next = -1;
		return 0;
	}
	lo = ix_key_lo(snapshot_id) | from;
	st = ix_stmt(ix, filter == INDEX_ITEMS_MISSING ? S_ITEM_PAGE_MISSING : S_ITEM_PAGE_ALL);
	sqlite3_bind_int64(st, 1, lo);
	sqlite3_bind_int64(st, 2, ix_key_hi(snapshot_id));
	sqlite3_bind_int64(st, 3, limit);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		struct index_item it;
		item_from_row(st, &it);
		n++;
		next = it.idx + 1 < INDEX_ITEMS_MAX ? it.idx + 1 : -1;
		if (cb && (r = cb(ctx, &it)) < 0)
			break;
	}
	if (r >= 0 && rc != SQLITE_ROW && rc != SQLITE_DONE)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	if (r < 0)
		return r;
	/* A short page is the end of the snapshot. */
	if ((unsigned)n < limit)
		next = -1;
	if (ret_next)
		*ret_next = next;
	return n;
}

int index_item_find_stored(struct index *ix, const char *resource_id, int64_t size,
			   const char *etag, uint8_t ret_digest[INDEX_DIGEST_SIZE])
{
	sqlite3_stmt *st;
	int rc, r;
	if ((r = ix_check_str(resource_id, false)) < 0 || (r = ix_check_str(etag, true)) < 0)
		return r;
	if (!etag)
		return -ENOENT;
	st = ix_stmt(ix, S_ITEM_FIND_STORED);
	ix_bind_text(st, 1, resource_id);
	sqlite3_bind_int64(st, 2, size);
	ix_bind_text(st, 3, etag);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW && sqlite3_column_bytes(st, 0) == INDEX_DIGEST_SIZE) {
		memcpy(ret_digest, sqlite3_column_blob(st, 0), INDEX_DIGEST_SIZE);
		r = 0;
	} else if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
		r = -ENOENT;
	} else {
		r = ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

/* ---- blobs ---- */

static int check_blob(const struct index_blob *b)
{
	if (b->raw_size < 0 || b->stored_size < 0 || b->kind < 0 || b->kind > 255)
		return -EINVAL;
	return 0;
}

int index_blob_put(struct index *ix, const struct index_blob *b)
{
	sqlite3_stmt *st;
	int r;
	if ((r = check_blob(b)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	ix_touch(ix, b->digest[0]);
	st = ix_stmt(ix, S_BLOB_PUT);
	ix_bind_digest(st, 1, b->digest);
	sqlite3_bind_int(st, 2, b->kind);
	sqlite3_bind_int64(st, 3, b->raw_size);
	sqlite3_bind_int64(st, 4, b->stored_size);
	sqlite3_bind_int64(st, 5, ix_tick(ix));
	return ix_run_write(ix, st);
}

static void blob_from_row(sqlite3_stmt *st, struct index_blob *b)
{
	const void *d = sqlite3_column_blob(st, 0);
	memset(b, 0, sizeof(*b));
	if (d && sqlite3_column_bytes(st, 0) == INDEX_DIGEST_SIZE)
		memcpy(b->digest, d, INDEX_DIGEST_SIZE);
	b->kind = sqlite3_column_int(st, 1);
	b->raw_size = sqlite3_column_int64(st, 2);
	b->stored_size = sqlite3_column_int64(st, 3);
	b->last_access = sqlite3_column_int64(st, 4);
}

int index_blob_get(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE],
		   struct index_blob *ret_blob)
{
	sqlite3_stmt *st = ix_stmt(ix, S_BLOB_GET);
	int rc, r;
	ix_bind_digest(st, 1, digest);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		if (ret_blob)
			blob_from_row(st, ret_blob);
		r = 0;
	} else {
		r = rc == SQLITE_DONE ? -ENOENT : ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_blob_delete(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE])
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_batch(ix)) < 0)
		return r;
	ix_touch(ix, digest[0]);
	st = ix_stmt(ix, S_BLOB_DEL);
	ix_bind_digest(st, 1, digest);
	return ix_run_write(ix, st);
}

int index_blob_touch(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE])
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_BLOB_TOUCH);
	ix_bind_digest(st, 1, digest);
	sqlite3_bind_int64(st, 2, ix_tick(ix));
	return ix_run_write(ix, st);
}

int index_blob_totals(struct index *ix, int64_t *ret_count, int64_t *ret_stored_bytes)
{
	sqlite3_stmt *st = ix_stmt(ix, S_BLOB_TOTALS);
	int rc = sqlite3_step(st), r = 0;
	if (rc == SQLITE_ROW) {
		if (ret_count)
			*ret_count = sqlite3_column_int64(st, 0);
		if (ret_stored_bytes)
			*ret_stored_bytes = sqlite3_column_int64(st, 1);
	} else {
		r = ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_lru_page(struct index *ix, struct index_lru_cursor *cursor, unsigned limit,
		   index_blob_cb cb, void *ctx)
{
	sqlite3_stmt *st;
	int rc, n = 0, r = 0;

	if (limit == 0 || limit > INDEX_PAGE_MAX)
		return -EINVAL;
	if (cursor->started) {
		st = ix_stmt(ix, S_LRU_NEXT);
		sqlite3_bind_int64(st, 1, cursor->last_access);
		ix_bind_digest(st, 2, cursor->digest);
		sqlite3_bind_int64(st, 3, limit);
	} else {
		st = ix_stmt(ix, S_LRU_FIRST);
		sqlite3_bind_int64(st, 1, limit);
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		struct index_blob b;
		blob_from_row(st, &b);
		cursor->started = true;
		cursor->last_access = b.last_access;
		memcpy(cursor->digest, b.digest, INDEX_DIGEST_SIZE);
		n++;
		if (cb && (r = cb(ctx, &b)) < 0)
			break;
	}
	if (r >= 0 && rc != SQLITE_ROW && rc != SQLITE_DONE)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r < 0 ? r : n;
}

/* ---- reconciliation ---- */

int index_reconcile_begin(struct index *ix, int64_t *ret_pass)
{
	sqlite3_stmt *st = ix_stmt(ix, S_PASS_MAX);
	int rc = sqlite3_step(st), r = 0;
	if (rc == SQLITE_ROW)
		*ret_pass = sqlite3_column_int64(st, 0) + 1;
	else
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r;
}

int index_blob_seen(struct index *ix, int64_t pass, const struct index_blob *b)
{
	sqlite3_stmt *st;
	int r;
	if ((r = check_blob(b)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	ix_touch(ix, b->digest[0]);
	st = ix_stmt(ix, S_BLOB_SEEN);
	ix_bind_digest(st, 1, b->digest);
	sqlite3_bind_int(st, 2, b->kind);
	sqlite3_bind_int64(st, 3, b->raw_size);
	sqlite3_bind_int64(st, 4, b->stored_size);
	sqlite3_bind_int64(st, 5, b->last_access);
	sqlite3_bind_int64(st, 6, pass);
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	if (b->last_access > ix->clock)
		ix->clock = b->last_access;
	return 0;
}

int index_blobs_first_byte(struct index *ix, unsigned first, index_blob_cb cb, void *ctx)
{
	/* Blobs compare as memcmp then length: [first] <= every digest starting with it <
	 * [first + 1], and 33 bytes of 0xff are above every digest. */
	uint8_t lo[1], hi[INDEX_DIGEST_SIZE + 1];
	sqlite3_stmt *st;
	int rc, n = 0, r = 0;

	if (first > 255)
		return -EINVAL;
	lo[0] = (uint8_t)first;
	memset(hi, 0xff, sizeof(hi));
	if (first < 255)
		hi[0] = (uint8_t)(first + 1);
	st = ix_stmt(ix, S_BLOBS_BYTE);
	sqlite3_bind_blob(st, 1, lo, 1, SQLITE_TRANSIENT);
	sqlite3_bind_blob(st, 2, hi, first < 255 ? 1 : (int)sizeof(hi), SQLITE_TRANSIENT);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		struct index_blob b;
		blob_from_row(st, &b);
		n++;
		if (cb && (r = cb(ctx, &b)) < 0)
			break;
	}
	if (r >= 0 && rc != SQLITE_ROW && rc != SQLITE_DONE)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r < 0 ? r : n;
}

int index_reconcile_end(struct index *ix, int64_t pass, int64_t *ret_dropped)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_batch(ix)) < 0)
		return r;
	memset(ix->touched, 0xff, sizeof(ix->touched)); /* any first byte may lose rows */
	st = ix_stmt(ix, S_PASS_DROP);
	sqlite3_bind_int64(st, 1, pass);
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	if (ret_dropped)
		*ret_dropped = sqlite3_changes64(ix->db);
	return index_flush(ix);
}

/* ---- prefetch helpers ---- */

int index_item_set_content(struct index *ix, int64_t snapshot_id, int64_t idx,
			   const uint8_t digest[INDEX_DIGEST_SIZE], const char *etag,
			   const char *meta, size_t meta_len)
{
	sqlite3_stmt *st;
	int64_t key;
	int r;

	if ((r = item_key(snapshot_id, idx, &key)) < 0 || (r = ix_check_str(etag, true)) < 0)
		return r;
	if (meta && meta_len > INDEX_META_MAX)
		return -DMC_E_LIMIT_EXCEEDED;
	if ((r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, meta ? S_ITEM_SET_CONTENT_META : S_ITEM_SET_CONTENT);
	sqlite3_bind_int64(st, 1, key);
	ix_bind_digest(st, 2, digest);
	if (etag)
		ix_bind_text(st, 3, etag);
	else
		sqlite3_bind_null(st, 3);
	if (meta)
		sqlite3_bind_text(st, 4, meta, (int)meta_len, SQLITE_TRANSIENT);
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	if (sqlite3_changes(ix->db) == 1)
		return 0;
	/* nothing written: the row holds that content already, or there is none */
	st = ix_stmt(ix, S_ITEM_HAS);
	sqlite3_bind_int64(st, 1, key);
	r = sqlite3_step(st);
	sqlite3_reset(st);
	return r == SQLITE_ROW ? 0 : r == SQLITE_DONE ? -ENOENT : ix_fail(ix, r);
}

int index_item_add_blob(struct index *ix, int64_t snapshot_id, int64_t idx,
			const uint8_t digest[INDEX_DIGEST_SIZE])
{
	sqlite3_stmt *st;
	int64_t key;
	int r;

	if ((r = item_key(snapshot_id, idx, &key)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_ITEM_ADD_BLOB);
	sqlite3_bind_int64(st, 1, key);
	ix_bind_digest(st, 2, digest);
	return ix_run_write(ix, st);
}

int index_item_find_prior(struct index *ix, const char *resource_id, int64_t size,
			  const char *server_url, int64_t owner, char *ret_etag, size_t etag_cap,
			  uint8_t ret_digest[INDEX_DIGEST_SIZE])
{
	sqlite3_stmt *st;
	int rc, r;

	if ((r = ix_check_str(resource_id, false)) < 0)
		return r;
	if ((r = ix_check_str(server_url, false)) < 0)
		return r;
	st = ix_stmt(ix, S_ITEM_FIND_PRIOR);
	ix_bind_text(st, 1, resource_id);
	sqlite3_bind_int64(st, 2, size);
	ix_bind_text(st, 3, server_url);
	sqlite3_bind_int64(st, 4, owner);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW && sqlite3_column_bytes(st, 1) == INDEX_DIGEST_SIZE &&
	    (size_t)sqlite3_column_bytes(st, 0) < etag_cap) {
		memcpy(ret_digest, sqlite3_column_blob(st, 1), INDEX_DIGEST_SIZE);
		snprintf(ret_etag, etag_cap, "%s", (const char *)sqlite3_column_text(st, 0));
		r = 0;
	} else if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
		r = -ENOENT;
	} else {
		r = ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_blobs_unreferenced(struct index *ix, index_blob_cb cb, void *ctx)
{
	sqlite3_stmt *st = ix_stmt(ix, S_BLOBS_UNREFERENCED);
	int rc, r = 0;

	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		struct index_blob b;
		blob_from_row(st, &b);
		if ((r = cb(ctx, &b)) < 0)
			break;
	}
	if (r == 0 && rc != SQLITE_DONE)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r;
}

/* ---- decoded tensors ---- */

int index_tensor_put(struct index *ix, const uint8_t raw[INDEX_DIGEST_SIZE], int64_t opts,
		     const uint8_t tensor[INDEX_DIGEST_SIZE], const uint8_t *meta,
		     const char *desc)
{
	sqlite3_stmt *st;
	int r;

	if ((r = ix_check_str(desc, false)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_TENSOR_PUT);
	ix_bind_digest(st, 1, raw);
	sqlite3_bind_int64(st, 2, opts);
	ix_bind_digest(st, 3, tensor);
	if (meta)
		ix_bind_digest(st, 4, meta);
	else
		sqlite3_bind_null(st, 4);
	ix_bind_text(st, 5, desc);
	return ix_run_write(ix, st);
}

int index_tensor_get(struct index *ix, const uint8_t raw[INDEX_DIGEST_SIZE], int64_t opts,
		     uint8_t ret_tensor[INDEX_DIGEST_SIZE], bool *ret_has_meta,
		     uint8_t ret_meta[INDEX_DIGEST_SIZE], char *ret_desc, size_t desc_cap)
{
	sqlite3_stmt *st = ix_stmt(ix, S_TENSOR_GET);
	int rc, r;

	ix_bind_digest(st, 1, raw);
	sqlite3_bind_int64(st, 2, opts);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW && sqlite3_column_bytes(st, 0) == INDEX_DIGEST_SIZE &&
	    (size_t)sqlite3_column_bytes(st, 2) < desc_cap) {
		memcpy(ret_tensor, sqlite3_column_blob(st, 0), INDEX_DIGEST_SIZE);
		*ret_has_meta = sqlite3_column_bytes(st, 1) == INDEX_DIGEST_SIZE;
		if (*ret_has_meta)
			memcpy(ret_meta, sqlite3_column_blob(st, 1), INDEX_DIGEST_SIZE);
		snprintf(ret_desc, desc_cap, "%s", (const char *)sqlite3_column_text(st, 2));
		r = 0;
	} else if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
		r = -ENOENT;
	} else {
		r = ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_tensor_delete(struct index *ix, const uint8_t raw[INDEX_DIGEST_SIZE], int64_t opts)
{
	sqlite3_stmt *st;
	int r;

	if ((r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_TENSOR_DEL);
	ix_bind_digest(st, 1, raw);
	sqlite3_bind_int64(st, 2, opts);
	return ix_run_write(ix, st);
}

/* ---- grants ---- */

int index_grant_put(struct index *ix, int64_t uid, int64_t snapshot_id,
		    const uint8_t key_hash[INDEX_DIGEST_SIZE], int64_t checked_at)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_check_snap_id(snapshot_id)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_GRANT_PUT);
	sqlite3_bind_int64(st, 1, uid);
	sqlite3_bind_int64(st, 2, snapshot_id);
	if (key_hash)
		ix_bind_digest(st, 3, key_hash);
	else
		sqlite3_bind_null(st, 3);
	sqlite3_bind_int64(st, 4, checked_at);
	return ix_run_write(ix, st);
}

int index_grant_get(struct index *ix, int64_t uid, int64_t snapshot_id,
		    struct index_grant *ret)
{
	sqlite3_stmt *st;
	int rc, r;
	if (ix_check_snap_id(snapshot_id) < 0)
		return -ENOENT;
	st = ix_stmt(ix, S_GRANT_GET);
	sqlite3_bind_int64(st, 1, uid);
	sqlite3_bind_int64(st, 2, snapshot_id);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		memset(ret, 0, sizeof(*ret));
		ret->has_key_hash = sqlite3_column_bytes(st, 0) == INDEX_DIGEST_SIZE;
		if (ret->has_key_hash)
			memcpy(ret->key_hash, sqlite3_column_blob(st, 0), INDEX_DIGEST_SIZE);
		ret->checked_at = sqlite3_column_int64(st, 1);
		r = 0;
	} else {
		r = rc == SQLITE_DONE ? -ENOENT : ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_grant_delete(struct index *ix, int64_t uid, int64_t snapshot_id)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_check_snap_id(snapshot_id)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_GRANT_DEL);
	sqlite3_bind_int64(st, 1, uid);
	sqlite3_bind_int64(st, 2, snapshot_id);
	return ix_run_write(ix, st);
}

int index_grant_newest(struct index *ix, int64_t uid, int source, const char *server_url,
		       const char *project, index_snapshot_id_cb cb, void *ctx)
{
	sqlite3_stmt *st;
	int rc, r = 0;

	if ((r = ix_check_str(server_url, false)) < 0 || (r = ix_check_str(project, false)) < 0)
		return r;
	st = ix_stmt(ix, S_GRANT_NEWEST);
	sqlite3_bind_int64(st, 1, uid);
	sqlite3_bind_int(st, 2, source);
	ix_bind_text(st, 3, server_url);
	ix_bind_text(st, 4, project);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		r = cb(ctx, sqlite3_column_int64(st, 0));
		if (r != 0)
			break;
	}
	if (r == 0 && rc != SQLITE_DONE && rc != SQLITE_ROW)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r < 0 ? r : 0;
}

/* ---- small settings ---- */

int index_meta_get(struct index *ix, const char *key, void *buf, size_t cap, size_t *ret_len)
{
	sqlite3_stmt *st = ix_stmt(ix, S_META_GET);
	int rc, r;

	ix_bind_text(st, 1, key);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		size_t n = (size_t)sqlite3_column_bytes(st, 0);
		if (n > cap) {
			r = -DMC_E_LIMIT_EXCEEDED;
		} else {
			if (n)
				memcpy(buf, sqlite3_column_blob(st, 0), n);
			*ret_len = n;
			r = 0;
		}
	} else {
		r = rc == SQLITE_DONE ? -ENOENT : ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_meta_put(struct index *ix, const char *key, const void *value, size_t len)
{
	sqlite3_stmt *st;
	int r;
	if ((r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_META_PUT);
	ix_bind_text(st, 1, key);
	sqlite3_bind_blob(st, 2, value, (int)len, SQLITE_STATIC);
	return ix_run_write(ix, st);
}

/* ---- what OPEN learnt of a snapshot (schema 5 -> 6) ---- */

int index_probe_get(struct index *ix, int64_t snapshot_id, int kind, void **ret_data,
		    size_t *ret_len)
{
	sqlite3_stmt *st = ix_stmt(ix, S_PROBE_GET);
	int rc, r;

	sqlite3_bind_int64(st, 1, snapshot_id);
	sqlite3_bind_int(st, 2, kind);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		size_t n = (size_t)sqlite3_column_bytes(st, 0);
		void *buf = malloc(n ? n : 1);
		if (!buf) {
			r = -ENOMEM;
		} else {
			if (n)
				memcpy(buf, sqlite3_column_blob(st, 0), n);
			*ret_data = buf;
			*ret_len = n;
			r = 0;
		}
	} else {
		r = rc == SQLITE_DONE ? -ENOENT : ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return r;
}

int index_probe_put(struct index *ix, int64_t snapshot_id, int kind, const void *data,
		    size_t len)
{
	sqlite3_stmt *st;
	int r;

	if (len > INDEX_PROBE_MAX)
		return -DMC_E_LIMIT_EXCEEDED;
	if ((r = ix_check_snap_id(snapshot_id)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_PROBE_PUT);
	sqlite3_bind_int64(st, 1, snapshot_id);
	sqlite3_bind_int(st, 2, kind);
	sqlite3_bind_blob(st, 3, len ? data : "", (int)len, SQLITE_STATIC);
	return ix_run_write(ix, st);
}

/* ---- eviction by snapshot ---- */

int index_blob_snapshots(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE],
			 index_snapshot_id_cb cb, void *ctx)
{
	sqlite3_stmt *st = ix_stmt(ix, S_BLOB_SNAPSHOTS);
	int rc, r = 0, n = 0;

	ix_bind_digest(st, 1, digest);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		n++;
		if (cb && (r = cb(ctx, sqlite3_column_int64(st, 0))) != 0)
			break;
	}
	if (r == 0 && rc != SQLITE_DONE && rc != SQLITE_ROW)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r < 0 ? r : cb ? (r > 0 ? 1 : 0) : n;
}

int index_snapshots_lru(struct index *ix, index_snapshot_id_cb cb, void *ctx)
{
	sqlite3_stmt *st = ix_stmt(ix, S_SNAP_LRU);
	int rc, r = 0;

	while ((rc = sqlite3_step(st)) == SQLITE_ROW)
		if ((r = cb(ctx, sqlite3_column_int64(st, 0))) != 0)
			break;
	if (r == 0 && rc != SQLITE_DONE && rc != SQLITE_ROW)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r < 0 ? r : 0;
}

int index_snapshot_blobs(struct index *ix, int64_t id, index_blob_cb cb, void *ctx)
{
	sqlite3_stmt *st;
	int rc, r = 0;

	if ((r = ix_check_snap_id(id)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_BLOBS);
	sqlite3_bind_int64(st, 1, ix_key_lo(id));
	sqlite3_bind_int64(st, 2, ix_key_hi(id));
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		struct index_blob b;
		blob_from_row(st, &b);
		if ((r = cb(ctx, &b)) < 0)
			break;
	}
	if (r >= 0 && rc != SQLITE_DONE && rc != SQLITE_ROW)
		r = ix_fail(ix, rc);
	sqlite3_reset(st);
	return r < 0 ? r : 0;
}
/* ---- local folders (schema 4 -> 5; see local.h) ---- */

static void bind_local_read(sqlite3_stmt *st, const struct index_local_read *r)
{
	sqlite3_bind_int64(st, 1, (int64_t)r->uid);
	sqlite3_bind_int64(st, 2, (int64_t)r->dev); /* the bits of a u64 */
	sqlite3_bind_int64(st, 3, (int64_t)r->ino);
	sqlite3_bind_int64(st, 4, r->size);
	sqlite3_bind_int64(st, 5, r->mtime_ns);
	sqlite3_bind_int64(st, 6, r->ctime_ns);
}

int index_local_read_find(struct index *ix, struct index_local_read *r)
{
	sqlite3_stmt *st = ix_stmt(ix, S_LOCAL_READ_FIND);
	int rc, ret;

	bind_local_read(st, r);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW && sqlite3_column_bytes(st, 0) == INDEX_DIGEST_SIZE) {
		memcpy(r->digest, sqlite3_column_blob(st, 0), INDEX_DIGEST_SIZE);
		ret = 0;
	} else if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
		ret = -ENOENT;
	} else {
		ret = ix_fail(ix, rc);
	}
	sqlite3_reset(st);
	return ret;
}

int index_local_read_put(struct index *ix, const struct index_local_read *r)
{
	sqlite3_stmt *st;
	int ret;

	if ((ret = ix_batch(ix)) < 0)
		return ret;
	st = ix_stmt(ix, S_LOCAL_READ_PUT);
	bind_local_read(st, r);
	ix_bind_digest(st, 7, r->digest);
	return ix_run_write(ix, st);
}

int index_local_relist(struct index *ix, int64_t snapshot_id, int64_t n)
{
	sqlite3_stmt *st;
	int r;

	if ((r = ix_check_snap_id(snapshot_id)) < 0 || n < 0 || n > INDEX_ITEMS_MAX ||
	    (r = ix_batch(ix)) < 0)
		return r < 0 ? r : -EINVAL;
	st = ix_stmt(ix, S_LOCAL_CLEAR);
	sqlite3_bind_int64(st, 1, ix_key_lo(snapshot_id));
	sqlite3_bind_int64(st, 2, ix_key_hi(snapshot_id));
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	if (n < INDEX_ITEMS_MAX) {
		st = ix_stmt(ix, S_LOCAL_TRIM);
		sqlite3_bind_int64(st, 1, ix_key_lo(snapshot_id) | n);
		sqlite3_bind_int64(st, 2, ix_key_hi(snapshot_id));
		if ((r = ix_run_write(ix, st)) < 0)
			return r;
	}
	st = ix_stmt(ix, S_SNAP_DEL_ITEM_BLOBS);
	sqlite3_bind_int64(st, 1, ix_key_lo(snapshot_id));
	sqlite3_bind_int64(st, 2, ix_key_hi(snapshot_id));
	return ix_run_write(ix, st);
}

int index_local_forget(struct index *ix, int64_t snapshot_id, int64_t from, int64_t to)
{
	sqlite3_stmt *st;
	int r;

	if ((r = ix_check_snap_id(snapshot_id)) < 0)
		return r;
	if (from < 0 || to > INDEX_ITEMS_MAX || from > to)
		return -EINVAL;
	if (from == to)
		return 0;
	if ((r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_LOCAL_CLEAR);
	sqlite3_bind_int64(st, 1, ix_key_lo(snapshot_id) | from);
	sqlite3_bind_int64(st, 2, ix_key_lo(snapshot_id) | (to - 1));
	if ((r = ix_run_write(ix, st)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_DEL_ITEM_BLOBS);
	sqlite3_bind_int64(st, 1, ix_key_lo(snapshot_id) | from);
	sqlite3_bind_int64(st, 2, ix_key_lo(snapshot_id) | (to - 1));
	return ix_run_write(ix, st);
}

int index_item_drop_blobs(struct index *ix, int64_t snapshot_id, int64_t idx)
{
	sqlite3_stmt *st;
	int64_t key;
	int r;

	if ((r = item_key(snapshot_id, idx, &key)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_SNAP_DEL_ITEM_BLOBS);
	sqlite3_bind_int64(st, 1, key);
	sqlite3_bind_int64(st, 2, key);
	return ix_run_write(ix, st);
}

int index_local_item_size(struct index *ix, int64_t snapshot_id, int64_t idx, int64_t size)
{
	sqlite3_stmt *st;
	int64_t key;
	int r;

	if (size < 0)
		return -EINVAL;
	if ((r = item_key(snapshot_id, idx, &key)) < 0 || (r = ix_batch(ix)) < 0)
		return r;
	st = ix_stmt(ix, S_LOCAL_SIZE);
	sqlite3_bind_int64(st, 1, key);
	sqlite3_bind_int64(st, 2, size);
	return ix_run_write(ix, st);
}
