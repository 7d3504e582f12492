/*
 * The dmcache wire protocol codec: see proto.h for the specification.
 *
 * Pure functions over caller-owned buffers. Integers are assembled byte by byte, so the
 * host's byte order and alignment never matter; every read is bounds-checked and a failed
 * read poisons the reader (sticky error) so that callers check once at the end.
 */
#include <math.h>
#include <string.h>

#include "proto.h"

#define DMC_EXPORT __attribute__((visibility("default")))

/* ---- header ---- */

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
	       ((uint32_t)p[3] << 24);
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

DMC_EXPORT int dmc_header_decode(const uint8_t *buf, size_t len, struct dmc_header *ret_hdr)
{
	struct dmc_header h;

	if (len < DMC_HEADER_SIZE)
		return DMC_PROTO_AGAIN;
	h.length = get32(buf);
	h.opcode = get16(buf + 4);
	h.flags = get16(buf + 6);
	h.request_id = get32(buf + 8);
	h.nfds = buf[12];
	if (h.length > DMC_FRAME_MAX || h.nfds > DMC_FDS_MAX || (h.flags & ~DMC_FLAGS_DEFINED) ||
	    buf[13] || buf[14] || buf[15])
		return DMC_PROTO_ERROR;
	*ret_hdr = h;
	return DMC_PROTO_OK;
}

DMC_EXPORT void dmc_header_encode(const struct dmc_header *hdr, uint8_t out[DMC_HEADER_SIZE])
{
	put32(out, hdr->length);
	put16(out + 4, hdr->opcode);
	put16(out + 6, hdr->flags);
	put32(out + 8, hdr->request_id);
	out[12] = hdr->nfds;
	out[13] = out[14] = out[15] = 0;
}

/* ---- reader ---- */

DMC_EXPORT void dmc_reader_init(struct dmc_reader *r, const void *buf, size_t len)
{
	r->buf = buf;
	r->len = len;
	r->pos = 0;
	r->err = DMC_PROTO_OK;
}

/* Returns a pointer to the next n bytes and advances, or NULL (and poisons the reader). */
static const uint8_t *take(struct dmc_reader *r, size_t n)
{
	const uint8_t *p;

	if (r->err || r->len - r->pos < n) {
		r->err = DMC_PROTO_ERROR;
		return NULL;
	}
	p = r->buf + r->pos;
	r->pos += n;
	return p;
}

DMC_EXPORT uint8_t dmc_read_u8(struct dmc_reader *r)
{
	const uint8_t *p = take(r, 1);
	return p ? p[0] : 0;
}

DMC_EXPORT uint16_t dmc_read_u16(struct dmc_reader *r)
{
	const uint8_t *p = take(r, 2);
	return p ? get16(p) : 0;
}

DMC_EXPORT uint32_t dmc_read_u32(struct dmc_reader *r)
{
	const uint8_t *p = take(r, 4);
	return p ? get32(p) : 0;
}

DMC_EXPORT uint64_t dmc_read_u64(struct dmc_reader *r)
{
	const uint8_t *p = take(r, 8);
	return p ? (uint64_t)get32(p) | ((uint64_t)get32(p + 4) << 32) : 0;
}

DMC_EXPORT int32_t dmc_read_i32(struct dmc_reader *r)
{
	return (int32_t)dmc_read_u32(r);
}

DMC_EXPORT int64_t dmc_read_i64(struct dmc_reader *r)
{
	return (int64_t)dmc_read_u64(r);
}

DMC_EXPORT struct dmc_str dmc_read_str(struct dmc_reader *r)
{
	struct dmc_str s = { "", 0 };
	uint32_t n = dmc_read_u32(r);
	const uint8_t *p;

	if (r->err)
		return s;
	if (n > DMC_STR_MAX) {
		r->err = DMC_PROTO_ERROR;
		return s;
	}
	p = take(r, n);
	if (!p)
		return s;
	if (memchr(p, '\0', n)) {
		r->err = DMC_PROTO_ERROR;
		return s;
	}
	s.ptr = (const char *)p;
	s.len = n;
	return s;
}

DMC_EXPORT int dmc_reader_finish(struct dmc_reader *r)
{
	if (r->err || r->pos != r->len)
		return DMC_PROTO_ERROR;
	return DMC_PROTO_OK;
}

/* ---- writer ---- */

DMC_EXPORT void dmc_writer_init(struct dmc_writer *w, void *buf, size_t cap)
{
	w->buf = buf;
	w->cap = cap;
	w->len = 0;
	w->err = DMC_PROTO_OK;
}

static uint8_t *room(struct dmc_writer *w, size_t n)
{
	uint8_t *p;

	if (w->err || w->cap - w->len < n) {
		w->err = DMC_PROTO_NOSPACE;
		return NULL;
	}
	p = w->buf + w->len;
	w->len += n;
	return p;
}

DMC_EXPORT void dmc_write_u8(struct dmc_writer *w, uint8_t v)
{
	uint8_t *p = room(w, 1);
	if (p)
		p[0] = v;
}

DMC_EXPORT void dmc_write_u16(struct dmc_writer *w, uint16_t v)
{
	uint8_t *p = room(w, 2);
	if (p)
		put16(p, v);
}

DMC_EXPORT void dmc_write_u32(struct dmc_writer *w, uint32_t v)
{
	uint8_t *p = room(w, 4);
	if (p)
		put32(p, v);
}

DMC_EXPORT void dmc_write_u64(struct dmc_writer *w, uint64_t v)
{
	uint8_t *p = room(w, 8);
	if (p) {
		put32(p, (uint32_t)v);
		put32(p + 4, (uint32_t)(v >> 32));
	}
}

DMC_EXPORT void dmc_write_i32(struct dmc_writer *w, int32_t v)
{
	dmc_write_u32(w, (uint32_t)v);
}

DMC_EXPORT void dmc_write_i64(struct dmc_writer *w, int64_t v)
{
	dmc_write_u64(w, (uint64_t)v);
}

