/*
 * prefetch's local dataset folders, the proofs: which rows of a listed folder's snapshot
 * are proved by this listing's descriptors (struct lproof), what serve may trust
 * (prefetch_item_unproved()), the snapshots trusted in nothing until listed again.
 * Loop thread.
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
		p->item_hook(p->item_hook_ctx, id, PREFETCH_RELISTED, (uid_t)-1, 0, NULL);
	return true;
}

/* Snapshot `id` listed again: `put` (its items put again from a changed dataset.json) or
 * not, `n` items. Every item is proved again before it is served. */
int local_relist(struct job *j, int64_t id, uint32_t n, bool put)
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
			p->item_hook(p->item_hook_ctx, id, PREFETCH_RELISTED, (uid_t)-1, 0, NULL);
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
