/* libdmcache (see dmcache.h, dmcache_priv.h): the cache's requests (PREFETCH with its
 * progress, CANCEL, LIST, EVICT, VERIFY, TIER) and dmc_strerror(). Used by one thread at a
 * time per client. */
#include "dmcache_priv.h"

/* A length-checked C string for the wire: "" for NULL. */
static int wire_str(struct dmc_client *c, const char *what, const char *s, struct dmc_str *ret)
{
	size_t n = s ? strlen(s) : 0;
	char msg[128];

	if ((uint64_t)n > DMC_STR_MAX) {
		snprintf(msg, sizeof(msg), "%s is longer than %u bytes", what, DMC_STR_MAX);
		set_local_error(c, 0, msg);
		return -EINVAL;
	}
	ret->ptr = s ? s : "";
	ret->len = (uint32_t)n;
	return 0;
}

/* Sends a frame built in a heap buffer of `cap` bytes, then wipes and frees it. */
static int call_heap(struct dmc_client *c, uint8_t *frame, size_t cap, int n, uint32_t id,
		     uint16_t op)
{
	int rc = call(c, frame, n, id, op);

	explicit_bzero(frame, cap);
	free(frame);
	return rc;
}

static const char *put_str(char **p, struct dmc_str s)
{
	char *d = *p;

	if (s.len)
		memcpy(d, s.ptr, s.len);
	d[s.len] = '\0';
	*p += (size_t)s.len + 1;
	return d;
}

/* Decodes the PREFETCH frame in c->rbuf into *ret, with its strings in c->sbuf. */
static int progress_from_frame(struct dmc_client *c, struct dmc_progress_info *ret)
{
	struct dmc_progress m;
	size_t need;
	char *p;

	if (dmc_progress_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &m))
		return -EPROTO;
	/* the six strings lie inside the payload: their bytes and NULs fit in length + 6 */
	need = (size_t)c->rhdr.length + 6;
	if (need > c->scap) {
		char *nb = realloc(c->sbuf, need);
		if (!nb)
			return -ENOMEM;
		c->sbuf = nb;
		c->scap = need;
	}
	p = c->sbuf;
	ret->job_id = m.job_id;
	ret->snapshot_id = m.snapshot_id;
	ret->state = m.state;
	ret->project_id = put_str(&p, m.project_id);
	ret->project_name = put_str(&p, m.project_name);
	ret->version = put_str(&p, m.version);
	ret->items_total = m.items_total;
	ret->items_done = m.items_done;
	ret->items_cached = m.items_cached;
	ret->items_failed = m.items_failed;
	ret->bytes_total = m.bytes_total;
	ret->bytes_done = m.bytes_done;
	ret->rate_bps = m.rate_bps;
	ret->eta_ms = m.eta_ms;
	ret->error_code = m.error_code;
	ret->http_status = m.http_status;
	ret->error_resource = put_str(&p, m.error_resource);
	ret->error_message = put_str(&p, m.error_message);
	return 0;
}

static int check_prefetch_args(struct dmc_client *c, const struct dmc_prefetch_args *a,
			       struct dmc_prefetch *m)
{
	int rc;

	if (!a || !a->project || !*a->project) {
		set_local_error(c, 0, "no project given");
		return -EINVAL;
	}
	*m = (struct dmc_prefetch){ .source = a->source, .flags = a->flags };
	if (a->flags & DMC_PREFETCH_SHARD) {
		if (a->shard_world < 1 || a->shard_world > DMC_SHARD_WORLD_MAX ||
		    a->shard_rank >= a->shard_world) {
			set_local_error(c, 0, "a shard is RANK/WORLD with RANK < WORLD");
			return -EINVAL;
		}
		m->shard_rank = a->shard_rank;
		m->shard_world = a->shard_world;
	}
	if ((rc = wire_str(c, "the project", a->project, &m->project)) < 0 ||
	    (rc = wire_str(c, "the version", a->version, &m->version)) < 0 ||
	    (rc = wire_str(c, "the server URL", a->server, &m->server)) < 0 ||
	    (rc = wire_str(c, "the API key", a->api_key, &m->api_key)) < 0)
		return rc;
	switch (a->source) {
	case DMC_SOURCE_DATAMINT:
		if (!m->server.len || (!m->api_key.len && !(a->flags & DMC_PREFETCH_OFFLINE))) {
			set_local_error(c, 0, m->server.len ? "a Datamint prefetch needs an API key"
							    : "a Datamint prefetch needs a server URL");
			return -EINVAL;
		}
		return 0;
	case DMC_SOURCE_LOCAL:
		if (a->project[0] != '/' || m->server.len || m->api_key.len) {
			set_local_error(c, 0, "a local source is an absolute directory path, "
					      "with no server and no key");
			return -EINVAL;
		}
		return 0;
	}
	set_local_error(c, 0, "unknown source");
	return -EINVAL;
}