DMC_EXPORT void dmc_write_str(struct dmc_writer *w, const char *s, size_t len)
{
	uint8_t *p;

	if (len > DMC_STR_MAX || (len && memchr(s, '\0', len))) {
		w->err = DMC_PROTO_NOSPACE;
		return;
	}
	dmc_write_u32(w, (uint32_t)len);
	p = room(w, len);
	if (p && len)
		memcpy(p, s, len);
}

DMC_EXPORT void dmc_write_cstr(struct dmc_writer *w, const char *s)
{
	dmc_write_str(w, s ? s : "", s ? strlen(s) : 0);
}

/* ---- frames ---- */

DMC_EXPORT void dmc_frame_begin(struct dmc_writer *w, void *out, size_t cap)
{
	dmc_writer_init(w, out, cap);
	room(w, DMC_HEADER_SIZE);
}

DMC_EXPORT int dmc_frame_end(struct dmc_writer *w, uint16_t opcode, uint16_t flags,
			     uint32_t request_id, uint8_t nfds)
{
	struct dmc_header h;

	if (w->err)
		return DMC_PROTO_NOSPACE;
	if (w->len - DMC_HEADER_SIZE > DMC_FRAME_MAX || nfds > DMC_FDS_MAX ||
	    (flags & ~DMC_FLAGS_DEFINED))
		return DMC_PROTO_NOSPACE;
	h.length = (uint32_t)(w->len - DMC_HEADER_SIZE);
	h.opcode = opcode;
	h.flags = flags;
	h.request_id = request_id;
	h.nfds = nfds;
	dmc_header_encode(&h, w->buf);
	return (int)w->len;
}

DMC_EXPORT int dmc_hello_encode(const struct dmc_hello *m, uint32_t request_id, void *out,
				size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, m->version_min);
	dmc_write_u32(&w, m->version_max);
	dmc_write_str(&w, m->client.ptr, m->client.len);
	return dmc_frame_end(&w, DMC_OP_HELLO, 0, request_id, 0);
}

DMC_EXPORT int dmc_hello_decode(const void *payload, size_t len, struct dmc_hello *ret)
{
	struct dmc_reader r;
	struct dmc_hello m;

	dmc_reader_init(&r, payload, len);
	m.version_min = dmc_read_u32(&r);
	m.version_max = dmc_read_u32(&r);
	m.client = dmc_read_str(&r);
	if (dmc_reader_finish(&r) || m.version_min > m.version_max)
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_hello_reply_encode(const struct dmc_hello_reply *m, uint32_t request_id,
				      void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, m->version);
	dmc_write_u32(&w, m->daemon_uid);
	dmc_write_u32(&w, m->frame_max);
	dmc_write_str(&w, m->daemon.ptr, m->daemon.len);
	return dmc_frame_end(&w, DMC_OP_HELLO, DMC_FLAG_REPLY, request_id, 0);
}

DMC_EXPORT int dmc_hello_reply_decode(const void *payload, size_t len,
				      struct dmc_hello_reply *ret)
{
	struct dmc_reader r;
	struct dmc_hello_reply m;

	dmc_reader_init(&r, payload, len);
	m.version = dmc_read_u32(&r);
	m.daemon_uid = dmc_read_u32(&r);
	m.frame_max = dmc_read_u32(&r);
	m.daemon = dmc_read_str(&r);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_ping_encode(const struct dmc_ping *m, uint16_t flags, uint32_t request_id,
			       void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, m->token);
	return dmc_frame_end(&w, DMC_OP_PING, flags, request_id, 0);
}

