/* libdmcache (see dmcache.h, dmcache_priv.h): serving: OPEN (the arena and the regions it
 * passes, mapped here), dataset handles, GET and its items checked against the arena or the
 * region, RELEASE, private views of region items (dmc_item_map()). Used by one thread at a
 * time per client; dmc_view_detach() and dmc_view_unmap() touch no client. */
#include "dmcache_priv.h"

static char *strs_dup3(struct dmc_str a, struct dmc_str b, struct dmc_str d, const char **pa,
		       const char **pb, const char **pd)
{
	char *buf = malloc((size_t)a.len + b.len + d.len + 3), *p;

	if (!buf)
		return NULL;
	p = buf;
	*pa = p;
	memcpy(p, a.ptr, a.len);
	p += a.len;
	*p++ = '\0';
	*pb = p;
	memcpy(p, b.ptr, b.len);
	p += b.len;
	*p++ = '\0';
	*pd = p;
	memcpy(p, d.ptr, d.len);
	p[d.len] = '\0';
	return buf;
}

/*
 * The region an OPEN reply names (proto.h "Regions"): one the client has, or the one passed
 * with it as `fd` (taken: kept or closed), mapped read-only and shared. *ret_rg NULL when
 * the reply names none.
 */
static int take_region(dmc_client *c, const struct dmc_open_reply *r, int fd,
		       const struct dmc_region **ret_rg)
{
	struct dmc_region *nr;
	void *p;

	*ret_rg = NULL;
	if (!r->region_id) {
		if (fd >= 0)
			close(fd);
		return fd >= 0 ? -EPROTO : 0;
	}
	for (uint32_t i = 0; i < c->n_regions; i++)
		if (c->regions[i].id == r->region_id) {
			if (fd >= 0) {
				close(fd);
				return -EPROTO; /* passed twice */
			}
			*ret_rg = &c->regions[i];
			return 0;
		}
	if (fd < 0 || r->region_bytes == 0 || r->region_bytes > (1ull << 44)) {
		if (fd >= 0)
			close(fd);
		return -EPROTO;
	}
	nr = realloc(c->regions, (c->n_regions + 1) * sizeof(*nr));
	if (!nr) {
		close(fd);
		return -ENOMEM;
	}
	c->regions = nr;
	/* read-only: the daemon's tensors, shared by every client of the snapshot; the
	 * descriptor allows nothing else */
	p = mmap(NULL, r->region_bytes, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		int e = -errno;
		close(fd);
		return e;
	}
	nr[c->n_regions] = (struct dmc_region){ r->region_id, r->region_bytes, p, fd };
	*ret_rg = &nr[c->n_regions++];
	return 0;
}

DMC_EXPORT int dmc_open(dmc_client *c, const struct dmc_open_args *args,
			struct dmc_dataset **ret_dataset)
{
	return dmc_open_policy(c, args, NULL, ret_dataset);
}

static int open_once(dmc_client *c, const struct dmc_open_args *args,
		     const struct dmc_policy *policy, struct dmc_dataset **ret_dataset);

DMC_EXPORT int dmc_open_policy(dmc_client *c, const struct dmc_open_args *args,
			       const struct dmc_policy *policy, struct dmc_dataset **ret_dataset)
{
	int rc = open_once(c, args, policy, ret_dataset);

	if (rc == -DMC_E_PROTOCOL && (args->flags & DMC_OPEN_REGIONS) && c->fd >= 0) {
		/* a daemon older than regions refuses the flag (undefined bits): without it,
		 * every item comes in the arena */
		struct dmc_open_args plain = *args;
		plain.flags &= ~DMC_OPEN_REGIONS;
		rc = open_once(c, &plain, policy, ret_dataset);
	}
	return rc;
}

