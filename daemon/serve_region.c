/*
 * serve's side of the regions (region.h; proto.h "Regions"): which handle gets which
 * snapshot's region at OPEN and which regions a connection was passed, an item of a GET
 * handed in place (its tensor in the region, pinned; its metadata in the arena), the hot
 * items of a STREAM batch handed in place (pinned under the batch's metadata offset), and
 * the pins a connection holds, given back by RELEASE of that metadata offset or when the
 * connection's state goes. Loop thread only.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "conn.h"
#include "log.h"
#include "serve_priv.h"

/*
 * The region an OPEN with `flags` of `snapshot_id` gets, referenced, or NULL (not asked for,
 * a handle whose items never come from the hot set, or none could be made). *ret_send: the
 * connection was not passed it yet.
 */
struct region *region_for_open(struct sconn *sc, int64_t snapshot_id, uint32_t flags,
			       bool *ret_send)
{
	struct region *rg;
	int err = 0;

	*ret_send = false;
	if (!(flags & DMC_OPEN_REGIONS) || (flags & (DMC_OPEN_RAW | DMC_OPEN_MASKS)))
		return NULL;
	rg = region_open(&sc->s->regions, snapshot_id, &err);
	if (!rg) {
		log_debug(SERVE, "no region for snapshot %" PRId64 ": %s", snapshot_id,
			  strerror(-err));
		return NULL;
	}
	*ret_send = true;
	for (uint32_t i = 0; i < sc->n_rg_sent; i++)
		if (sc->rg_sent[i] == rg->id)
			*ret_send = false;
	return rg;
}

/* The connection was passed `rg`'s descriptor. */
void region_sent(struct sconn *sc, const struct region *rg)
{
	if (sc->n_rg_sent == sc->cap_rg_sent) {
		uint32_t nc = sc->cap_rg_sent ? sc->cap_rg_sent * 2 : 4;
		uint64_t *n = realloc(sc->rg_sent, nc * sizeof(*n));
		if (!n)
			return; /* passed again at the next OPEN: harmless */
		sc->rg_sent = n;
		sc->cap_rg_sent = nc;
	}
	sc->rg_sent[sc->n_rg_sent++] = rg->id;
}

static bool pin_add(struct sconn *sc, uint64_t moff, struct rentry *e)
{
	if (sc->n_pins == sc->cap_pins) {
		uint32_t nc = sc->cap_pins ? sc->cap_pins * 2 : 64;
		struct rpin *n = realloc(sc->pins, nc * sizeof(*n));
		if (!n)
			return false;
		sc->pins = n;
		sc->cap_pins = nc;
	}
	sc->pins[sc->n_pins++] = (struct rpin){ moff, e };
	return true;
}

/*
 * A GET item whose bytes are a hot-set entry, on a handle with a region: its tensor handed
 * in the region (copied there the first time only) and its metadata written in the arena.
 * False when it cannot be (no room in the regions or for the metadata): the caller places
 * a copy in the arena as without regions.
 */
bool region_place(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	struct hot_entry *he = gi->he;
	struct rentry *e;
	uint64_t moff;

	e = region_take(gi->rq->h.rg, he->raw, he->opts, he->buf, gi->nbytes);
	if (!e)
		return false;
	gi->mlen = meta_len(gi);
	moff = arena_alloc(&sc->arena, gi->mlen);
	if (moff == UINT64_MAX) {
		region_unpin(e);
		return false;
	}
	if (!pin_add(sc, moff, e)) {
		arena_free(&sc->arena, moff);
		region_unpin(e);
		return false;
	}
	meta_write(gi, sc->arena.base + moff);
	gi->off = e->off;
	gi->moff = moff;
	gi->in_region = true;
	gi->rq->placed += arena_span(gi->mlen);
	grow_ahead(sc);
	return true;
}

/*
 * The hot items of a STREAM batch, on a handle with a region: each one's tensor found or
 * copied in the region and pinned (gi->re), its offset there in gi->off. Items that do not
 * fit stay for the arena. Returns how many were taken: the caller lays the batch out and
 * then either pins them for the client (region_batch_pin) or gives them back
 * (region_batch_undo), before it returns to the loop.
 */
uint32_t region_batch_take(struct greq *rq)
{
	struct sconn *sc = rq->sc;
	uint32_t k = 0;

	if (!rq->h.rg)
		return 0;
	/* room for every pin first: region_batch_pin() then cannot fail */
	if (sc->cap_pins - sc->n_pins < rq->n) {
		uint32_t nc = sc->n_pins + rq->n;
		struct rpin *n = realloc(sc->pins, nc * sizeof(*n));
		if (!n)
			return 0; /* the arena, as without regions */
		sc->pins = n;
		sc->cap_pins = nc;
	}
	for (uint32_t i = 0; i < rq->n; i++) {
		struct gitem *gi = &rq->items[i];
		if (gi->status || !gi->he || gi->re)
			continue;
		gi->re = region_take(rq->h.rg, gi->he->raw, gi->he->opts, gi->he->buf, gi->nbytes);
		if (!gi->re)
			continue;
		gi->in_region = true;
		gi->off = gi->re->off;
		k++;
	}
	return k;
}

/* The batch was not laid out (no arena space yet, or the stream stops): nothing stays
 * pinned for it. */
void region_batch_undo(struct greq *rq)
{
	for (uint32_t i = 0; i < rq->n; i++) {
		struct gitem *gi = &rq->items[i];
		if (gi->re) {
			region_unpin(gi->re);
			gi->re = NULL;
			gi->in_region = false;
		}
	}
}

/* The batch's event is built with its metadata at `moff`: its items taken in the region
 * are the client's now, until it RELEASEs `moff` (or its connection ends). */
void region_batch_pin(struct greq *rq, uint64_t moff)
{
	struct sconn *sc = rq->sc;

	for (uint32_t i = 0; i < rq->n; i++) {
		struct gitem *gi = &rq->items[i];
		if (gi->re) {
			sc->pins[sc->n_pins++] = (struct rpin){ moff, gi->re }; /* room reserved */
			gi->re = NULL;
			sc->s->stream_items_in_place++;
		}
	}
}

/* A RELEASE of `moff`: true when it was the metadata of an item handed in a region, or of
 * a STREAM batch with such items (their tensors are unpinned; the caller frees the
 * metadata in the arena). */
bool region_release(struct sconn *sc, uint64_t moff)
{
	bool found = false;

	for (uint32_t i = 0; i < sc->n_pins;)
		if (sc->pins[i].moff == moff) {
			struct rentry *e = sc->pins[i].e;
			sc->pins[i] = sc->pins[--sc->n_pins];
			region_unpin(e);
			found = true;
		} else {
			i++;
		}
	return found;
}

/* The connection's state goes: everything it held is unpinned. */
void region_pins_drop(struct sconn *sc)
{
	for (uint32_t i = 0; i < sc->n_pins; i++)
		region_unpin(sc->pins[i].e);
	free(sc->pins);
	free(sc->rg_sent);
	sc->pins = NULL;
	sc->rg_sent = NULL;
	sc->n_pins = sc->cap_pins = sc->n_rg_sent = sc->cap_rg_sent = 0;
}