DMC_EXPORT int dmc_ping_decode(const void *payload, size_t len, struct dmc_ping *ret)
{
	struct dmc_reader r;
	uint64_t token;

	dmc_reader_init(&r, payload, len);
	token = dmc_read_u64(&r);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	ret->token = token;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_status_encode(uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	return dmc_frame_end(&w, DMC_OP_STATUS, 0, request_id, 0);
}

DMC_EXPORT int dmc_status_decode(const void *payload, size_t len)
{
	(void)payload;
	return len == 0 ? DMC_PROTO_OK : DMC_PROTO_ERROR;
}

DMC_EXPORT int dmc_status_reply_encode(const char *version, uint64_t uptime_ms, uint32_t pid,
				       const struct dmc_status_entry *entries, uint32_t n,
				       uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	if (n > DMC_STATUS_ENTRIES_MAX)
		return DMC_PROTO_NOSPACE;
	dmc_frame_begin(&w, out, cap);
	dmc_write_cstr(&w, version);
	dmc_write_u64(&w, uptime_ms);
	dmc_write_u32(&w, pid);
	dmc_write_u32(&w, n);
	for (uint32_t i = 0; i < n; i++) {
		dmc_write_str(&w, entries[i].name.ptr, entries[i].name.len);
		dmc_write_i64(&w, entries[i].value);
	}
	return dmc_frame_end(&w, DMC_OP_STATUS, DMC_FLAG_REPLY, request_id, 0);
}

DMC_EXPORT int dmc_status_reply_decode(const void *payload, size_t len,
				       struct dmc_str *ret_version, uint64_t *ret_uptime_ms,
				       uint32_t *ret_pid, struct dmc_status_entry *entries,
				       uint32_t max, uint32_t *ret_n)
{
	struct dmc_reader r;
	struct dmc_str version;
	uint64_t uptime;
	uint32_t pid, n;

	dmc_reader_init(&r, payload, len);
	version = dmc_read_str(&r);
	uptime = dmc_read_u64(&r);
	pid = dmc_read_u32(&r);
	n = dmc_read_u32(&r);
	if (r.err || n > max || n > DMC_STATUS_ENTRIES_MAX)
		return DMC_PROTO_ERROR;
	for (uint32_t i = 0; i < n; i++) {
		entries[i].name = dmc_read_str(&r);
		entries[i].value = dmc_read_i64(&r);
	}
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret_version = version;
	*ret_uptime_ms = uptime;
	*ret_pid = pid;
	*ret_n = n;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_error_encode(const struct dmc_error_msg *m, uint32_t request_id, void *out,
				size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, m->code);
	dmc_write_u32(&w, m->http_status);
	dmc_write_u32(&w, m->retry_after_ms);
	dmc_write_i32(&w, m->sys_errno);
	dmc_write_str(&w, m->resource.ptr, m->resource.len);
	dmc_write_str(&w, m->message.ptr, m->message.len);
	return dmc_frame_end(&w, DMC_OP_ERROR, DMC_FLAG_REPLY, request_id, 0);
}

DMC_EXPORT int dmc_error_decode(const void *payload, size_t len, struct dmc_error_msg *ret)
{
	struct dmc_reader r;
	struct dmc_error_msg m;

	dmc_reader_init(&r, payload, len);
	m.code = dmc_read_u32(&r);
	m.http_status = dmc_read_u32(&r);
	m.retry_after_ms = dmc_read_u32(&r);
	m.sys_errno = dmc_read_i32(&r);
	m.resource = dmc_read_str(&r);
	m.message = dmc_read_str(&r);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

/* ---- cache messages ---- */

static void write_dstr(struct dmc_writer *w, struct dmc_str s)
{
	dmc_write_str(w, s.ptr, s.len);
}

DMC_EXPORT int dmc_prefetch_encode(const struct dmc_prefetch *m, uint32_t request_id, void *out,
				   size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, m->source);
	dmc_write_u32(&w, m->flags);
	write_dstr(&w, m->project);
	write_dstr(&w, m->version);
	write_dstr(&w, m->server);
	write_dstr(&w, m->api_key);
	if (m->flags & DMC_PREFETCH_SHARD) {
		dmc_write_u32(&w, m->shard_rank);
		dmc_write_u32(&w, m->shard_world);
	}
	return dmc_frame_end(&w, DMC_OP_PREFETCH, 0, request_id, 0);
}

DMC_EXPORT int dmc_prefetch_decode(const void *payload, size_t len, struct dmc_prefetch *ret)
{
	struct dmc_reader r;
	struct dmc_prefetch m;

	dmc_reader_init(&r, payload, len);
	m.source = dmc_read_u32(&r);
	m.flags = dmc_read_u32(&r);
	m.project = dmc_read_str(&r);
	m.version = dmc_read_str(&r);
	m.server = dmc_read_str(&r);
	m.api_key = dmc_read_str(&r);
	m.shard_rank = 0;
	m.shard_world = 1;
	if (m.flags & DMC_PREFETCH_SHARD) {
		m.shard_rank = dmc_read_u32(&r);
		m.shard_world = dmc_read_u32(&r);
	}
	if (dmc_reader_finish(&r) || (m.flags & ~DMC_PREFETCH_FLAGS_DEFINED) ||
	    m.shard_world < 1 || m.shard_world > DMC_SHARD_WORLD_MAX ||
	    m.shard_rank >= m.shard_world)
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT void dmc_progress_write(struct dmc_writer *w, const struct dmc_progress *m)
{
	dmc_write_u64(w, m->job_id);
	dmc_write_u64(w, m->snapshot_id);
	dmc_write_u32(w, m->state);
	write_dstr(w, m->project_id);
	write_dstr(w, m->project_name);
	write_dstr(w, m->version);
	dmc_write_u64(w, m->items_total);
	dmc_write_u64(w, m->items_done);
	dmc_write_u64(w, m->items_cached);
	dmc_write_u64(w, m->items_failed);
	dmc_write_u64(w, m->bytes_total);
	dmc_write_u64(w, m->bytes_done);
	dmc_write_u64(w, m->rate_bps);
	dmc_write_u64(w, m->eta_ms);
	dmc_write_u32(w, m->error_code);
	dmc_write_u32(w, m->http_status);
	write_dstr(w, m->error_resource);
	write_dstr(w, m->error_message);
}

DMC_EXPORT void dmc_progress_read(struct dmc_reader *r, struct dmc_progress *m)
{
	m->job_id = dmc_read_u64(r);
	m->snapshot_id = dmc_read_u64(r);
	m->state = dmc_read_u32(r);
	m->project_id = dmc_read_str(r);
	m->project_name = dmc_read_str(r);
	m->version = dmc_read_str(r);
	m->items_total = dmc_read_u64(r);
	m->items_done = dmc_read_u64(r);
	m->items_cached = dmc_read_u64(r);
	m->items_failed = dmc_read_u64(r);
	m->bytes_total = dmc_read_u64(r);
	m->bytes_done = dmc_read_u64(r);
	m->rate_bps = dmc_read_u64(r);
	m->eta_ms = dmc_read_u64(r);
	m->error_code = dmc_read_u32(r);
	m->http_status = dmc_read_u32(r);
	m->error_resource = dmc_read_str(r);
	m->error_message = dmc_read_str(r);
	if (m->state < DMC_JOB_RESOLVING || m->state > DMC_JOB_CANCELLED)
		r->err = DMC_PROTO_ERROR;
}

DMC_EXPORT int dmc_progress_encode(const struct dmc_progress *m, bool more, uint32_t request_id,
				   void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_progress_write(&w, m);
	return dmc_frame_end(&w, DMC_OP_PREFETCH, DMC_FLAG_REPLY | (more ? DMC_FLAG_MORE : 0),
			     request_id, 0);
}

DMC_EXPORT int dmc_progress_decode(const void *payload, size_t len, struct dmc_progress *ret)
{
	struct dmc_reader r;
	struct dmc_progress m;

	dmc_reader_init(&r, payload, len);
	dmc_progress_read(&r, &m);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_cancel_encode(const char *project, const char *server, uint32_t request_id,
				 void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_cstr(&w, project);
	dmc_write_cstr(&w, server);
	return dmc_frame_end(&w, DMC_OP_CANCEL, 0, request_id, 0);
}

DMC_EXPORT int dmc_cancel_decode(const void *payload, size_t len, struct dmc_str *ret_project,
				 struct dmc_str *ret_server)
{
	struct dmc_reader r;
	struct dmc_str p, s;

	dmc_reader_init(&r, payload, len);
	p = dmc_read_str(&r);
	s = dmc_read_str(&r);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret_project = p;
	*ret_server = s;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_cancel_reply_encode(uint32_t cancelled, uint32_t request_id, void *out,
				       size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, cancelled);
	return dmc_frame_end(&w, DMC_OP_CANCEL, DMC_FLAG_REPLY, request_id, 0);
}

DMC_EXPORT int dmc_cancel_reply_decode(const void *payload, size_t len, uint32_t *ret_cancelled)
{
	struct dmc_reader r;
	uint32_t n;

	dmc_reader_init(&r, payload, len);
	n = dmc_read_u32(&r);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret_cancelled = n;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_list_encode(uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	return dmc_frame_end(&w, DMC_OP_LIST, 0, request_id, 0);
}

DMC_EXPORT void dmc_snapshot_info_write(struct dmc_writer *w, const struct dmc_snapshot_info *m)
{
	dmc_write_u64(w, m->id);
	dmc_write_u32(w, m->source);
	dmc_write_u32(w, m->complete);
	write_dstr(w, m->server);
	write_dstr(w, m->project_id);
	write_dstr(w, m->project_name);
	write_dstr(w, m->version);
	dmc_write_u64(w, m->items);
	dmc_write_u64(w, m->items_stored);
	dmc_write_u64(w, m->bytes);
	dmc_write_u64(w, m->created_ms);
	dmc_write_u32(w, m->owner_uid);
	dmc_write_u64(w, m->bytes_stored);
}

DMC_EXPORT void dmc_snapshot_info_read(struct dmc_reader *r, struct dmc_snapshot_info *m)
{
	m->id = dmc_read_u64(r);
	m->source = dmc_read_u32(r);
	m->complete = dmc_read_u32(r);
	m->server = dmc_read_str(r);
	m->project_id = dmc_read_str(r);
	m->project_name = dmc_read_str(r);
	m->version = dmc_read_str(r);
	m->items = dmc_read_u64(r);
	m->items_stored = dmc_read_u64(r);
	m->bytes = dmc_read_u64(r);
	m->created_ms = dmc_read_u64(r);
	m->owner_uid = dmc_read_u32(r);
	m->bytes_stored = dmc_read_u64(r);
}

DMC_EXPORT int dmc_evict_encode(uint32_t flags, const char *project, uint32_t request_id,
				void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, flags);
	dmc_write_cstr(&w, project);
	return dmc_frame_end(&w, DMC_OP_EVICT, 0, request_id, 0);
}

DMC_EXPORT int dmc_evict_decode(const void *payload, size_t len, uint32_t *ret_flags,
				struct dmc_str *ret_project)
{
	struct dmc_reader r;
	uint32_t flags;
	struct dmc_str p;

	dmc_reader_init(&r, payload, len);
	flags = dmc_read_u32(&r);
	p = dmc_read_str(&r);
	if (dmc_reader_finish(&r) || (flags & ~DMC_EVICT_ALL))
		return DMC_PROTO_ERROR;
	*ret_flags = flags;
	*ret_project = p;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_evict_reply_encode(const struct dmc_evict_reply *m, uint32_t request_id,
				      void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, m->snapshots);
	dmc_write_u64(&w, m->blobs);
	dmc_write_u64(&w, m->bytes);
	return dmc_frame_end(&w, DMC_OP_EVICT, DMC_FLAG_REPLY, request_id, 0);
}

DMC_EXPORT int dmc_evict_reply_decode(const void *payload, size_t len,
				      struct dmc_evict_reply *ret)
{
	struct dmc_reader r;
	struct dmc_evict_reply m;

	dmc_reader_init(&r, payload, len);
	m.snapshots = dmc_read_u64(&r);
	m.blobs = dmc_read_u64(&r);
	m.bytes = dmc_read_u64(&r);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_tier_encode(uint32_t action, uint32_t flags, uint32_t request_id,
			       void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, action);
	dmc_write_u32(&w, flags);
	return dmc_frame_end(&w, DMC_OP_TIER, 0, request_id, 0);
}

DMC_EXPORT int dmc_tier_decode(const void *payload, size_t len, uint32_t *ret_action,
			       uint32_t *ret_flags)
{
	struct dmc_reader r;
	uint32_t action, flags;

	dmc_reader_init(&r, payload, len);
	action = dmc_read_u32(&r);
	flags = dmc_read_u32(&r);
	if (dmc_reader_finish(&r) || (flags & ~DMC_TIER_FLAGS_DEFINED))
		return DMC_PROTO_ERROR;
	*ret_action = action;
	*ret_flags = flags;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_tier_reply_encode(const struct dmc_tier_reply *m, uint32_t request_id,
				     void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, m->blobs);
	dmc_write_u64(&w, m->blob_bytes);
	dmc_write_u64(&w, m->maps);
	dmc_write_u64(&w, m->maps_deleted);
	dmc_write_u64(&w, m->blobs_deleted);
	dmc_write_u64(&w, m->bytes_deleted);
	dmc_write_u64(&w, m->blobs_bad);
	dmc_write_u32(&w, m->truncated);
	dmc_write_str(&w, m->entries.ptr, m->entries.len);
	return dmc_frame_end(&w, DMC_OP_TIER, DMC_FLAG_REPLY, request_id, 0);
}

DMC_EXPORT int dmc_tier_reply_decode(const void *payload, size_t len, struct dmc_tier_reply *ret)
{
	struct dmc_reader r;
	struct dmc_tier_reply m;

	dmc_reader_init(&r, payload, len);
	m.blobs = dmc_read_u64(&r);
	m.blob_bytes = dmc_read_u64(&r);
	m.maps = dmc_read_u64(&r);
	m.maps_deleted = dmc_read_u64(&r);
	m.blobs_deleted = dmc_read_u64(&r);
	m.bytes_deleted = dmc_read_u64(&r);
	m.blobs_bad = dmc_read_u64(&r);
	m.truncated = dmc_read_u32(&r);
	m.entries = dmc_read_str(&r);
	if (dmc_reader_finish(&r) || m.truncated > 1)
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_verify_encode(uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	return dmc_frame_end(&w, DMC_OP_VERIFY, 0, request_id, 0);
}

DMC_EXPORT int dmc_verify_reply_encode(const struct dmc_verify_reply *m, uint32_t request_id,
				       void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, m->blobs_checked);
	dmc_write_u64(&w, m->blobs_bad);
	dmc_write_u64(&w, m->bytes_checked);
	return dmc_frame_end(&w, DMC_OP_VERIFY, DMC_FLAG_REPLY, request_id, 0);
}

DMC_EXPORT int dmc_verify_reply_decode(const void *payload, size_t len,
				       struct dmc_verify_reply *ret)
{
	struct dmc_reader r;
	struct dmc_verify_reply m;

	dmc_reader_init(&r, payload, len);
	m.blobs_checked = dmc_read_u64(&r);
	m.blobs_bad = dmc_read_u64(&r);
	m.bytes_checked = dmc_read_u64(&r);
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_empty_decode(const void *payload, size_t len)
{
	(void)payload;
	return len == 0 ? DMC_PROTO_OK : DMC_PROTO_ERROR;
}

/* ---- serving ---- */

static void write_f64(struct dmc_writer *w, double v)
{
	uint64_t u;

	memcpy(&u, &v, sizeof(u));
	dmc_write_u64(w, u);
}

static double read_f64(struct dmc_reader *r)
{
	uint64_t u = dmc_read_u64(r);
	double v;

	memcpy(&v, &u, sizeof(v));
	return v;
}

static void policy_write(struct dmc_writer *w, const struct dmc_policy *p)
{
	dmc_write_u32(w, p->ops);
	dmc_write_u32(w, p->resize);
	dmc_write_u32(w, p->height);
	dmc_write_u32(w, p->width);
	dmc_write_u32(w, p->channels);
	write_f64(w, p->pad_value);
	write_f64(w, p->window_center);
	write_f64(w, p->window_width);
}

static void policy_read(struct dmc_reader *r, struct dmc_policy *p)
{
	p->ops = dmc_read_u32(r);
	p->resize = dmc_read_u32(r);
	p->height = dmc_read_u32(r);
	p->width = dmc_read_u32(r);
	p->channels = dmc_read_u32(r);
	p->pad_value = read_f64(r);
	p->window_center = read_f64(r);
	p->window_width = read_f64(r);
}

/* Every field in range, and the fields no flag uses zero (one encoding per policy). */
DMC_EXPORT int dmc_policy_check(const struct dmc_policy *p)
{
	uint32_t geo = p->ops & DMC_POLICY_GEOMETRY;

	if (p->ops & ~DMC_POLICY_OPS_DEFINED)
		return DMC_PROTO_ERROR;
	if (geo & (geo - 1)) /* more than one of SIZE, CROP, PAD */
		return DMC_PROTO_ERROR;
	if (geo ? p->height < 1 || p->height > DMC_POLICY_DIM_MAX || p->width < 1 ||
			  p->width > DMC_POLICY_DIM_MAX
		: p->height || p->width)
		return DMC_PROTO_ERROR;
	if ((p->ops & DMC_POLICY_SIZE) ? p->resize < DMC_RESIZE_BILINEAR ||
						 p->resize > DMC_RESIZE_AREA
				       : p->resize != 0)
		return DMC_PROTO_ERROR;
	if ((p->ops & DMC_POLICY_CHANNELS) ? p->channels != 1 && p->channels != 3
					   : p->channels != 0)
		return DMC_PROTO_ERROR;
	if ((p->ops & (DMC_POLICY_CROP | DMC_POLICY_PAD)) ? !isfinite(p->pad_value)
							  : p->pad_value != 0.0)
		return DMC_PROTO_ERROR;
	if ((p->ops & DMC_POLICY_WINDOW)
		    ? !isfinite(p->window_center) || !isfinite(p->window_width) ||
			      !(p->window_width > 0.0)
		    : p->window_center != 0.0 || p->window_width != 0.0)
		return DMC_PROTO_ERROR;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_open_encode(const struct dmc_open *m, uint32_t request_id, void *out,
			       size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, m->source);
	dmc_write_u32(&w, m->flags);
	dmc_write_u32(&w, m->dtype);
	write_dstr(&w, m->project);
	write_dstr(&w, m->version);
	write_dstr(&w, m->server);
	write_dstr(&w, m->api_key);
	dmc_write_u64(&w, m->arena_bytes);
	if (m->flags & DMC_OPEN_POLICY)
		policy_write(&w, &m->policy);
	return dmc_frame_end(&w, DMC_OP_OPEN, 0, request_id, 0);
}

DMC_EXPORT int dmc_open_decode(const void *payload, size_t len, struct dmc_open *ret)
{
	struct dmc_reader r;
	struct dmc_open m;

	dmc_reader_init(&r, payload, len);
	m.source = dmc_read_u32(&r);
	m.flags = dmc_read_u32(&r);
	m.dtype = dmc_read_u32(&r);
	m.project = dmc_read_str(&r);
	m.version = dmc_read_str(&r);
	m.server = dmc_read_str(&r);
	m.api_key = dmc_read_str(&r);
	m.arena_bytes = dmc_read_u64(&r);
	memset(&m.policy, 0, sizeof(m.policy));
	if (m.flags & DMC_OPEN_POLICY)
		policy_read(&r, &m.policy);
	if (dmc_reader_finish(&r) || (m.flags & ~DMC_OPEN_FLAGS_DEFINED) ||
	    m.dtype > DMC_DTYPE_LAST_ || dmc_policy_check(&m.policy) != DMC_PROTO_OK)
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_open_reply_encode(const struct dmc_open_reply *m, uint8_t nfds,
				     uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, m->handle);
	dmc_write_u64(&w, m->snapshot_id);
	dmc_write_u64(&w, m->items);
	write_dstr(&w, m->project_id);
	write_dstr(&w, m->project_name);
	write_dstr(&w, m->version);
	dmc_write_u64(&w, m->arena_bytes);
	if (m->regions) {
		dmc_write_u64(&w, m->region_id);
		dmc_write_u64(&w, m->region_bytes);
	}
	return dmc_frame_end(&w, DMC_OP_OPEN, DMC_FLAG_REPLY, request_id, nfds);
}

DMC_EXPORT int dmc_open_reply_decode(const void *payload, size_t len,
				     struct dmc_open_reply *ret)
{
	struct dmc_reader r;
	struct dmc_open_reply m;

	dmc_reader_init(&r, payload, len);
	m.handle = dmc_read_u64(&r);
	m.snapshot_id = dmc_read_u64(&r);
	m.items = dmc_read_u64(&r);
	m.project_id = dmc_read_str(&r);
	m.project_name = dmc_read_str(&r);
	m.version = dmc_read_str(&r);
	m.arena_bytes = dmc_read_u64(&r);
	m.regions = !r.err && r.len - r.pos == 16;
	m.region_id = m.regions ? dmc_read_u64(&r) : 0;
	m.region_bytes = m.regions ? dmc_read_u64(&r) : 0;
	if (dmc_reader_finish(&r))
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_get_encode(uint64_t handle, const uint64_t *indices, uint32_t n,
			      uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	if (n == 0 || n > DMC_GET_MAX)
		return DMC_PROTO_NOSPACE;
	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, handle);
	dmc_write_u32(&w, n);
	for (uint32_t i = 0; i < n; i++)
		dmc_write_u64(&w, indices[i]);
	return dmc_frame_end(&w, DMC_OP_GET, 0, request_id, 0);
}

DMC_EXPORT int dmc_get_begin(struct dmc_reader *r, const void *payload, size_t len,
			     uint64_t *ret_handle, uint32_t *ret_n)
{
	uint64_t handle;
	uint32_t n;

	dmc_reader_init(r, payload, len);
	handle = dmc_read_u64(r);
	n = dmc_read_u32(r);
	if (r->err || n == 0 || n > DMC_GET_MAX || (uint64_t)n * 8 != r->len - r->pos)
		return DMC_PROTO_ERROR;
	*ret_handle = handle;
	*ret_n = n;
	return DMC_PROTO_OK;
}

DMC_EXPORT void dmc_item_desc_write(struct dmc_writer *w, const struct dmc_item_desc *m)
{
	dmc_write_u64(w, m->index);
	dmc_write_u32(w, m->status);
	dmc_write_u32(w, m->dtype);
	dmc_write_u32(w, m->ndim);
	for (int i = 0; i < 4; i++)
		dmc_write_u64(w, m->shape[i]);
	dmc_write_u64(w, m->offset);
	dmc_write_u64(w, m->nbytes);
	dmc_write_u64(w, m->meta_offset);
	dmc_write_u64(w, m->meta_len);
	write_dstr(w, m->message);
}

DMC_EXPORT void dmc_item_desc_read(struct dmc_reader *r, struct dmc_item_desc *m)
{
	m->index = dmc_read_u64(r);
	m->status = dmc_read_u32(r);
	m->dtype = dmc_read_u32(r);
	m->ndim = dmc_read_u32(r);
	for (int i = 0; i < 4; i++)
		m->shape[i] = dmc_read_u64(r);
	m->offset = dmc_read_u64(r);
	m->nbytes = dmc_read_u64(r);
	m->meta_offset = dmc_read_u64(r);
	m->meta_len = dmc_read_u64(r);
	m->message = dmc_read_str(r);
	if (m->ndim > 4 || m->dtype > DMC_DTYPE_LAST_)
		r->err = DMC_PROTO_ERROR;
}

DMC_EXPORT int dmc_release_encode(const uint64_t *offsets, uint32_t n, uint32_t request_id,
				  void *out, size_t cap)
{
	struct dmc_writer w;

	if (n > 2 * DMC_GET_MAX)
		return DMC_PROTO_NOSPACE;
	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, n);
	for (uint32_t i = 0; i < n; i++)
		dmc_write_u64(&w, offsets[i]);
	return dmc_frame_end(&w, DMC_OP_RELEASE, 0, request_id, 0);
}

DMC_EXPORT int dmc_close_encode(uint64_t handle, uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, handle);
	return dmc_frame_end(&w, DMC_OP_CLOSE, 0, request_id, 0);
}

DMC_EXPORT int dmc_stream_encode(const struct dmc_stream_req *m, uint32_t request_id, void *out,
				 size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u64(&w, m->handle);
	dmc_write_u64(&w, m->seed);
	dmc_write_u64(&w, m->epoch);
	dmc_write_u32(&w, m->flags);
	dmc_write_u32(&w, m->rank);
	dmc_write_u32(&w, m->world_size);
	dmc_write_u32(&w, m->batch_size);
	dmc_write_u32(&w, m->ahead);
	return dmc_frame_end(&w, DMC_OP_STREAM, 0, request_id, 0);
}

DMC_EXPORT int dmc_stream_decode(const void *payload, size_t len, struct dmc_stream_req *ret)
{
	struct dmc_reader r;
	struct dmc_stream_req m;

	dmc_reader_init(&r, payload, len);
	m.handle = dmc_read_u64(&r);
	m.seed = dmc_read_u64(&r);
	m.epoch = dmc_read_u64(&r);
	m.flags = dmc_read_u32(&r);
	m.rank = dmc_read_u32(&r);
	m.world_size = dmc_read_u32(&r);
	m.batch_size = dmc_read_u32(&r);
	m.ahead = dmc_read_u32(&r);
	if (dmc_reader_finish(&r) || (m.flags & ~DMC_STREAM_FLAGS_DEFINED) ||
	    m.world_size == 0 || m.rank >= m.world_size || m.batch_size == 0 ||
	    m.batch_size > DMC_GET_MAX || m.ahead > DMC_STREAM_AHEAD_MAX)
		return DMC_PROTO_ERROR;
	*ret = m;
	return DMC_PROTO_OK;
}

DMC_EXPORT void dmc_batch_head_write(struct dmc_writer *w, const struct dmc_batch_head *m)
{
	dmc_write_u64(w, m->batch);
	dmc_write_u32(w, m->n);
	dmc_write_u32(w, m->uniform);
	dmc_write_u64(w, m->data_offset);
	dmc_write_u64(w, m->data_len);
	dmc_write_u64(w, m->meta_offset);
	dmc_write_u64(w, m->meta_len);
}

DMC_EXPORT void dmc_batch_head_read(struct dmc_reader *r, struct dmc_batch_head *m)
{
	m->batch = dmc_read_u64(r);
	m->n = dmc_read_u32(r);
	m->uniform = dmc_read_u32(r);
	m->data_offset = dmc_read_u64(r);
	m->data_len = dmc_read_u64(r);
	m->meta_offset = dmc_read_u64(r);
	m->meta_len = dmc_read_u64(r);
	if (m->n > DMC_GET_MAX || m->uniform > 1)
		r->err = DMC_PROTO_ERROR;
}

DMC_EXPORT int dmc_stop_encode(uint32_t stream, uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, stream);
	return dmc_frame_end(&w, DMC_OP_STOP, 0, request_id, 0);
}

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

DMC_EXPORT uint64_t dmc_stream_perm(uint64_t i, uint64_t n, uint64_t key)
{
	unsigned bits = 2, half;
	uint64_t mask, x = i, k[4];

	if (n <= 1 || i >= n)
		return i;
	while (bits < 64 && (n - 1) >> bits)
		bits++;
	bits += bits & 1;
	half = bits / 2;
	mask = (1ull << half) - 1;
	for (int r = 0; r < 4; r++)
		k[r] = splitmix64(key + (uint64_t)r);
	do {
		uint64_t left = x >> half, right = x & mask;
		for (int r = 0; r < 4; r++) {
			uint64_t t = right;
			right = left ^ (splitmix64(k[r] ^ right) & mask);
			left = t;
		}
		x = (left << half) | right;
	} while (x >= n); /* cycle-walking: the domain is < 4n, so a few rounds at most */
	return x;
}

DMC_EXPORT void dmc_stream_plan(uint64_t items, const struct dmc_stream_req *m,
				uint64_t *ret_per_rank, uint64_t *ret_batches)
{
	uint64_t w = m->world_size ? m->world_size : 1, per, b = m->batch_size ? m->batch_size : 1;

	if ((m->flags & DMC_STREAM_DROP_LAST) && items % w)
		per = items > w ? (items - w + w - 1) / w : 0;
	else
		per = (items + w - 1) / w;
	if (items == 0)
		per = 0;
	*ret_per_rank = per;
	*ret_batches = (m->flags & DMC_STREAM_DROP_LAST) ? per / b : (per + b - 1) / b;
}

DMC_EXPORT uint64_t dmc_stream_index(uint64_t items, const struct dmc_stream_req *m, uint64_t q)
{
	uint64_t p = (uint64_t)m->rank + q * (m->world_size ? m->world_size : 1);

	if (items == 0)
		return 0;
	p %= items;
	return (m->flags & DMC_STREAM_SHUFFLE) ? dmc_stream_perm(p, items, m->seed + m->epoch) : p;
}

DMC_EXPORT unsigned dmc_dtype_size(uint32_t dtype)
{
	static const unsigned sizes[DMC_DTYPE_LAST_ + 1] = { 0, 1, 1, 2, 2, 4, 4, 8, 8, 4, 8, 2, 2 };

	return dtype <= DMC_DTYPE_LAST_ ? sizes[dtype] : 0;
}

DMC_EXPORT const char *dmc_dtype_name(uint32_t dtype)
{
	static const char *const names[DMC_DTYPE_LAST_ + 1] = {
		NULL,	 "uint8",  "int8",  "uint16",  "int16",  "uint32",
		"int32", "uint64", "int64", "float32", "float64", "float16",
		"bfloat16",
	};

	return dtype <= DMC_DTYPE_LAST_ ? names[dtype] : NULL;
}

/* ---- names ---- */

static const struct {
	const char *name;
	const char *text;
} error_names[DMC_E_LAST_ - DMC_E_FIRST_ + 1] = {
	[DMC_E_PROTOCOL - DMC_E_FIRST_] = { "protocol", "protocol error" },
	[DMC_E_UNSUPPORTED - DMC_E_FIRST_] = { "unsupported", "unsupported request" },
	[DMC_E_NOT_FOUND_OR_DENIED - DMC_E_FIRST_] = { "not_found_or_denied",
						       "not found or not entitled" },
	[DMC_E_UPSTREAM_TRANSIENT - DMC_E_FIRST_] = { "upstream_transient",
						      "upstream temporarily unavailable" },
	[DMC_E_UPSTREAM_PERMANENT - DMC_E_FIRST_] = { "upstream_permanent",
						      "upstream refused the request" },
	[DMC_E_INTEGRITY - DMC_E_FIRST_] = { "integrity", "data failed its integrity check" },
	[DMC_E_CACHE_FULL - DMC_E_FIRST_] = { "cache_full", "cache full" },
	[DMC_E_LIMIT_EXCEEDED - DMC_E_FIRST_] = { "limit_exceeded", "limit exceeded" },
	[DMC_E_DECODE_FAILED - DMC_E_FIRST_] = { "decode_failed", "decoding failed" },
	[DMC_E_IO - DMC_E_FIRST_] = { "io", "local I/O error" },
	[DMC_E_OVERLOADED - DMC_E_FIRST_] = { "overloaded", "daemon overloaded" },
	[DMC_E_INTERNAL - DMC_E_FIRST_] = { "internal", "internal error" },
	[DMC_E_INVALID_ARGUMENT - DMC_E_FIRST_] = { "invalid_argument", "invalid argument" },
	[DMC_E_CANCELLED - DMC_E_FIRST_] = { "cancelled", "cancelled" },
};

DMC_EXPORT const char *dmc_error_name(uint32_t code)
{
	if (code < DMC_E_FIRST_ || code > DMC_E_LAST_)
		return NULL;
	return error_names[code - DMC_E_FIRST_].name;
}

DMC_EXPORT const char *dmc_error_text(uint32_t code)
{
	if (code < DMC_E_FIRST_ || code > DMC_E_LAST_)
		return NULL;
	return error_names[code - DMC_E_FIRST_].text;
}

DMC_EXPORT const char *dmc_err_text(int err)
{
	const char *t = NULL;

	if (err <= -DMC_E_FIRST_ && err >= -DMC_E_LAST_)
		t = dmc_error_text((uint32_t)-err);
	return t ? t : strerror(-err);
}

DMC_EXPORT const char *dmc_opcode_name(uint16_t opcode)
{
	switch (opcode) {
	case DMC_OP_HELLO: return "HELLO";
	case DMC_OP_PING: return "PING";
	case DMC_OP_STATUS: return "STATUS";
	case DMC_OP_ERROR: return "ERROR";
	case DMC_OP_PREFETCH: return "PREFETCH";
	case DMC_OP_CANCEL: return "CANCEL";
	case DMC_OP_LIST: return "LIST";
	case DMC_OP_EVICT: return "EVICT";
	case DMC_OP_VERIFY: return "VERIFY";
	case DMC_OP_OPEN: return "OPEN";
	case DMC_OP_GET: return "GET";
	case DMC_OP_RELEASE: return "RELEASE";
	case DMC_OP_STREAM: return "STREAM";
	case DMC_OP_CLOSE: return "CLOSE";
	case DMC_OP_STOP: return "STOP";
	case DMC_OP_LOCAL_NEED: return "LOCAL_NEED";
	case DMC_OP_LOCAL_FILES: return "LOCAL_FILES";
	}
	return NULL;
}

/* ---- local folders ---- */

DMC_EXPORT int dmc_local_need_encode(uint32_t first, const char *const *paths, uint32_t n,
				     uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;

	if (n == 0 || n > DMC_FDS_MAX)
		return DMC_PROTO_NOSPACE;
	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, first);
	dmc_write_u32(&w, n);
	for (uint32_t i = 0; i < n; i++) {
		size_t len = strlen(paths[i]);
		if (len == 0 || len > DMC_LOCAL_PATH_MAX)
			return DMC_PROTO_NOSPACE;
		dmc_write_str(&w, paths[i], len);
	}
	return dmc_frame_end(&w, DMC_OP_LOCAL_NEED, DMC_FLAG_REPLY | DMC_FLAG_MORE, request_id, 0);
}

