/*
 * prefetch's remote listing: a Datamint job resolves its project and version, then lists
 * the resources page by page into a snapshot of the index (with their annotations where
 * masks are wanted), sealed once whole; a server that cannot be reached may fall back to
 * a grant (prefetch_grant.c). Downloads start as pages come in (prefetch_download.c).
 * Loop thread only (datamint.c parses on the threadpool and calls back on the loop).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache.h"
#include "conn.h"
#include "datamint.h"
#include "index.h"
#include "prefetch_priv.h"

/* ---- listing ---- */

static void on_page(void *ctx, const struct dm_error *e, struct dm_page *page);

static int list_next(struct job *j)
{
	int rc = dm_resources_page(&j->dmc, j->proj, j->list_offset, j->ann, on_page, j);
	if (rc == 0)
		j->pending++;
	return rc;
}

/*
 * The start of every callback of an upstream request or scan: false when the job has ended
 * meanwhile, or fails now with `e`; the callback then only frees what it was given.
 */
static bool job_resume(struct job *j, const struct dm_error *e)
{
	j->pending--;
	if (j->final) {
		job_maybe_free(j);
		return false;
	}
	if (e && e->err) {
		fail_job(j, e);
		return false;
	}
	return true;
}

static void on_page(void *ctx, const struct dm_error *e, struct dm_page *page)
{
	struct job *j = ctx;
	struct index *ix = j->pf->d.cache->index;
	struct dm_error e2 = { 0 };
	int rc = 0;

	if (!job_resume(j, e)) {
		dm_page_free(page);
		return;
	}
	for (uint32_t i = 0; i < page->n && rc == 0; i++) {
		const struct dm_resource *r = &page->items[i];
		struct index_item it = {
			.snapshot_id = j->snapshot_id,
			.idx = j->next_idx,
			.resource_id = r->id,
			.filename = r->filename,
			.mimetype = r->mimetype,
			.size = r->size,
			.etag = NULL,
			.meta = r->meta,
			.meta_len = r->meta_len,
		};
		rc = index_item_put(ix, &it);
		if (rc == 0)
			j->next_idx++;
	}
	/* the offset counts what the server returned, deleted ones included */
	j->list_offset += page->returned;
	if (rc == 0)
		rc = index_flush(ix);
	if (rc < 0) {
		e2.err = rc;
		snprintf(e2.message, sizeof(e2.message), "cannot record the resource list: %s",
			 index_errmsg(ix));
		dm_page_free(page);
		fail_job(j, &e2);
		return;
	}
	j->items_total = (uint64_t)j->next_idx;
	if (page->last) {
		dm_page_free(page);
		rc = index_snapshot_seal(ix, j->snapshot_id);
		if (rc == 0)
			rc = index_flush(ix);
		if (rc < 0) {
			e2.err = rc;
			snprintf(e2.message, sizeof(e2.message), "cannot seal the snapshot");
			fail_job(j, &e2);
			return;
		}
		start_downloading(j);
		return;
	}
	dm_page_free(page);
	rc = list_next(j);
	if (rc < 0) {
		e2.err = rc;
		snprintf(e2.message, sizeof(e2.message), "cannot list resources");
		fail_job(j, &e2);
	}
}

static void on_annotations(void *ctx, const struct dm_error *e, struct dm_annotations *a)
{
	struct job *j = ctx;
	struct dm_error e2 = { 0 };
	int rc;

	if (!job_resume(j, e)) {
		dm_annotations_free(a);
		return;
	}
	j->ann = a;
	rc = list_next(j);
	if (rc < 0) {
		e2.err = rc;
		snprintf(e2.message, sizeof(e2.message), "cannot list resources");
		fail_job(j, &e2);
	}
}

static int snapshot_sealed_cb(void *ctx, const struct index_snapshot *snap)
{
	*(bool *)ctx = snap->sealed;
	return 0;
}

static bool snapshot_sealed(struct index *ix, int64_t id)
{
	bool sealed = false;

	return index_snapshot_get(ix, id, snapshot_sealed_cb, &sealed) == 0 && sealed;
}

void on_resolved(void *ctx, const struct dm_error *e, struct dm_project *proj)
{
	struct job *j = ctx;
	struct index *ix = j->pf->d.cache->index;
	struct dm_error e2 = { 0 };
	const char *version;
	int64_t id;
	bool created;
	int rc;

	if (j->offline) {
		/* answered from a grant while this request was out: the server's late answer
		 * still renews that grant (the same project and version) or, refusing the key,
		 * withdraws it */
		j->pending--;
		if (e && e->err)
			withdraw_grants_refused(j, e);
		else if (proj && j->proj && strcmp(proj->id, j->proj->id) == 0 &&
			 strcmp(proj->version, j->proj->version) == 0)
			grant(j);
		dm_project_free(proj);
		job_maybe_free(j);
		return;
	}
	if (e && e->err && !j->final && unreachable(e) && j->fallback_id > 0) {
		j->pending--;
		dm_project_free(proj);
		fall_back(j, e->message);
		return;
	}
	if (!job_resume(j, e)) {
		dm_project_free(proj);
		return;
	}
	j->proj = proj;
	version = proj->version;
	if (j->version_arg[0] && strcmp(j->version_arg, "latest") != 0 &&
	    strcmp(j->version_arg, proj->version) != 0) {
		/* an older version: only from the cache, and only a whole list */
		if (index_snapshot_find(ix, INDEX_SOURCE_DATAMINT, j->server, proj->id,
					j->version_arg, (int64_t)j->uid, &id) == 0) {
			j->snapshot_id = id;
			free(proj->version);
			proj->version = strdup(j->version_arg);
			start_downloading(j);
			return;
		}
		e2.err = -DMC_E_NOT_FOUND_OR_DENIED;
		snprintf(e2.message, sizeof(e2.message),
			 "version '%.60s' is neither the server's current one ('%.60s') nor cached",
			 j->version_arg, proj->version);
		fail_job(j, &e2);
		return;
	}
	j->state = DMC_JOB_LISTING;
	{
		struct index_snapshot key = {
			.source = INDEX_SOURCE_DATAMINT,
			.server_url = j->server,
			.project_id = proj->id,
			.project_name = proj->name,
			.version = version,
			.created_at = (int64_t)time(NULL),
			.owner = (int64_t)j->uid,
		};
		rc = index_snapshot_get_or_create(ix, &key, &id, &created);
	}
	if (rc == 0)
		rc = index_flush(ix);
	if (rc < 0) {
		e2.err = rc;
		snprintf(e2.message, sizeof(e2.message), "cannot create the snapshot: %s",
			 index_errmsg(ix));
		fail_job(j, &e2);
		return;
	}
	j->snapshot_id = id;
	/* a snapshot whose list is whole needs no listing; otherwise list (again) from 0 */
	if (!created && snapshot_sealed(ix, id)) {
		start_downloading(j);
		return;
	}
	j->list_offset = 0;
	j->next_idx = 0;
	rc = dm_annotations(&j->dmc, proj->worklist_id, on_annotations, j);
	if (rc == 0)
		j->pending++;
	else {
		e2.err = rc;
		snprintf(e2.message, sizeof(e2.message), "cannot list annotations");
		fail_job(j, &e2);
	}
}
