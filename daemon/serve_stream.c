/*
 * serve's STREAM and STOP (see serve.h, proto.h): an epoch handed out in batches in the
 * order dmc_stream_perm()/dmc_stream_plan() compute, keeping `ahead` batches prepared (as
 * requests of serve_request.c) beyond those sent; a batch's hot items are handed in the
 * handle's region when it has one (serve_region.c: pinned until the batch's RELEASE), the
 * others copied into the arena back to back, on the threadpool for large batches, and the
 * batch sent as one event; the stream ends when its batches are sent and released, or at
 * STOP, CLOSE or an error.
 * Loop thread; copy_part_work() runs on the threadpool and touches only its part.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "conn.h"
#include "log.h"
#include "serve_priv.h"

/* ---- STREAM ---- */

static void stream_send(struct stream *st);
static void stream_prep(struct stream *st);
static void stream_maybe_end(struct stream *st);

static void stream_drop_batch(struct stream *st, struct greq *rq)
{
	st->preparing--;
	rq->replied = true;
	if (!rq->pins)
		req_free(rq);
}

/* Every item of a batch is done: queue it for sending, in batch order. */
void stream_batch_done(struct greq *rq)
{
	struct stream *st = rq->st;
	struct greq **pp;

	if (st->stopped || !st->sc->c) {
		stream_drop_batch(st, rq);
		stream_maybe_end(st);
		return;
	}
	rq->ready = true;
	for (pp = &st->ready; *pp && (*pp)->batch_no < rq->batch_no; pp = &(*pp)->next)
		;
	rq->next = *pp;
	*pp = rq;
	stream_send(st);
}

/* Stops a stream: batches not sent are dropped as their work ends. */
void stream_stop(struct stream *st, int err, const char *why)
{
	struct sconn *sc = st->sc;

	if (st->stopped)
		return;
	st->stopped = true;
	st->pins++;
	if (err && !st->err) {
		st->err = err;
		snprintf(st->why, sizeof(st->why), "%s", why);
	}
	while (st->ready) {
		struct greq *rq = st->ready;
		st->ready = rq->next;
		stream_drop_batch(st, rq);
	}
	/* items still waiting for something end now; those in work end with their work */
	sc->busy++;
again:
	for (struct greq *rq = sc->reqs; rq; rq = rq->next) {
		bool changed = false;
		if (rq->st != st)
			continue;
		for (uint32_t i = 0; i < rq->n; i++) {
			struct gitem *gi = &rq->items[i];
			if (gi->state == GI_NEW || gi->state == GI_WAIT_ITEM) {
				settle(gi, GI_DONE);
				gi->status = DMC_E_CANCELLED;
				changed = true;
			}
		}
		if (changed) {
			rq->pins++;
			req_maybe_reply(rq); /* may leave the list */
			req_unpin(rq);
			goto again;
		}
	}
	sc->busy--;
	st->pins--;
	stream_maybe_end(st);
}