DMC_EXPORT int dmc_local_need_begin(struct dmc_reader *r, const void *payload, size_t len,
				    uint32_t *ret_first, uint32_t *ret_n)
{
	uint32_t first, n;

	dmc_reader_init(r, payload, len);
	first = dmc_read_u32(r);
	n = dmc_read_u32(r);
	/* each path takes at least its 4-byte length */
	if (r->err || n == 0 || n > DMC_FDS_MAX || (uint64_t)n * 4 > len - r->pos)
		return DMC_PROTO_ERROR;
	*ret_first = first;
	*ret_n = n;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_local_files_encode(uint32_t first, const int32_t *errs, uint32_t n,
				      uint32_t request_id, void *out, size_t cap)
{
	struct dmc_writer w;
	uint32_t nfds = 0;

	if (n == 0 || n > DMC_FDS_MAX)
		return DMC_PROTO_NOSPACE;
	dmc_frame_begin(&w, out, cap);
	dmc_write_u32(&w, first);
	dmc_write_u32(&w, n);
	for (uint32_t i = 0; i < n; i++) {
		if (errs[i] < 0 || errs[i] > 4095)
			return DMC_PROTO_NOSPACE;
		nfds += errs[i] == 0;
		dmc_write_i32(&w, errs[i]);
	}
	return dmc_frame_end(&w, DMC_OP_LOCAL_FILES, 0, request_id, (uint8_t)nfds);
}

DMC_EXPORT int dmc_local_files_decode(const void *payload, size_t len, uint8_t nfds,
				      uint32_t *ret_first, uint32_t *ret_n, int32_t *errs,
				      uint32_t max)
{
	struct dmc_reader r;
	uint32_t first, n, zeros = 0;

	dmc_reader_init(&r, payload, len);
	first = dmc_read_u32(&r);
	n = dmc_read_u32(&r);
	if (r.err || n == 0 || n > DMC_FDS_MAX || n > max)
		return DMC_PROTO_ERROR;
	for (uint32_t i = 0; i < n; i++) {
		errs[i] = dmc_read_i32(&r);
		if (errs[i] < 0 || errs[i] > 4095)
			return DMC_PROTO_ERROR;
		zeros += errs[i] == 0;
	}
	if (dmc_reader_finish(&r) != DMC_PROTO_OK || zeros != nfds)
		return DMC_PROTO_ERROR;
	*ret_first = first;
	*ret_n = n;
	return DMC_PROTO_OK;
}

DMC_EXPORT int dmc_frame_set_nfds(void *frame, size_t len, uint8_t nfds)
{
	struct dmc_header h;

	if (nfds > DMC_FDS_MAX || dmc_header_decode(frame, len, &h) != DMC_PROTO_OK)
		return DMC_PROTO_ERROR;
	h.nfds = nfds;
	dmc_header_encode(&h, frame);
	return DMC_PROTO_OK;
}
