/*
 * serve's arenas and fair shares (see serve.h): what each uid holds over all its
 * connections (struct share: committed shared memory, items in flight) and the caps that
 * bind; a connection's arena made at its first OPEN (or taken from the pool), grown ahead
 * of the allocator by faulting pages in on the threadpool (one growth per uid at a time),
 * and pooled or unmapped on the threadpool when the connection's state goes. The
 * allocator itself is arena.c.
 *
 * The pool: a closed connection's arena, its pages still in, is kept for the next
 * connection of THE SAME UID that asks for an arena of the same size (a DataLoader's
 * workers, restarted every epoch, each connect and OPEN anew): that connection's OPEN
 * then costs no memfd and its first items no page faults. An arena never goes to another
 * uid: it may still hold bytes its uid was sent. Pooled arenas stay counted in their
 * uid's share and in shm_max; at most ARENA_POOL_PER_UID per uid and ARENA_POOL_MAX in
 * all, each at most ARENA_POOL_MAX_SHM committed, unmapped after ARENA_POOL_IDLE_MS
 * unused (serve_tick) or at once when a cap would refuse a growth or an arena.
 * Loop thread; grow_run() and arena_drop_work() run on the threadpool and touch only their
 * work structure.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "conf.h"
#include "conn.h"
#include "log.h"
#include "serve_priv.h"

/* An arena grows by a quarter of its size, within these bounds (and at least what the item
 * needs): large enough that page faults are paid in a few threadpool works, small enough
 * that an idle connection commits little and that one growth holds a threadpool thread
 * for tens of milliseconds, not hundreds. One growth of a uid runs at a time, whatever
 * its number of connections: the other threads stay for other users' work. */
#define GROW_MIN (8ull << 20)
#define GROW_MAX (32ull << 20)
/* The first chunk, faulted in while the OPEN is answered, is small: a connection's first
 * request (an item's metadata, a hot item handed in place, a small tensor) then finds it
 * ready instead of waiting for GROW_MIN's page faults (about 3 ms); the next chunk is
 * faulted in as soon as that one is in use. */
#define GROW_FIRST (1ull << 20)
#define ARENA_POOL_PER_UID 2
#define ARENA_POOL_MAX 16
#define ARENA_POOL_IDLE_MS 15000
/* an arena that committed more goes: a large one is the exception, its pages worth more
 * to the others than its memfd to its uid */
#define ARENA_POOL_MAX_SHM (32ull << 20)

struct pooled_arena {
	struct arena a;
	struct share *sh; /* holds a reference */
	uint64_t shm;     /* its committed bytes, still counted */
	uint64_t since;   /* uv_now() when pooled */
	struct pooled_arena *next;
};
/* Growths are whole pages (of 4 KiB: with larger pages, arena_populate() falls back to
 * fallocate, which takes any range). */
#define PAGE 4096u

/* ---- fair shares: what each uid holds ---- */

struct share *share_get(struct serve *s, uid_t uid)
{
	struct share *sh;

	for (sh = s->shares; sh; sh = sh->next)
		if (sh->uid == uid)
			break;
	if (!sh) {
		sh = calloc(1, sizeof(*sh));
		if (!sh)
			return NULL;
		sh->uid = uid;
		sh->next = s->shares;
		s->shares = sh;
	}
	sh->refs++;
	return sh;
}

static void share_put(struct serve *s, struct share *sh)
{
	struct share **pp;

	if (!sh || --sh->refs)
		return;
	for (pp = &s->shares; *pp != sh; pp = &(*pp)->next)
		;
	*pp = sh->next;
	free(sh);
}

/* Whether the uid may start another item (decode_max_per_uid); remembers who waits. */
bool share_may_start(struct share *sh, const struct config *cfg)
{
	if (sh->inflight < cfg->decode_max_per_uid)
		return true;
	sh->starved = true;
	return false;
}

/* A place of the uid came free: its other connections that waited for one go on. */
void share_wake(struct serve *s, struct share *sh, struct sconn *except)
{
	if (!sh->starved || sh->inflight >= s->d.cfg->decode_max_per_uid)
		return;
	sh->starved = false;
	sh->refs++;
	for (struct sconn *o = s->conns, *next; o; o = next) {
		next = o->next;
		if (o->sh == sh && o != except && o->c)
			pump_items(o); /* never frees o: it is open */
	}
	share_put(s, sh);
}