static int open_once(dmc_client *c, const struct dmc_open_args *args,
		     const struct dmc_policy *policy, struct dmc_dataset **ret_dataset)
{
	struct dmc_open m = { 0 };
	struct dmc_open_reply r;
	struct dmc_dataset *ds;
	const struct dmc_region *rg = NULL;
	uint8_t *frame;
	size_t cap;
	uint32_t id = c->next_id++;
	int n, rc, fd, fd2, json_fd;

#define STR(x) ((struct dmc_str){ (x) ? (x) : "", (x) ? (uint32_t)strlen(x) : 0 })
	m.source = args->source;
	m.flags = args->flags;
	m.dtype = args->dtype;
	m.project = STR(args->project);
	m.version = STR(args->version);
	m.server = STR(args->server);
	m.api_key = STR(args->api_key);
	m.arena_bytes = args->arena_bytes;
	if (policy && policy->ops) {
		if (dmc_policy_check(policy) != DMC_PROTO_OK) {
			set_local_error(c, 0, "invalid uniformity policy");
			return -EINVAL;
		}
		m.flags |= DMC_OPEN_POLICY;
		m.policy = *policy;
	}
#undef STR
	cap = 128 + sizeof(struct dmc_policy) * 2 + m.project.len + m.version.len + m.server.len + m.api_key.len;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	n = dmc_open_encode(&m, id, frame, cap);
	if (m.source == DMC_SOURCE_LOCAL && n > 0) {
		/* the daemon reads the folder through our descriptors, until dmc_dataset_close */
		if (!args->project || args->project[0] != '/') {
			set_local_error(c, 0, "a local source is an absolute directory path");
			rc = -EINVAL;
		} else {
			rc = feed_add(c, id, args->project, false, &json_fd);
		}
		if (rc == 0) {
			dmc_frame_set_nfds(frame, (size_t)n, 1);
			rc = send_frame_fds(c, frame, (size_t)n, &json_fd, 1);
			close(json_fd);
			if (rc == 0)
				rc = recv_reply(c, id, DMC_OP_OPEN);
			if (rc < 0)
				feed_remove(c, id);
		}
	} else {
		rc = call(c, frame, n, id, DMC_OP_OPEN);
	}
	explicit_bzero(frame, cap); /* it held the key */
	free(frame);
	fd = c->passed_fd;
	fd2 = c->passed_fd2;
	c->passed_fd = c->passed_fd2 = -1;
	if (rc == 0 && (dmc_open_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r) ||
			r.regions != ((m.flags & DMC_OPEN_REGIONS) != 0)))
		rc = -EPROTO;
	if (rc == 0 && c->arena) {
		/* no arena passed again: a descriptor is the region's */
		if (fd2 >= 0)
			rc = -EPROTO;
		else
			rc = take_region(c, &r, fd, &rg);
		fd = -1;
	} else if (rc == 0) {
		rc = take_region(c, &r, fd2, &rg);
		fd2 = -1;
	}
	if (rc < 0) {
		if (fd >= 0)
			close(fd);
		if (fd2 >= 0)
			close(fd2);
		return rc;
	}
	if (fd >= 0) {
		/* the arena, once per connection, copy-on-write: the seals forbid a writable
		 * shared mapping, a private one is allowed. Pages read are the daemon's; a page
		 * the caller writes becomes the caller's own copy (in-place ops on a batch touch
		 * nobody else) until the release of its range discards it (discard_private). */
		void *p;
		if (c->arena || r.arena_bytes == 0 || r.arena_bytes > (1ull << 44)) {
			close(fd);
			return -EPROTO;
		}
		/* The daemon faults in every page before it places an item there (the arena
		 * grows on demand): faults here only map them, with fault-around, about 0.3 us a
		 * page, so no populate (which would commit the whole, mostly unused, arena). */
		p = mmap(NULL, r.arena_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) {
			rc = -errno;
			close(fd);
			return rc;
		}
		c->arena = p;
		c->arena_size = r.arena_bytes;
		c->arena_fd = fd;
	} else if (!c->arena) {
		return -EPROTO;
	}
	ds = calloc(1, sizeof(*ds));
	if (!ds)
		return -ENOMEM;
	ds->strings = strs_dup3(r.project_id, r.project_name, r.version, &ds->info.project_id,
				&ds->info.project_name, &ds->info.version);
	if (!ds->strings) {
		free(ds);
		return -ENOMEM;
	}
	ds->c = c;
	ds->handle = r.handle;
	ds->regions = r.regions;
	ds->rg_base = rg ? rg->base : NULL;
	ds->rg_size = rg ? rg->size : 0;
	ds->rg_fd = rg ? rg->fd : -1;
	ds->feed_id = m.source == DMC_SOURCE_LOCAL ? id : 0;
	ds->info.snapshot_id = r.snapshot_id;
	ds->info.items = r.items;
	ds->info.arena_bytes = c->arena_size;
	*ret_dataset = ds;
	return 0;
}