DMC_EXPORT int dmc_prefetch(dmc_client *c, const struct dmc_prefetch_args *args,
			    dmc_progress_cb cb, void *userdata, struct dmc_progress_info *ret_final)
{
	struct dmc_progress_info info;
	struct dmc_prefetch m;
	uint32_t id = c->next_id++;
	uint8_t *frame;
	uint64_t cap;
	int rc, n, json_fd;

	rc = check_prefetch_args(c, args, &m);
	if (rc < 0)
		return rc;
	cap = (uint64_t)DMC_HEADER_SIZE + 8 + 8 + 4 * 4 + (uint64_t)m.project.len + m.version.len +
	      m.server.len + m.api_key.len;
	if (cap > DMC_HEADER_SIZE + (uint64_t)DMC_FRAME_MAX) {
		set_local_error(c, 0, "the request is larger than a frame");
		return -EINVAL;
	}
	frame = malloc((size_t)cap);
	if (!frame)
		return -ENOMEM;
	n = dmc_prefetch_encode(&m, id, frame, (size_t)cap);
	if (m.source == DMC_SOURCE_LOCAL && n > 0) {
		/* the daemon reads dataset.json, then every file, through our descriptors */
		rc = feed_add(c, id, args->project, true, &json_fd);
		if (rc == 0) {
			dmc_frame_set_nfds(frame, (size_t)n, 1);
			rc = send_frame_fds(c, frame, (size_t)n, &json_fd, 1);
			close(json_fd);
			if (rc < 0)
				feed_remove(c, id);
		}
	} else {
		rc = send_frame(c, frame, n);
	}
	explicit_bzero(frame, (size_t)cap); /* it holds the key */
	free(frame);
	if (rc < 0)
		return rc;
	for (;;) {
		rc = recv_for(c, id);
		if (rc < 0)
			return rc;
		if (c->rhdr.opcode != DMC_OP_PREFETCH)
			goto protocol;
		rc = progress_from_frame(c, &info);
		if (rc == -EPROTO)
			goto protocol;
		if (rc < 0)
			return rc;
		if (!(c->rhdr.flags & DMC_FLAG_MORE)) {
			if (info.state != DMC_JOB_DONE && info.state != DMC_JOB_FAILED &&
			    info.state != DMC_JOB_CANCELLED)
				goto protocol;
			*ret_final = info;
			return 0;
		}
		if (cb && cb(&info, userdata))
			return -ECANCELED;
		if (interrupted(c))
			return -EINTR;
	}
protocol:
	close_fd(c);
	return -EPROTO;
}

DMC_EXPORT int dmc_cancel(dmc_client *c, const char *project, const char *server,
			  uint32_t *ret_count)
{
	struct dmc_str p, sv;
	uint32_t id = c->next_id++, n;
	uint8_t *frame;
	size_t cap;
	int rc;

	if (!project || !*project) {
		set_local_error(c, 0, "no project given");
		return -EINVAL;
	}
	if ((rc = wire_str(c, "the project", project, &p)) < 0 ||
	    (rc = wire_str(c, "the server URL", server, &sv)) < 0)
		return rc;
	cap = DMC_HEADER_SIZE + 8 + (size_t)p.len + sv.len;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	rc = call_heap(c, frame, cap, dmc_cancel_encode(p.ptr, sv.ptr, id, frame, cap), id,
		       DMC_OP_CANCEL);
	if (rc < 0)
		return rc;
	if (dmc_cancel_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &n))
		return -EPROTO;
	if (ret_count)
		*ret_count = n;
	return 0;
}

DMC_EXPORT void dmc_list_free(struct dmc_snapshot_list *l)
{
	if (!l)
		return;
	for (uint32_t i = 0; i < l->n; i++) {
		free(l->snapshots[i].server);
		free(l->snapshots[i].project_id);
		free(l->snapshots[i].project_name);
		free(l->snapshots[i].version);
	}
	free(l->snapshots);
	free(l);
}

/* The smallest snapshot record: u64 u32 u32, 4 empty str, 4 u64. */
#define SNAPSHOT_RECORD_MIN (8u + 4 + 4 + 4 * 4 + 4 * 8)