static const char *size_text(uint64_t n, char *buf, size_t len)
{
	if (n >= 1ull << 30)
		snprintf(buf, len, "%.1f GiB", (double)n / (1ull << 30));
	else if (n >= 1ull << 20)
		snprintf(buf, len, "%.1f MiB", (double)n / (1ull << 20));
	else
		snprintf(buf, len, "%" PRIu64 " bytes", n);
	return buf;
}

static void shm_uncount(struct serve *s, struct share *sh, uint64_t shm);

/* ---- the pool of closed connections' arenas ---- */

static void pool_drop(struct serve *s, struct pooled_arena **pp)
{
	struct pooled_arena *pa = *pp;

	*pp = pa->next;
	s->n_pool--;
	/* on the loop: the pool is trimmed when a cap binds, and the bytes must be free now */
	arena_done(&pa->a);
	shm_uncount(s, pa->sh, pa->shm);
	free(pa);
}

void arena_pool_expire(struct serve *s, bool all)
{
	uint64_t now = uv_now(s->d.loop);

	for (struct pooled_arena **pp = &s->pool; *pp;)
		if (all || now - (*pp)->since >= ARENA_POOL_IDLE_MS)
			pool_drop(s, pp);
		else
			pp = &(*pp)->next;
}

uint64_t arena_pool_bytes(const struct serve *s)
{
	uint64_t n = 0;

	for (const struct pooled_arena *pa = s->pool; pa; pa = pa->next)
		n += pa->shm;
	return n;
}

/* A cap binds: every pooled arena goes (they are what nobody uses). Whether any went. */
static bool pool_trim(struct serve *s)
{
	bool any = s->pool != NULL;

	arena_pool_expire(s, true);
	return any;
}

/* The pooled arena of the connection's uid of `size` bytes, taken; false when none. */
static bool pool_take(struct sconn *sc, uint64_t size)
{
	struct serve *s = sc->s;

	for (struct pooled_arena **pp = &s->pool; *pp; pp = &(*pp)->next) {
		struct pooled_arena *pa = *pp;
		if (pa->sh != sc->sh || pa->a.size != size)
			continue;
		*pp = pa->next;
		s->n_pool--;
		s->pool_hits++;
		sc->arena = pa->a;
		sc->shm = pa->shm; /* the bytes move from the pool to the connection */
		sc->has_arena = true;
		share_put(s, pa->sh); /* the connection holds its own reference */
		free(pa);
		return true;
	}
	return false;
}

void arena_retire(struct sconn *sc)
{
	struct serve *s = sc->s;
	struct pooled_arena *pa;
	unsigned mine = 0;

	for (pa = s->pool; pa; pa = pa->next)
		mine += pa->sh == sc->sh;
	if (s->closing || !sc->has_arena || !sc->arena.base || !sc->arena.grown ||
	    sc->grow_err || sc->shm > ARENA_POOL_MAX_SHM || mine >= ARENA_POOL_PER_UID ||
	    s->n_pool >= ARENA_POOL_MAX ||
	    !(pa = malloc(sizeof(*pa)))) {
		arena_release(s, &sc->arena, sc->sh, sc->shm);
		return;
	}
	arena_reset(&sc->arena);
	pa->a = sc->arena;
	pa->sh = sc->sh; /* the connection's reference passes to the pool */
	pa->shm = sc->shm;
	pa->since = uv_now(s->d.loop);
	pa->next = s->pool;
	s->pool = pa;
	s->n_pool++;
	memset(&sc->arena, 0, sizeof(sc->arena));
	sc->arena.fd = -1;
}

/* The shared memory the connection's uid may still commit; the cap that binds, in `why`. */
static uint64_t shm_room(const struct sconn *sc, char *why, size_t len)
{
	const struct serve *s = sc->s;
	const struct config *cfg = s->d.cfg;
	uint64_t uid_room = sc->sh->shm < cfg->shm_max_per_uid ? cfg->shm_max_per_uid - sc->sh->shm
							       : 0;
	uint64_t all_room = s->shm_total < cfg->shm_max ? cfg->shm_max - s->shm_total : 0;
	char num[32];

	if (uid_room <= all_room) {
		snprintf(why, len,
			 "shm_max_per_uid (%s) reached for uid %u: release items, close other "
			 "connections, or open with a smaller arena",
			 size_text(cfg->shm_max_per_uid, num, sizeof(num)), (unsigned)sc->sh->uid);
		return uid_room;
	}
	snprintf(why, len, "shm_max (%s) reached: the shared memory of all users is in use",
		 size_text(cfg->shm_max, num, sizeof(num)));
	return all_room;
}