DMC_EXPORT const struct dmc_dataset_info *dmc_dataset_info(const struct dmc_dataset *ds)
{
	return &ds->info;
}

DMC_EXPORT int dmc_dataset_close(struct dmc_dataset *ds)
{
	uint8_t frame[64];
	uint32_t id;
	int rc = 0;

	if (!ds)
		return 0;
	if (ds->c->fd >= 0) {
		id = ds->c->next_id++;
		rc = call(ds->c, frame, dmc_close_encode(ds->handle, id, frame, sizeof(frame)), id,
			  DMC_OP_CLOSE);
	}
	if (ds->feed_id)
		feed_remove(ds->c, ds->feed_id);
	free(ds->strings);
	free(ds);
	return rc;
}

/*
 * Reads n item records from `r` (which must then be consumed) into ret_items, checking every
 * descriptor against the arena (or the region of `ds`, for a tensor handed there) before it
 * becomes a pointer. With regions on `ds`, n in_region flags follow the records; in a
 * STREAM batch (`stream`) they may be absent (a daemon older than batches handed in place:
 * every item is in the arena). Messages live in c->item_msgs.
 */
int read_items(dmc_client *c, const struct dmc_dataset *ds, struct dmc_reader *r,
		      uint32_t n, struct dmc_item *ret_items, bool stream)
{
	size_t msgs = 0;
	bool flags = ds && ds->regions;

	if (c->items_cap < n) {
		struct dmc_item_desc *ni = realloc(c->items, n * sizeof(*ni));
		if (!ni)
			return -ENOMEM;
		c->items = ni;
		uint8_t *nf = realloc(c->in_region, n);
		if (!nf)
			return -ENOMEM;
		c->in_region = nf;
		c->items_cap = n;
	}
	for (uint32_t i = 0; i < n; i++) {
		dmc_item_desc_read(r, &c->items[i]);
		msgs += c->items[i].message.len + 1;
	}
	if (flags && stream && !r->err && r->pos == r->len)
		flags = false;
	for (uint32_t i = 0; i < n; i++)
		c->in_region[i] = flags ? dmc_read_u8(r) : 0;
	if (dmc_reader_finish(r))
		return -EPROTO;
	if (msgs > c->item_msgs_cap) {
		char *nm = realloc(c->item_msgs, msgs);
		if (!nm)
			return -ENOMEM;
		c->item_msgs = nm;
		c->item_msgs_cap = msgs;
	}
	msgs = 0;
	for (uint32_t i = 0; i < n; i++) {
		const struct dmc_item_desc *d = &c->items[i];
		struct dmc_item *it = &ret_items[i];
		memset(it, 0, sizeof(*it));
		it->index = d->index;
		it->status = d->status ? -(int)d->status : 0;
		memcpy(c->item_msgs + msgs, d->message.ptr, d->message.len);
		c->item_msgs[msgs + d->message.len] = '\0';
		it->message = c->item_msgs + msgs;
		msgs += d->message.len + 1;
		if (d->status)
			continue;
		const uint8_t *base = c->in_region[i] ? ds->rg_base : c->arena;
		uint64_t size = c->in_region[i] ? ds->rg_size : c->arena_size;
		if (c->in_region[i] > 1 || !base)
			return -EPROTO;
		if (d->ndim != 4 || !dmc_dtype_size(d->dtype) || d->offset > size ||
		    d->nbytes > size - d->offset || d->meta_offset > c->arena_size ||
		    d->meta_len > c->arena_size - d->meta_offset ||
		    d->shape[0] * d->shape[1] * d->shape[2] * d->shape[3] * dmc_dtype_size(d->dtype) !=
			    d->nbytes)
			return -EPROTO;
		it->dtype = d->dtype;
		it->ndim = d->ndim;
		memcpy(it->shape, d->shape, sizeof(it->shape));
		it->data = base + d->offset;
		it->region = c->in_region[i];
		it->nbytes = d->nbytes;
		it->offset = d->offset;
		it->meta = (const char *)c->arena + d->meta_offset;
		it->meta_len = d->meta_len;
		it->meta_offset = d->meta_offset;
	}
	return 0;
}

