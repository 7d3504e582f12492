/* libdmcache (see dmcache.h, dmcache_priv.h): STREAM: an epoch of batches the daemon orders
 * and prepares, their items in the arena or handed in place in the region, RELEASE of a
 * batch, STOP. Used by one thread at a time per client. */
#include "dmcache_priv.h"

struct dmc_stream {
	dmc_dataset *ds;
	uint32_t id;
	struct dmc_stream_req m;
	uint64_t batches;
	struct dmc_item *items; /* batch_size entries */
	bool ended;
	bool stopped;
	uint64_t sent;
};

DMC_EXPORT int dmc_stream_start(dmc_dataset *ds, const struct dmc_stream_args *a,
				dmc_stream **ret_stream)
{
	dmc_client *c = ds->c;
	struct dmc_stream *st;
	uint8_t frame[128];
	uint64_t per_rank;
	int n, rc;

	if (!a || a->world_size == 0 || a->rank >= a->world_size || a->batch_size == 0 ||
	    a->batch_size > DMC_GET_MAX || a->ahead > DMC_STREAM_AHEAD_MAX)
		return -EINVAL;
	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->items = calloc(a->batch_size, sizeof(*st->items));
	if (!st->items) {
		free(st);
		return -ENOMEM;
	}
	st->ds = ds;
	st->id = c->next_id++;
	st->m.handle = ds->handle;
	st->m.seed = a->seed;
	st->m.epoch = a->epoch;
	st->m.flags = (a->shuffle ? DMC_STREAM_SHUFFLE : 0) | (a->drop_last ? DMC_STREAM_DROP_LAST : 0);
	st->m.rank = a->rank;
	st->m.world_size = a->world_size;
	st->m.batch_size = a->batch_size;
	st->m.ahead = a->ahead;
	dmc_stream_plan(ds->info.items, &st->m, &per_rank, &st->batches);
	n = dmc_stream_encode(&st->m, st->id, frame, sizeof(frame));
	rc = send_frame(c, frame, n);
	if (rc < 0) {
		free(st->items);
		free(st);
		return rc;
	}
	*ret_stream = st;
	return 0;
}

DMC_EXPORT uint64_t dmc_stream_batches(const dmc_stream *st)
{
	return st->batches;
}

DMC_EXPORT uint64_t dmc_stream_item(const dmc_stream *st, uint64_t q)
{
	return dmc_stream_index(st->ds->info.items, &st->m, q);
}

DMC_EXPORT int dmc_stream_next(dmc_stream *st, struct dmc_batch *ret)
{
	dmc_client *c = st->ds->c;
	struct dmc_batch_head bh;
	struct dmc_reader r;
	int rc;

	if (st->ended)
		return 0;
	rc = recv_for(c, st->id);
	if (rc < 0) {
		if (rc != -EINTR)
			st->ended = true; /* an ERROR frame is the stream's last; a broken link too */
		return rc;
	}
	if (c->rhdr.opcode != DMC_OP_STREAM)
		goto proto;
	dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
	if (!(c->rhdr.flags & DMC_FLAG_MORE)) {
		st->sent = dmc_read_u64(&r);
		st->stopped = dmc_read_u32(&r) != 0;
		if (dmc_reader_finish(&r))
			goto proto;
		st->ended = true;
		return 0;
	}
	dmc_batch_head_read(&r, &bh);
	if (r.err || bh.n == 0 || bh.n > st->m.batch_size || bh.data_offset > c->arena_size ||
	    bh.data_len > c->arena_size - bh.data_offset || bh.meta_offset > c->arena_size ||
	    bh.meta_len > c->arena_size - bh.meta_offset)
		goto proto;
	rc = read_items(c, st->ds, &r, bh.n, st->items, true);
	if (rc < 0)
		return rc == -EPROTO ? (close_fd(c), rc) : rc;
	memset(ret, 0, sizeof(*ret));
	for (uint32_t i = 0; i < bh.n; i++) {
		const struct dmc_item *it = &st->items[i];
		if (it->status)
			continue;
		if (it->region) /* checked against the region by read_items() */
			ret->in_region++;
		else if (it->offset < bh.data_offset ||
			 it->offset + it->nbytes > bh.data_offset + bh.data_len)
			goto proto;
		if (it->meta_offset < bh.meta_offset ||
		    it->meta_offset + it->meta_len > bh.meta_offset + bh.meta_len)
			goto proto;
	}
	ret->number = bh.batch;
	ret->n = bh.n;
	ret->uniform = bh.uniform != 0;
	/* one block of the arena holds every tensor only when none is in the region */
	ret->data = ret->in_region ? NULL : c->arena + bh.data_offset;
	ret->data_len = bh.data_len;
	ret->data_offset = bh.data_offset;
	ret->meta_offset = bh.meta_offset;
	ret->items = st->items;
	return 1;
proto:
	close_fd(c);
	st->ended = true;
	return -EPROTO;
}

/* RELEASE of a batch's two regions, not waited for: its reply is skipped among the
 * stream's frames. */
static int release_batch(dmc_client *c, uint64_t data_offset, uint64_t meta_offset)
{
	uint64_t offs[2] = { data_offset, meta_offset };
	uint8_t frame[64];

	return send_frame(c, frame, dmc_release_encode(offs, 2, c->next_id++, frame, sizeof(frame)));
}

DMC_EXPORT int dmc_batch_release(dmc_stream *st, const struct dmc_batch *b)
{
	discard_private(st->ds->c, b->data_offset, b->data_len);
	return release_batch(st->ds->c, b->data_offset, b->meta_offset);
}

DMC_EXPORT int dmc_stream_close(dmc_stream *st)
{
	dmc_client *c;
	uint8_t frame[64];
	uint32_t id;
	bool stop_done = false;
	int rc = 0;

	if (!st)
		return 0;
	c = st->ds->c;
	if (!st->ended && c->fd >= 0) {
		id = c->next_id++;
		rc = send_frame(c, frame, dmc_stop_encode(st->id, id, frame, sizeof(frame)));
		/* the STOP reply and the stream's last frames come in either order; batches
		 * still arriving are given back */
		while (rc >= 0 && (!st->ended || !stop_done)) {
			struct dmc_batch_head bh;
			struct dmc_reader r;

			rc = recv_frame(c);
			if (rc < 0 || !(c->rhdr.flags & DMC_FLAG_REPLY)) {
				rc = rc < 0 ? rc : -EPROTO;
				close_fd(c);
				break;
			}
			if (c->rhdr.request_id == id) {
				stop_done = true;
				if (c->rhdr.opcode != DMC_OP_STOP && c->rhdr.opcode != DMC_OP_ERROR) {
					rc = -EPROTO;
					close_fd(c);
				}
			} else if (c->rhdr.request_id == st->id) {
				if (c->rhdr.opcode == DMC_OP_ERROR ||
				    !(c->rhdr.flags & DMC_FLAG_MORE)) {
					st->ended = true;
					continue;
				}
				dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
				dmc_batch_head_read(&r, &bh);
				if (r.err) {
					rc = -EPROTO;
					close_fd(c);
					break;
				}
				rc = release_batch(c, bh.data_offset, bh.meta_offset);
			}
		}
	}
	if (rc >= 0 && c->fd >= 0) {
		/* a round trip: every RELEASE sent before it is done when this returns */
		id = c->next_id++;
		rc = call(c, frame, dmc_release_encode(NULL, 0, id, frame, sizeof(frame)), id,
			  DMC_OP_RELEASE);
	}
	free(st->items);
	free(st);
	return rc < 0 ? rc : 0;
}