static void stream_maybe_end(struct stream *st)
{
	struct sconn *sc = st->sc;
	struct stream **pp;
	uint8_t frame[64];
	struct dmc_writer w;
	int len;

	if (st->ended || st->pins || st->preparing ||
	    (!st->stopped && st->next_send < st->nbatches))
		return;
	st->ended = true;
	if (sc->c) {
		if (st->err) {
			conn_send_error(sc->c, st->request_id, code_of(st->err), NULL, "%s", st->why);
		} else {
			dmc_frame_begin(&w, frame, sizeof(frame));
			dmc_write_u64(&w, st->next_send);
			dmc_write_u32(&w, st->stopped ? 1 : 0);
			len = dmc_frame_end(&w, DMC_OP_STREAM, DMC_FLAG_REPLY, st->request_id, 0);
			if (len > 0)
				conn_send(sc->c, frame, (size_t)len);
		}
	}
	for (pp = &sc->streams; *pp && *pp != st; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = st->next;
	handle_drop_refs(&st->h);
	free(st->ev);
	free(st);
	sconn_maybe_free(sc);
}

/* Starts batches while fewer than ahead + 1 are made and not released. */
static void stream_prep(struct stream *st)
{
	struct sconn *sc = st->sc;
	unsigned depth = st->m.ahead + 1;
	bool added = false;

	while (!st->stopped && sc->c && st->next_prep < st->nbatches &&
	       st->preparing + st->outstanding < depth) {
		uint64_t q0 = st->next_prep * st->m.batch_size, q1 = q0 + st->m.batch_size;
		struct greq *rq, **tail;
		uint32_t n;

		if (q1 > st->per_rank)
			q1 = st->per_rank;
		n = (uint32_t)(q1 - q0);
		rq = calloc(1, sizeof(*rq) + (size_t)n * sizeof(rq->items[0]));
		if (!rq) {
			stream_stop(st, -ENOMEM, "out of memory");
			return;
		}
		rq->sc = sc;
		rq->request_id = st->request_id;
		rq->h = st->h;
		handle_copy_refs(&rq->h);
		rq->st = st;
		rq->batch_no = st->next_prep++;
		rq->n = n;
		for (uint32_t i = 0; i < n; i++) {
			rq->items[i].rq = rq;
			rq->items[i].index = dmc_stream_index(st->h.items, &st->m, q0 + i);
			rq->items[i].state = GI_NEW;
		}
		for (tail = &sc->reqs; *tail; tail = &(*tail)->next)
			;
		*tail = rq;
		st->preparing++;
		added = true;
	}
	if (added)
		pump_items(sc);
}

/* Batches of at least this many bytes are copied into the arena by two threadpool works:
 * the copy is most of a hot batch's cost, and the loop goes on meanwhile. */
#define COPY_OFFLOAD_MIN (1u << 20)

static void copy_part_work(uv_work_t *w)
{
	struct copy_part *cp = w->data;
	struct greq *rq = cp->st->copying;
	uint8_t *base = cp->st->sc->arena.base;

	for (uint32_t i = cp->from; i < cp->to; i++) {
		struct gitem *gi = &rq->items[i];
		if (!gi->status && !gi->in_region)
			memcpy(base + gi->off, gi_bytes(gi), gi->nbytes);
	}
}

/* The batch's bytes are in the arena: send its event, or drop it when stopped. */
static void stream_batch_copied(struct stream *st, struct greq *rq)
{
	struct sconn *sc = st->sc;

	if (!st->stopped && sc->c) {
		conn_send(sc->c, st->ev, st->ev_len);
		st->sent_off[st->outstanding++] = st->copy_doff;
		st->next_send++;
		sc->s->batches_sent++;
	} else {
		region_release(sc, st->copy_moff); /* its items handed in place, if any */
		arena_free(&sc->arena, st->copy_doff);
		arena_free(&sc->arena, st->copy_moff);
	}
	for (uint32_t i = 0; i < rq->n; i++)
		gi_drop(&rq->items[i]);
	stream_drop_batch(st, rq);
}

static void copy_part_after(uv_work_t *w, int status)
{
	struct copy_part *cp = w->data;
	struct stream *st = cp->st;
	struct sconn *sc = st->sc;
	struct greq *rq = st->copying;

	(void)status;
	if (--st->copies_left)
		return;
	st->copying = NULL;
	stream_batch_copied(st, rq);
	st->pins--;
	stream_send(st); /* the next batch, or the end */
	sc->busy--;
	sconn_maybe_free(sc);
}

/*
 * Sends the ready batches that are next in order and fit in the arena: the event is built
 * and the metadata written here; hot items of a handle with a region are handed there (no
 * copy), the others' tensors copied into the arena, large ones on the threadpool, one batch
 * of a stream at a time, and the event goes out when they are in place.
 */
static void stream_send(struct stream *st)
{
	struct sconn *sc = st->sc;
	struct serve *s = sc->s;
	struct greq *rq;

	if (st->sending || st->copying)
		return;
	st->sending = true;
	st->pins++;
	while (!st->stopped && (rq = st->ready) && rq->batch_no == st->next_send) {
		uint64_t dlen = 0, mlen = 0, doff, moff, dpos, mpos, acc = 0;
		struct dmc_batch_head bh = { .batch = rq->batch_no, .n = rq->n, .uniform = 1 };
		struct dmc_writer w;
		uint32_t split = rq->n;
		int n;

		region_batch_take(rq); /* undone below unless the event goes out */
		for (uint32_t i = 0; i < rq->n; i++) {
			struct gitem *gi = &rq->items[i];
			struct gitem *g0 = &rq->items[0];
			if (gi->status) {
				bh.uniform = 0;
				continue;
			}
			gi->mlen = meta_len(gi);
			mlen += gi->mlen;
			if (gi->desc.dtype != g0->desc.dtype || gi->desc.frames != g0->desc.frames ||
			    gi->desc.channels != g0->desc.channels ||
			    gi->desc.height != g0->desc.height || gi->desc.width != g0->desc.width)
				bh.uniform = 0;
		}
		/* one tensor when uniform: items exactly nbytes apart (each stays aligned to its
		 * element size); otherwise each starts on an ARENA_ALIGN boundary. Items in the
		 * region take no arena space. */
		for (uint32_t i = 0; i < rq->n; i++)
			if (!rq->items[i].status && !rq->items[i].in_region)
				dlen += bh.uniform ? rq->items[i].nbytes : arena_span(rq->items[i].nbytes);
		if (dlen + arena_span(mlen) + ARENA_ALIGN > sc->arena.size) {
			region_batch_undo(rq);
			stream_stop(st, -DMC_E_LIMIT_EXCEEDED,
				    "a batch does not fit in the shared memory: use smaller batches, "
				    "or open with a larger arena");
			break;
		}
		if (!st->ev && !(st->ev = malloc(REPLY_MAX))) {
			region_batch_undo(rq);
			stream_stop(st, -ENOMEM, "out of memory");
			break;
		}
		doff = arena_alloc(&sc->arena, dlen);
		moff = doff == UINT64_MAX ? UINT64_MAX : arena_alloc(&sc->arena, mlen);
		if (moff == UINT64_MAX) {
			char why[MSG_MAX];
			enum room r;
			region_batch_undo(rq); /* taken again when there is room */
			if (doff != UINT64_MAX)
				arena_free(&sc->arena, doff);
			r = make_room(sc, arena_span(dlen) + arena_span(mlen), why, sizeof(why));
			if (r == ROOM_FULL)
				snprintf(why, sizeof(why),
					 "a batch does not fit in the free shared memory: use "
					 "smaller batches, or open with a larger arena");
			if (r != ROOM_WAIT && !client_holds_space(sc))
				stream_stop(st, -DMC_E_LIMIT_EXCEEDED, why);
			else
				s->waits_for_space++; /* backpressure: the growth, or a RELEASE */
			break;
		}
		grow_ahead(sc);
		bh.data_offset = doff;
		bh.data_len = dlen;
		bh.meta_offset = moff;
		bh.meta_len = mlen;
		dmc_frame_begin(&w, st->ev, REPLY_MAX);
		dmc_batch_head_write(&w, &bh);
		dpos = doff;
		mpos = moff;
		for (uint32_t i = 0; i < rq->n; i++) {
			struct gitem *gi = &rq->items[i];
			if (!gi->status) {
				if (!gi->in_region) {
					gi->off = dpos;
					dpos += bh.uniform ? gi->nbytes : arena_span(gi->nbytes);
				}
				gi->moff = mpos;
				meta_write(gi, sc->arena.base + mpos);
				mpos += gi->mlen;
			}
			item_desc_write(&w, gi);
		}
		if (rq->h.flags & DMC_OPEN_REGIONS) /* as in the GET reply */
			for (uint32_t i = 0; i < rq->n; i++)
				dmc_write_u8(&w, rq->items[i].in_region ? 1 : 0);
		n = dmc_frame_end(&w, DMC_OP_STREAM, DMC_FLAG_REPLY | DMC_FLAG_MORE, st->request_id,
				  0);
		if (n <= 0) {
			region_batch_undo(rq);
			arena_free(&sc->arena, doff);
			arena_free(&sc->arena, moff);
			stream_stop(st, -DMC_E_LIMIT_EXCEEDED, "too many items for one batch event");
			break;
		}
		region_batch_pin(rq, moff); /* released with the batch's metadata */
		st->ready = rq->next;
		st->ev_len = (size_t)n;
		st->copy_doff = doff;
		st->copy_moff = moff;
		st->copying = rq;
		/* two halves of the bytes */
		for (uint32_t i = 0; i < rq->n && split == rq->n; i++) {
			if (rq->items[i].status || rq->items[i].in_region)
				continue;
			acc += rq->items[i].nbytes;
			if (2 * acc >= dlen)
				split = i + 1;
		}
		if (dlen >= COPY_OFFLOAD_MIN) {
			st->copies_left = 0;
			sc->busy++;
			st->pins++; /* until the copies are in */
			for (int k = 0; k < 2; k++) {
				struct copy_part *cp = &st->parts[k];
				cp->st = st;
				cp->from = k ? split : 0;
				cp->to = k ? rq->n : split;
				cp->work.data = cp;
				st->copies_left++;
				if (uv_queue_work(s->d.loop, &cp->work, copy_part_work,
						  copy_part_after) != 0) {
					st->copies_left--;
					copy_part_work(&cp->work); /* no thread: copy here */
				}
			}
			if (st->copies_left)
				break; /* copy_part_after() sends it and goes on */
			st->pins--;
			sc->busy--;
		} else {
			struct copy_part whole = { .st = st, .from = 0, .to = rq->n };
			whole.work.data = &whole;
			copy_part_work(&whole.work);
		}
		st->copying = NULL;
		stream_batch_copied(st, rq);
	}
	st->sending = false;
	if (!st->stopped)
		stream_prep(st); /* decoding goes on while a batch is copied */
	st->pins--;
	stream_maybe_end(st);
}

/* A RELEASE freed `off`: a batch of a stream given back? */
void streams_released(struct sconn *sc, uint64_t off)
{
	for (struct stream *st = sc->streams; st; st = st->next)
		for (unsigned i = 0; i < st->outstanding; i++)
			if (st->sent_off[i] == off) {
				st->sent_off[i] = st->sent_off[--st->outstanding];
				return;
			}
}

/* After a RELEASE: streams may send what waited for space, and prepare more. */
void streams_kick(struct sconn *sc)
{
	struct stream *st, *next;

	sc->busy++;
	for (st = sc->streams; st; st = next) {
		st->pins++;
		stream_send(st);
		next = st->next;
		st->pins--;
		stream_maybe_end(st); /* may free st */
	}
	sc->busy--;
}

void on_stream(struct serve *s, struct conn *c, const struct dmc_header *h,
	       const uint8_t *payload)
{
	struct sconn *sc = sconn_of(s, c, false);
	struct dmc_stream_req m;
	struct handle *hd;
	struct stream *st;

	if (dmc_stream_decode(payload, h->length, &m) != DMC_PROTO_OK) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL,
				"malformed STREAM, or a value out of range");
		return;
	}
	hd = sc ? handle_find(sc, m.handle) : NULL;
	if (!hd) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"no open dataset with handle %" PRIu64, m.handle);
		return;
	}
	for (st = sc->streams; st; st = st->next)
		if (st->request_id == h->request_id) {
			conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
					"a stream with this request id runs already");
			return;
		}
	st = calloc(1, sizeof(*st));
	if (!st) {
		conn_send_error(c, h->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	if (m.ahead == 0)
		m.ahead = DMC_STREAM_AHEAD_DEFAULT;
	st->sc = sc;
	st->request_id = h->request_id;
	st->h = *hd;
	handle_copy_refs(&st->h);
	st->m = m;
	dmc_stream_plan(hd->items, &m, &st->per_rank, &st->nbatches);
	st->next = sc->streams;
	sc->streams = st;
	s->streams++;
	log_debug(SERVE, "uid %u streams handle %" PRIu64 ": %" PRIu64 " batches of %u (rank %u/%u)",
		  (unsigned)c->uid, m.handle, st->nbatches, m.batch_size, m.rank, m.world_size);
	sc->busy++;
	st->pins++;
	stream_prep(st);
	st->pins--;
	stream_maybe_end(st); /* an empty epoch ends at once */
	sc->busy--;
}

void on_stop(struct serve *s, struct conn *c, const struct dmc_header *h,
	     const uint8_t *payload)
{
	struct sconn *sc = sconn_of(s, c, false);
	struct dmc_reader r;
	struct stream *st = NULL;
	uint32_t id, stopped = 0;
	uint8_t frame[32];
	struct dmc_writer w;
	int len;

	(void)s;
	dmc_reader_init(&r, payload, h->length);
	id = dmc_read_u32(&r);
	if (dmc_reader_finish(&r)) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed STOP");
		return;
	}
	for (st = sc ? sc->streams : NULL; st && (st->request_id != id || st->stopped);
	     st = st->next)
		;
	if (st) {
		stopped = 1;
		sc->busy++;
		stream_stop(st, 0, NULL); /* its final reply goes out first, or when work ends */
		sc->busy--;
	}
	dmc_frame_begin(&w, frame, sizeof(frame));
	dmc_write_u32(&w, stopped);
	len = dmc_frame_end(&w, DMC_OP_STOP, DMC_FLAG_REPLY, h->request_id, 0);
	if (len > 0)
		conn_send(c, frame, (size_t)len);
}