DMC_EXPORT int dmc_get(struct dmc_dataset *ds, const uint64_t *indices, uint32_t n,
		       struct dmc_item *ret_items)
{
	dmc_client *c = ds->c;
	struct dmc_reader r;
	uint8_t *frame;
	size_t cap = 64 + (size_t)n * 8;
	uint32_t id = c->next_id++, count;
	int len, rc;

	if (n == 0 || n > DMC_GET_MAX)
		return -EINVAL;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	len = dmc_get_encode(ds->handle, indices, n, id, frame, cap);
	rc = call(c, frame, len, id, DMC_OP_GET);
	free(frame);
	if (rc < 0)
		return rc;
	dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
	count = dmc_read_u32(&r);
	if (r.err || count != n)
		return -EPROTO;
	return read_items(c, ds, &r, n, ret_items, false);
}

/* Drops the caller's private copies of the pages of [off, off + len) in the arena, before
 * the daemon may reuse that range: on a private file mapping MADV_DONTNEED brings back the
 * memfd's own pages (whatever the daemon writes there next), where a page kept would show
 * the caller's stale copy. The daemon aligns every allocation to whole pages (arena.c), so
 * the range rounded out to pages holds no other allocation.
 *
 * Only the pages written are dropped: /proc/self/pagemap tells them (present and not
 * file-backed: bit 63 set, bit 61 clear; readable without privilege), so pages only read
 * stay mapped and the next batch in the same range costs no faults (re-mapping 16 MiB
 * costs about 10 ms on a virtual machine, a pagemap read of it about 0.1 ms). Opened per
 * call: a descriptor kept across fork() would describe the parent. Without pagemap, the
 * whole range is dropped. */
void discard_private(const dmc_client *c, uint64_t off, uint64_t len)
{
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), lo, hi, ent[512];
	uint8_t *base = (uint8_t *)c->arena;
	int fd;

	if (!c->arena || len == 0 || off >= c->arena_size)
		return;
	if (page == 0 || (page & (page - 1)))
		page = 4096;
	lo = off & ~(page - 1);
	hi = len > c->arena_size - off ? c->arena_size : off + len;
	hi = (hi + page - 1) & ~(page - 1);
	if (hi > c->arena_size)
		hi = c->arena_size;
	if (hi <= lo)
		return;
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		madvise(base + lo, hi - lo, MADV_DONTNEED);
		return;
	}
	for (uint64_t p = lo; p < hi;) {
		uint64_t n = (hi - p) / page, run = UINT64_MAX;
		ssize_t got;

		if (n > sizeof(ent) / sizeof(ent[0]))
			n = sizeof(ent) / sizeof(ent[0]);
		got = pread(fd, ent, n * sizeof(ent[0]),
			    (off_t)((uintptr_t)(base + p) / page * sizeof(ent[0])));
		if (got != (ssize_t)(n * sizeof(ent[0]))) {
			madvise(base + p, hi - p, MADV_DONTNEED);
			break;
		}
		for (uint64_t i = 0; i <= n; i++) {
			bool priv = i < n && (ent[i] >> 63 & 1) && !(ent[i] >> 61 & 1);
			if (priv && run == UINT64_MAX)
				run = i;
			else if (!priv && run != UINT64_MAX) {
				madvise(base + p + run * page, (i - run) * page, MADV_DONTNEED);
				run = UINT64_MAX;
			}
		}
		p += n * page;
	}
	close(fd);
}