/* ---- the arena's growth: pages faulted in on the threadpool, ahead of the allocator ---- */

struct grow_work {
	uv_work_t work;
	struct sconn *sc;
	int fd;
	uint8_t *base;
	uint64_t from, len;
	int rc;
};

static void grow_run(uv_work_t *w)
{
	struct grow_work *gw = w->data;

	gw->rc = arena_populate(gw->fd, gw->base, gw->from, gw->len);
}

static void grow_after(uv_work_t *w, int status)
{
	struct grow_work *gw = w->data;
	struct sconn *sc = gw->sc;
	int rc = status < 0 ? status : gw->rc;

	sc->growing = false;
	sc->sh->growing = false;
	if (rc == 0)
		rc = arena_extend(&sc->arena, gw->from + gw->len);
	if (rc < 0) {
		/* the bytes stay counted: some pages may be in; the arena grows no more */
		sc->grow_err = rc;
		log_warn(SERVE, "uid %u: cannot fault in %" PRIu64 " bytes of shared memory: %s",
			    (unsigned)sc->sh->uid, gw->len, strerror(-rc));
	}
	free(gw);
	if (sc->c) {
		retry_space(sc);
		streams_kick(sc);
	}
	/* the uid's other arenas that waited for their turn to grow */
	for (struct sconn *o = sc->s->conns, *next; o && !sc->sh->growing; o = next) {
		next = o->next;
		if (o->sh == sc->sh && o->grow_wanted && o->c) {
			o->grow_wanted = false;
			retry_space(o);
			streams_kick(o);
		}
	}
	sc->busy--;
	sconn_maybe_free(sc);
}

/* Starts faulting in `len` more bytes (page multiple, within the caps: counted now). */
static int grow_start(struct sconn *sc, uint64_t len)
{
	struct serve *s = sc->s;
	struct grow_work *gw = calloc(1, sizeof(*gw));

	if (!gw)
		return -ENOMEM;
	gw->sc = sc;
	gw->fd = sc->arena.fd;
	gw->base = sc->arena.base;
	gw->from = sc->arena.grown;
	gw->len = len;
	gw->work.data = gw;
	if (uv_queue_work(s->d.loop, &gw->work, grow_run, grow_after) != 0) {
		free(gw);
		return -ENOMEM;
	}
	sc->busy++;
	sc->growing = true;
	sc->sh->growing = true;
	sc->shm += len;
	sc->sh->shm += len;
	s->shm_total += len;
	return 0;
}

/* The next growth of the arena: a quarter of what it has, within GROW_MIN..GROW_MAX, at
 * least `need`, at most what is left of it and what the caps allow (`room`). */
static uint64_t grow_len(const struct arena *a, uint64_t need, uint64_t room)
{
	uint64_t len = a->grown / 4 / PAGE * PAGE;

	len = len < GROW_MIN ? GROW_MIN : len > GROW_MAX ? GROW_MAX : len;
	if (a->grown == 0)
		len = GROW_FIRST;
	if (len < need)
		len = need;
	if (len > a->size - a->grown)
		len = a->size - a->grown;
	if (len > room)
		len = room / PAGE * PAGE;
	return len;
}

/*
 * The arena has no free span for `len` bytes: grows it if it may. Never blocks and never
 * faults a page on the loop; the items wait for the growth like for a RELEASE.
 */
enum room make_room(struct sconn *sc, uint64_t len, char *why, size_t whylen)
{
	struct arena *a = &sc->arena;
	uint64_t need = (arena_grow_need(a, len) + PAGE - 1) / PAGE * PAGE, room;

	if (sc->growing)
		return ROOM_WAIT;
	if (need == 0 || need > a->size - a->grown)
		return ROOM_FULL;
	if (sc->sh->growing) {
		sc->grow_wanted = true; /* its turn comes when that growth ends */
		return ROOM_WAIT;
	}
	if (sc->grow_err) {
		snprintf(why, whylen, "cannot fault in shared memory: %s", strerror(-sc->grow_err));
		return ROOM_CAPPED;
	}
	room = shm_room(sc, why, whylen);
	if (need > room && pool_trim(sc->s))
		room = shm_room(sc, why, whylen);
	if (need > room) {
		sc->s->shm_refusals++;
		return ROOM_CAPPED;
	}
	if (grow_start(sc, grow_len(a, need, room)) < 0) {
		snprintf(why, whylen, "out of memory");
		return ROOM_CAPPED;
	}
	return ROOM_WAIT;
}