DMC_EXPORT int dmc_list(dmc_client *c, struct dmc_snapshot_list **ret_list)
{
	uint8_t frame[64];
	struct dmc_snapshot_list *l;
	struct dmc_reader r;
	uint32_t id = c->next_id++, n;
	int rc;

	rc = call(c, frame, dmc_list_encode(id, frame, sizeof(frame)), id, DMC_OP_LIST);
	if (rc < 0)
		return rc;
	dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
	n = dmc_read_u32(&r);
	if (r.err || n > DMC_LIST_MAX || (uint64_t)n * SNAPSHOT_RECORD_MIN > c->rhdr.length)
		return -EPROTO;
	l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->snapshots = calloc(n ? n : 1, sizeof(*l->snapshots));
	if (!l->snapshots) {
		free(l);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		struct dmc_snapshot_info si;
		struct dmc_snapshot_entry *e = &l->snapshots[i];

		dmc_snapshot_info_read(&r, &si);
		if (r.err) {
			rc = -EPROTO;
			goto fail;
		}
		l->n = i + 1; /* so that dmc_list_free frees this entry's strings */
		e->id = si.id;
		e->source = si.source;
		e->complete = si.complete == 1;
		e->downloading = si.complete == 2;
		e->server = str_dup(si.server);
		e->project_id = str_dup(si.project_id);
		e->project_name = str_dup(si.project_name);
		e->version = str_dup(si.version);
		e->items = si.items;
		e->items_stored = si.items_stored;
		e->bytes = si.bytes;
		e->created_ms = si.created_ms;
		e->owner_uid = si.owner_uid;
		e->bytes_stored = si.bytes_stored;
		if (!e->server || !e->project_id || !e->project_name || !e->version) {
			rc = -ENOMEM;
			goto fail;
		}
	}
	if (dmc_reader_finish(&r)) {
		rc = -EPROTO;
		goto fail;
	}
	*ret_list = l;
	return 0;
fail:
	dmc_list_free(l);
	return rc;
}

DMC_EXPORT int dmc_evict(dmc_client *c, bool all, const char *project,
			 struct dmc_evict_reply *ret_reply)
{
	struct dmc_evict_reply r;
	struct dmc_str p;
	uint32_t id = c->next_id++;
	uint8_t *frame;
	size_t cap;
	int rc;

	if (all ? project && *project : !project || !*project) {
		set_local_error(c, 0, all ? "evicting all snapshots takes no project"
					  : "no project given");
		return -EINVAL;
	}
	rc = wire_str(c, "the project", all ? NULL : project, &p);
	if (rc < 0)
		return rc;
	cap = DMC_HEADER_SIZE + 8 + (size_t)p.len;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	rc = call_heap(c, frame, cap,
		       dmc_evict_encode(all ? DMC_EVICT_ALL : 0, p.ptr, id, frame, cap), id,
		       DMC_OP_EVICT);
	if (rc < 0)
		return rc;
	if (dmc_evict_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r))
		return -EPROTO;
	if (ret_reply)
		*ret_reply = r;
	return 0;
}

DMC_EXPORT int dmc_verify(dmc_client *c, struct dmc_verify_reply *ret_reply)
{
	uint8_t frame[64];
	struct dmc_verify_reply r;
	uint32_t id = c->next_id++;
	int rc;

	rc = call(c, frame, dmc_verify_encode(id, frame, sizeof(frame)), id, DMC_OP_VERIFY);
	if (rc < 0)
		return rc;
	if (dmc_verify_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r))
		return -EPROTO;
	if (ret_reply)
		*ret_reply = r;
	return 0;
}

DMC_EXPORT int dmc_tier(dmc_client *c, uint32_t action, uint32_t flags,
			struct dmc_tier_reply *ret_reply)
{
	uint8_t frame[64];
	struct dmc_tier_reply r;
	uint32_t id = c->next_id++;
	int rc;

	rc = call(c, frame, dmc_tier_encode(action, flags, id, frame, sizeof(frame)), id,
		  DMC_OP_TIER);
	if (rc < 0)
		return rc;
	if (dmc_tier_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r))
		return -EPROTO;
	if (ret_reply)
		*ret_reply = r;
	return 0;
}

DMC_EXPORT const char *dmc_strerror(int err)
{
	const char *t;

	if (err >= 0)
		return "success";
	if (-err >= DMC_E_FIRST_ && -err <= DMC_E_LAST_ && (t = dmc_error_text((uint32_t)-err)))
		return t;
	switch (-err) {
	case ENOENT: return "no daemon socket found";
	case ECONNREFUSED: return "no daemon is listening on the socket";
	case ECONNRESET: return "the daemon closed the connection";
	case EPROTO: return "the daemon sent something this library does not understand";
	case ETIMEDOUT: return "the daemon did not answer in time";
	case EPERM: return "the socket belongs to an untrusted daemon";
	case EINTR: return "interrupted";
	case ECANCELED: return "stopped waiting; the job goes on in the daemon";
	case ENOTCONN: return "the connection to the daemon is closed";
	}
	return strerror(-err);
}
