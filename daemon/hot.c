/* The hot set of decoded tensors: see hot.h. Loop thread only. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "hot.h"

static size_t hot_hash(const uint8_t *raw, int64_t opts, size_t nb)
{
	uint64_t k;

	memcpy(&k, raw, sizeof(k));
	k ^= (uint64_t)opts * 0x9e3779b97f4a7c15ull;
	return (size_t)(k & (nb - 1));
}

static size_t hot_slot(const struct hot *h, const uint8_t *raw, int64_t opts)
{
	return hot_hash(raw, opts, h->nb);
}

static void hot_lru_unlink(struct hot *h, struct hot_entry *e)
{
	if (e->newer)
		e->newer->older = e->older;
	else
		h->newest = e->older;
	if (e->older)
		e->older->newer = e->newer;
	else
		h->oldest = e->newer;
	e->newer = e->older = NULL;
}

static void hot_lru_front(struct hot *h, struct hot_entry *e)
{
	e->older = h->newest;
	e->newer = NULL;
	if (h->newest)
		h->newest->newer = e;
	h->newest = e;
	if (!h->oldest)
		h->oldest = e;
}

static void hot_remove(struct hot *h, struct hot_entry *e)
{
	struct hot_entry **pp = &h->b[hot_slot(h, e->raw, e->opts)];

	while (*pp != e)
		pp = &(*pp)->hnext;
	*pp = e->hnext;
	hot_lru_unlink(h, e);
	h->n--;
	h->bytes -= e->nbytes + e->dlen;
	free(e->buf);
	free(e);
}

/* A referenced entry for (raw, opts), or NULL. */
/* The entry for (raw, opts), or NULL; nothing counted or moved. */
static struct hot_entry *hot_find(const struct hot *h, const uint8_t *raw, int64_t opts)
{
	struct hot_entry *e = NULL;

	if (h->nb)
		for (e = h->b[hot_slot(h, raw, opts)]; e; e = e->hnext)
			if (e->opts == opts && memcmp(e->raw, raw, STORE_DIGEST_SIZE) == 0)
				break;
	return e;
}

struct hot_entry *hot_get(struct hot *h, const uint8_t *raw, int64_t opts)
{
	struct hot_entry *e = hot_find(h, raw, opts);

	if (!e) {
		h->misses++;
		return NULL;
	}
	h->hits++;
	e->refs++;
	hot_lru_unlink(h, e);
	hot_lru_front(h, e);
	return e;
}

struct hot_entry *hot_get_quiet(struct hot *h, const uint8_t *raw, int64_t opts)
{
	return hot_find(h, raw, opts) ? hot_get(h, raw, opts) : NULL;
}

void hot_unref(struct hot *h, struct hot_entry *e)
{
	e->refs--;
	/* over budget only while everything was referenced: catch up now */
	while (h->bytes > h->max && h->oldest && !h->oldest->refs) {
		h->evictions++;
		hot_remove(h, h->oldest);
	}
}

static int hot_grow(struct hot *h)
{
	size_t nb = h->nb ? h->nb * 2 : 1024;
	struct hot_entry **b = calloc(nb, sizeof(*b));

	if (!b)
		return -ENOMEM;
	for (size_t i = 0; i < h->nb; i++) {
		for (struct hot_entry *e = h->b[i], *next; e; e = next) {
			size_t k = hot_hash(e->raw, e->opts, nb);
			next = e->hnext;
			e->hnext = b[k];
			b[k] = e;
		}
	}
	free(h->b);
	h->b = b;
	h->nb = nb;
	return 0;
}

/*
 * Takes `buf` (tensor + header JSON) into the hot set and returns the entry, referenced;
 * NULL when it does not fit (the caller keeps `buf`). Items over an eighth of the budget
 * stay out: they would push out many others.
 */
struct hot_entry *hot_adopt(struct hot *h, const uint8_t *raw, int64_t opts,
			    uint8_t *buf, uint64_t nbytes, uint64_t dlen,
			    const struct decode_desc *desc)
{
	uint64_t need = nbytes + dlen;
	struct hot_entry *e;
	size_t k;

	if (!h->max || need > h->max / 8)
		return NULL;
	if (hot_find(h, raw, opts))
		return NULL; /* decoded twice at once (two clients): keep the first */
	while (h->bytes + need > h->max && h->oldest && !h->oldest->refs) {
		h->evictions++;
		hot_remove(h, h->oldest);
	}
	if (h->bytes + need > h->max)
		return NULL;
	if (h->n >= h->nb && hot_grow(h) < 0)
		return NULL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	memcpy(e->raw, raw, STORE_DIGEST_SIZE);
	e->opts = opts;
	e->buf = buf;
	e->nbytes = nbytes;
	e->dlen = dlen;
	e->desc = *desc;
	e->refs = 1;
	k = hot_slot(h, raw, opts);
	e->hnext = h->b[k];
	h->b[k] = e;
	hot_lru_front(h, e);
	h->n++;
	h->bytes += need;
	h->inserts++;
	return e;
}

uint64_t hot_set_max(struct hot *h, uint64_t max, uint64_t *ret_bytes)
{
	uint64_t n = 0, bytes = 0;

	h->max = max;
	for (struct hot_entry *e = h->oldest, *newer; e && h->bytes > h->max; e = newer) {
		newer = e->newer;
		if (e->refs)
			continue;
		n++;
		bytes += e->nbytes + e->dlen;
		h->evictions++;
		hot_remove(h, e);
	}
	if (ret_bytes)
		*ret_bytes = bytes;
	return n;
}

void hot_done(struct hot *h)
{
	while (h->oldest)
		hot_remove(h, h->oldest);
	free(h->b);
	memset(h, 0, sizeof(*h));
}