DMC_EXPORT int dmc_release(dmc_client *c, const struct dmc_item *items, uint32_t n)
{
	uint64_t *offs;
	uint8_t *frame;
	uint32_t k = 0, id;
	size_t cap;
	int len, rc;

	if (n == 0)
		return 0;
	offs = malloc((size_t)n * 2 * sizeof(*offs));
	cap = 64 + (size_t)n * 16;
	frame = malloc(cap);
	if (!offs || !frame) {
		free(offs);
		free(frame);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (items[i].status || !items[i].data)
			continue;
		if (items[i].region) {
			/* read-only and shared: nothing private to drop; the metadata's offset
			 * gives both back */
			offs[k++] = items[i].meta_offset;
			continue;
		}
		discard_private(c, items[i].offset, items[i].nbytes);
		offs[k++] = items[i].offset;
		offs[k++] = items[i].meta_offset;
	}
	if (k == 0) {
		free(offs);
		free(frame);
		return 0;
	}
	id = c->next_id++;
	len = dmc_release_encode(offs, k, id, frame, cap);
	rc = call(c, frame, len, id, DMC_OP_RELEASE);
	free(offs);
	free(frame);
	return rc;
}

DMC_EXPORT const void *dmc_arena(const dmc_client *c, uint64_t *ret_size)
{
	if (ret_size)
		*ret_size = c->arena_size;
	return c->arena;
}

/*
 * Views: a region item as its own copy-on-write mapping (dmcache.h). The region's entries
 * are whole pages (the daemon's arena allocator), so an item's tensor starts on a page of
 * the region's file; the mapping is private, so a write makes the writer's own page and a
 * later view of the same item (its own mapping) still shows the daemon's bytes.
 */
DMC_EXPORT int dmc_item_map(const dmc_dataset *ds, const struct dmc_item *it, void **ret_view)
{
	long page = sysconf(_SC_PAGESIZE);
	void *p;

	*ret_view = NULL;
	if (it->status || it->region != 1 || ds->rg_fd < 0 || page <= 0 ||
	    it->offset % (uint64_t)page || it->offset > ds->rg_size ||
	    it->nbytes > ds->rg_size - it->offset)
		return -EINVAL;
	if (it->nbytes == 0)
		return -EINVAL; /* nothing to map: the caller keeps an empty tensor */
	p = mmap(NULL, it->nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, ds->rg_fd,
		 (off_t)it->offset);
	if (p == MAP_FAILED)
		return -errno;
	*ret_view = p;
	return 0;
}

DMC_EXPORT int dmc_view_detach(void *view, uint64_t nbytes)
{
	void *anon, *p;

	/* the pages as they read now, in anonymous memory moved over the view: the same
	 * address, nothing left of the region's file under it */
	anon = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED)
		return -errno;
	memcpy(anon, view, nbytes);
	p = mremap(anon, nbytes, nbytes, MREMAP_MAYMOVE | MREMAP_FIXED, view);
	if (p == MAP_FAILED) {
		int e = -errno;
		munmap(anon, nbytes);
		return e;
	}
	return 0;
}

DMC_EXPORT int dmc_view_unmap(void *view, uint64_t nbytes)
{
	return munmap(view, nbytes) ? -errno : 0;
}