/* After an allocation: when little is left free in what has grown, the next chunk is
 * faulted in now, so that items seldom wait for it. Within the caps, silently. */
void grow_ahead(struct sconn *sc)
{
	struct arena *a = &sc->arena;
	char why[MSG_MAX];
	uint64_t len, room;

	if (sc->growing || sc->sh->growing || sc->grow_err || !sc->c || a->grown >= a->size ||
	    a->grown - a->used >= GROW_MIN / 2)
		return;
	room = shm_room(sc, why, sizeof(why));
	len = grow_len(a, PAGE, room);
	if (len >= PAGE)
		grow_start(sc, len);
}

/* The connection's arena: sealed, sparse, mapped (tens of microseconds, on the loop: no
 * threadpool queue between an OPEN and its reply); its first chunk faults in meanwhile. */
int arena_make(struct sconn *sc, uint64_t want, char *why, size_t whylen)
{
	const struct config *cfg = sc->s->d.cfg;
	uint64_t room = shm_room(sc, why, whylen), size;
	int rc;

	if (want > cfg->arena_max)
		want = cfg->arena_max;
	/* no arena larger than its uid may ever commit */
	if (want > cfg->shm_max_per_uid)
		want = cfg->shm_max_per_uid;
	if (want < (1u << 20))
		want = 1u << 20;
	size = (want + PAGE - 1) / PAGE * PAGE;
	if (pool_take(sc, size)) {
		grow_ahead(sc);
		return 0;
	}
	if (room < (size < GROW_MIN ? size : GROW_MIN) && pool_trim(sc->s))
		room = shm_room(sc, why, whylen);
	if (room < (size < GROW_MIN ? size : GROW_MIN)) {
		sc->s->shm_refusals++;
		return -DMC_E_LIMIT_EXCEEDED;
	}
	rc = arena_init(&sc->arena, size);
	if (rc < 0) {
		snprintf(why, whylen, "cannot set up %" PRIu64 " bytes of shared memory: %s", size,
			 strerror(-rc));
		return -DMC_E_OVERLOADED;
	}
	sc->has_arena = true;
	grow_ahead(sc);
	return 0;
}

/* Unmapping a large arena takes tens of milliseconds: done on the threadpool. Its
 * committed bytes stay counted until then. */
struct arena_drop {
	uv_work_t work;
	struct serve *s;
	uint64_t size; /* a.size, which arena_done() clears */
	struct share *sh;
	uint64_t shm;
	struct arena a;
};

/* The arena's pages are gone from the daemon: its uid's share goes down. */
static void shm_uncount(struct serve *s, struct share *sh, uint64_t shm)
{
	sh->shm -= shm;
	s->shm_total -= shm;
	share_put(s, sh);
}

static void arena_drop_work(uv_work_t *w)
{
	struct arena_drop *ad = w->data;

	arena_done(&ad->a);
}

static void arena_drop_after(uv_work_t *w, int status)
{
	struct arena_drop *ad = w->data;
	struct serve *s = ad->s;

	(void)status;
	s->drops--;
	s->arena_dropping -= ad->size;
	shm_uncount(s, ad->sh, ad->shm);
	free(ad);
	serve_maybe_destroy(s);
}

void arena_release(struct serve *s, struct arena *a, struct share *sh, uint64_t shm)
{
	struct arena_drop *ad = a->base ? malloc(sizeof(*ad)) : NULL;

	if (ad) {
		ad->a = *a;
		ad->s = s;
		ad->size = a->size;
		ad->sh = sh;
		ad->shm = shm;
		ad->work.data = ad;
		if (uv_queue_work(s->d.loop, &ad->work, arena_drop_work, arena_drop_after) == 0) {
			s->drops++;
			s->arena_dropping += a->size;
			memset(a, 0, sizeof(*a));
			a->fd = -1;
			return;
		}
		free(ad);
	}
	arena_done(a);
	shm_uncount(s, sh, shm);
}
