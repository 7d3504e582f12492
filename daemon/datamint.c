/* The Datamint REST API for the prefetcher: see datamint.h. */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <inttypes.h>
#include <stdbool.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "datamint.h"
#include "log.h"
#include "proto.h"

/* ---- JSON over HTTP ---- */

struct json_req;
typedef void (*json_done_fn)(struct json_req *r, const struct dm_error *e, json_t *root);

/* One GET whose JSON answer is parsed on the threadpool. */
struct json_req {
	const struct dm_client *c;
	struct fetch_xfer *x;
	uv_work_t work;
	char *body;
	size_t len, cap;
	json_t *root;
	json_error_t jerr;
	struct dm_error e;
	json_done_fn done;
	void *owner; /* the operation this request serves */
	const char *skip_key; /* a top-level key whose value is not parsed, or NULL */
};

static int json_on_start(struct fetch_xfer *x, const struct fetch_response *r)
{
	struct json_req *q = fetch_xfer_data(x);

	q->len = 0; /* a restarted body starts over */
	if (r->total_size != FETCH_SIZE_UNKNOWN && r->total_size > DM_JSON_MAX)
		return -DMC_E_LIMIT_EXCEEDED;
	return 0;
}

static int json_on_data(struct fetch_xfer *x, const void *buf, size_t len)
{
	struct json_req *q = fetch_xfer_data(x);

	if (q->len + len > DM_JSON_MAX)
		return -DMC_E_LIMIT_EXCEEDED;
	if (q->len + len + 1 > q->cap) {
		size_t cap = q->cap ? q->cap : 64u << 10;
		char *nb;
		while (cap < q->len + len + 1)
			cap *= 2;
		nb = realloc(q->body, cap);
		if (!nb)
			return -ENOMEM;
		q->body = nb;
		q->cap = cap;
	}
	memcpy(q->body + q->len, buf, len);
	q->len += len;
	return 0;
}

static bool json_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The end of the JSON string whose opening quote is s[i]: the index of its closing quote,
 * or n. */
static size_t json_string_end(const char *s, size_t n, size_t i)
{
	for (i++; i < n && s[i] != '"'; i++)
		if (s[i] == '\\')
			i++;
	return i < n ? i : n;
}

/* Just past the array or object that opens at s[i], or 0 when it does not close. */
static size_t json_container_end(const char *s, size_t n, size_t i)
{
	int depth = 0;

	for (; i < n; i++) {
		if (s[i] == '"')
			i = json_string_end(s, n, i);
		else if (s[i] == '[' || s[i] == '{')
			depth++;
		else if ((s[i] == ']' || s[i] == '}') && --depth == 0)
			return i + 1;
	}
	return 0;
}

/*
 * Overwrites, in place, the array or object value of the top-level key `key` with null and
 * spaces, so that a part of an answer the daemon never reads is not parsed into memory (a
 * dataset's resource id list: a million ids are tens of megabytes of objects). A text
 * that does not scan so (another shape, a scalar value) is left as it is.
 */
static void json_blank_key(char *s, size_t n, const char *key)
{
	size_t klen = strlen(key);
	int depth = 0;

	for (size_t i = 0; i < n; i++) {
		if (s[i] == '{' || s[i] == '[') {
			depth++;
		} else if (s[i] == '}' || s[i] == ']') {
			depth--;
		} else if (s[i] == '"') {
			size_t end = json_string_end(s, n, i), v, e;
			if (end >= n)
				return;
			for (v = end + 1; v < n && json_space(s[v]); v++)
				;
			if (depth == 1 && v < n && s[v] == ':' && end - i - 1 == klen &&
			    memcmp(s + i + 1, key, klen) == 0) {
				for (v++; v < n && json_space(s[v]); v++)
					;
				if (v >= n || (s[v] != '[' && s[v] != '{'))
					return;
				e = json_container_end(s, n, v);
				if (e >= v + 4) {
					memcpy(s + v, "null", 4);
					memset(s + v + 4, ' ', e - v - 4);
				}
				return;
			}
			i = end;
		}
	}
}

static void json_parse_work(uv_work_t *w)
{
	struct json_req *q = w->data;

	if (q->skip_key && q->body)
		json_blank_key(q->body, q->len, q->skip_key);

	q->root = json_loadb(q->body ? q->body : "", q->len, JSON_REJECT_DUPLICATES, &q->jerr);
}

static void json_req_free(struct json_req *q)
{
	fetch_xfer_free(q->x);
	free(q->body);
	free(q);
}

static void json_parsed(uv_work_t *w, int status)
{
	struct json_req *q = w->data;

	(void)status;
	if (!q->root && json_error_code(&q->jerr) == json_error_out_of_memory) {
		/* the answer may be fine: the daemon is short of memory, which passes */
		q->e.err = -DMC_E_OVERLOADED;
		snprintf(q->e.message, sizeof(q->e.message),
			 "out of memory while reading the server's answer: try again");
	} else if (!q->root) {
		q->e.err = -DMC_E_UPSTREAM_PERMANENT;
		snprintf(q->e.message, sizeof(q->e.message), "the server's answer is not JSON: %s",
			 q->jerr.text);
	}
	q->done(q, &q->e, q->root);
	json_decref(q->root);
	json_req_free(q);
}

static void json_on_done(struct fetch_xfer *x, const struct fetch_result *res)
{
	struct json_req *q = fetch_xfer_data(x);

	q->e.err = res->err;
	q->e.http_status = res->http_status;
	q->e.retry_after_ms = res->retry_after_ms;
	snprintf(q->e.message, sizeof(q->e.message), "%s", res->message);
	if (res->err) {
		q->done(q, &q->e, NULL);
		json_req_free(q);
		return;
	}
	q->work.data = q;
	if (uv_queue_work(q->c->loop, &q->work, json_parse_work, json_parsed) != 0) {
		q->e.err = -ENOMEM;
		q->done(q, &q->e, NULL);
		json_req_free(q);
	}
}

static void json_on_retry(struct fetch_xfer *x, const struct fetch_retry *r);

static const struct fetch_ops json_ops = {
	.on_start = json_on_start,
	.on_data = json_on_data,
	.on_done = json_on_done,
	.on_retry = json_on_retry,
};

static void json_on_retry(struct fetch_xfer *x, const struct fetch_retry *r)
{
	struct json_req *q = fetch_xfer_data(x);

	if (q->c->on_retry)
		q->c->on_retry(q->c->retry_ctx, r->message);
}

/* GET <server><path>; `path` already escaped. `flags`: FETCH_XF_* beyond METADATA. */
static int json_get_skip(const struct dm_client *c, const char *path, json_done_fn done,
			 void *owner, unsigned flags, const char *skip_key)
{
	struct json_req *q = calloc(1, sizeof(*q));
	size_t n = strlen(c->server) + strlen(path) + 1;
	char *url = malloc(n);
	int rc;

	if (!q || !url) {
		free(q);
		free(url);
		return -ENOMEM;
	}
	snprintf(url, n, "%s%s", c->server, path);
	q->c = c;
	q->done = done;
	q->owner = owner;
	q->skip_key = skip_key;
	q->x = fetch_xfer_new(c->fetch, url, c->origin, c->key, &json_ops, q);
	free(url);
	if (!q->x) {
		free(q);
		return -ENOMEM;
	}
	fetch_xfer_set_owner(q->x, c->uid);
	fetch_xfer_set_group(q->x, c->group);
	fetch_xfer_set_flags(q->x, FETCH_XF_METADATA | flags);
	rc = fetch_xfer_start(q->x);
	if (rc < 0)
		json_req_free(q);
	return rc;
}

static int json_get_flags(const struct dm_client *c, const char *path, json_done_fn done,
			  void *owner, unsigned flags)
{
	return json_get_skip(c, path, done, owner, flags, NULL);
}

static int json_get(const struct dm_client *c, const char *path, json_done_fn done, void *owner)
{
	return json_get_flags(c, path, done, owner, 0);
}

static char *escape(const char *s)
{
	return fetch_escape(s);
}

static char *dup_str(json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);

	if (json_is_string(v))
		return strdup(json_string_value(v));
	return NULL;
}

static void bad_shape(struct dm_error *e, const char *what)
{
	e->err = -DMC_E_UPSTREAM_PERMANENT;
	snprintf(e->message, sizeof(e->message), "unexpected answer from the server: %s", what);
}

/* ---- projects ---- */

struct resolve_op {
	const struct dm_client *c;
	char *want;
	dm_project_cb cb;
	void *ctx;
	struct dm_project *p;
};

void dm_project_free(struct dm_project *p)
{
	if (!p)
		return;
	free(p->id);
	free(p->name);
	free(p->dataset_id);
	free(p->worklist_id);
	free(p->version);
	free(p);
}

static void resolve_end(struct resolve_op *op, const struct dm_error *e)
{
	op->cb(op->ctx, e, e->err ? NULL : op->p);
	if (e->err)
		dm_project_free(op->p);
	free(op->want);
	free(op);
}

static void on_dataset(struct json_req *q, const struct dm_error *e, json_t *root)
{
	struct resolve_op *op = q->owner;
	struct dm_error e2 = *e;
	json_t *v;

	if (e->err) {
		/* 1.x clients map a 500 here to "not found" (section 2.3); we keep the code */
		resolve_end(op, e);
		return;
	}
	/* GET /datasets/{id} is the dataset object; tolerate {"data": {...}} too */
	if (json_is_object(json_object_get(root, "data")))
		root = json_object_get(root, "data");
	v = json_object_get(root, "updated_at");
	if (json_is_string(v)) {
		op->p->version = strdup(json_string_value(v));
	} else if (json_is_null(v) || !v) {
		/* never updated: the creation time is the version */
		op->p->version = dup_str(root, "created_at");
	}
	if (!op->p->version) {
		bad_shape(&e2, "dataset without updated_at");
		resolve_end(op, &e2);
		return;
	}
	resolve_end(op, &e2);
}

static int take_project(struct resolve_op *op, json_t *o)
{
	struct dm_project *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	p->id = dup_str(o, "id");
	p->name = dup_str(o, "name");
	p->dataset_id = dup_str(o, "dataset_id");
	p->worklist_id = dup_str(o, "worklist_id");
	if (!p->id || !p->name || !p->dataset_id) {
		dm_project_free(p);
		return -EINVAL;
	}
	op->p = p;
	return 0;
}

static void after_project(struct resolve_op *op)
{
	struct dm_error e = { 0 };
	char path[512];
	char *id = escape(op->p->dataset_id);
	int rc;

	if (!id) {
		e.err = -ENOMEM;
		resolve_end(op, &e);
		return;
	}
	snprintf(path, sizeof(path), "/datasets/%s", id);
	free(id);
	/* only the version is read: the resource id list it carries is not parsed */
	rc = json_get_skip(op->c, path, on_dataset, op, 0, "resource_ids");
	if (rc < 0) {
		e.err = rc;
		resolve_end(op, &e);
	}
}

static void on_project(struct json_req *q, const struct dm_error *e, json_t *root)
{
	struct resolve_op *op = q->owner;
	struct dm_error e2 = { 0 };

	if (e->err) {
		resolve_end(op, e);
		return;
	}
	if (json_is_object(json_object_get(root, "data")))
		root = json_object_get(root, "data");
	if (!json_is_object(root) || take_project(op, root) < 0) {
		bad_shape(&e2, "project without id, name or dataset_id");
		resolve_end(op, &e2);
		return;
	}
	after_project(op);
}

static void on_projects(struct json_req *q, const struct dm_error *e, json_t *root)
{
	struct resolve_op *op = q->owner;
	struct dm_error e2 = { 0 };
	json_t *list, *o;
	size_t i;

	if (e->err) {
		resolve_end(op, e);
		return;
	}
	/* {"data": [...]} (section 3.1), or a bare list */
	list = json_is_array(root) ? root : json_object_get(root, "data");
	if (!json_is_array(list)) {
		bad_shape(&e2, "GET /projects is not {\"data\": [...]}");
		resolve_end(op, &e2);
		return;
	}
	json_array_foreach(list, i, o) {
		json_t *id = json_object_get(o, "id"), *name = json_object_get(o, "name");
		if ((json_is_string(id) && strcmp(json_string_value(id), op->want) == 0) ||
		    (json_is_string(name) && strcmp(json_string_value(name), op->want) == 0)) {
			if (take_project(op, o) < 0) {
				bad_shape(&e2, "project without id, name or dataset_id");
				resolve_end(op, &e2);
				return;
			}
			after_project(op);
			return;
		}
	}
	/* the same answer whether it does not exist or this key may not see it */
	e2.err = -DMC_E_NOT_FOUND_OR_DENIED;
	e2.http_status = 404;
	snprintf(e2.message, sizeof(e2.message), "project not found");
	resolve_end(op, &e2);
}

static bool looks_like_uuid(const char *s)
{
	static const char pat[] = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";

	if (strlen(s) != sizeof(pat) - 1)
		return false;
	for (size_t i = 0; pat[i]; i++) {
		int hex = (s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') ||
			  (s[i] >= 'A' && s[i] <= 'F');
		if (pat[i] == '-' ? s[i] != '-' : !hex)
			return false;
	}
	return true;
}

int dm_resolve(const struct dm_client *c, const char *project, dm_project_cb cb, void *ctx)
{
	struct resolve_op *op = calloc(1, sizeof(*op));
	char path[512];
	int rc;

	if (!op)
		return -ENOMEM;
	op->c = c;
	op->cb = cb;
	op->ctx = ctx;
	op->want = strdup(project);
	if (!op->want) {
		free(op);
		return -ENOMEM;
	}
	if (looks_like_uuid(project)) {
		snprintf(path, sizeof(path), "/projects/%s", project);
		rc = json_get_flags(c, path, on_project, op, FETCH_XF_FIRST);
	} else {
		/* no server-side filter by name: list and match (section 3.1) */
		rc = json_get_flags(c, "/projects?includeArchived=true&offset=0&limit=5000",
				    on_projects, op, FETCH_XF_FIRST);
	}
	if (rc < 0) {
		free(op->want);
		free(op);
	}
	return rc;
}

/* ---- annotations ---- */

struct dm_annotations {
	json_t *by_resource; /* resource id -> array of annotations */
	uint64_t count;
};

struct ann_op {
	const struct dm_client *c;
	char *worklist;
	uint64_t offset;
	struct dm_annotations *a;
	dm_annotations_cb cb;
	void *ctx;
};

#define ANN_PAGE 5000u

void dm_annotations_free(struct dm_annotations *a)
{
	if (!a)
		return;
	json_decref(a->by_resource);
	free(a);
}

uint64_t dm_annotations_count(const struct dm_annotations *a)
{
	return a ? a->count : 0;
}

static int ann_next(struct ann_op *op);

static void ann_end(struct ann_op *op, const struct dm_error *e)
{
	op->cb(op->ctx, e, e->err ? NULL : op->a);
	if (e->err)
		dm_annotations_free(op->a);
	free(op->worklist);
	free(op);
}

static void on_ann_page(struct json_req *q, const struct dm_error *e, json_t *root)
{
	struct ann_op *op = q->owner;
	struct dm_error e2 = { 0 };
	json_t *list, *o;
	size_t i, n;
	int rc;

	if (e->err) {
		ann_end(op, e);
		return;
	}
	list = json_is_array(root) ? root : json_object_get(root, "data");
	if (!json_is_array(list)) {
		bad_shape(&e2, "GET /annotations is not {\"data\": [...]}");
		ann_end(op, &e2);
		return;
	}
	n = json_array_size(list);
	json_array_foreach(list, i, o) {
		json_t *rid = json_object_get(o, "resource_id"), *arr;
		if (!json_is_string(rid))
			continue;
		arr = json_object_get(op->a->by_resource, json_string_value(rid));
		if (!arr) {
			arr = json_array();
			json_object_set_new(op->a->by_resource, json_string_value(rid), arr);
		}
		json_array_append(arr, o);
		op->a->count++;
	}
	if (n < ANN_PAGE) {
		ann_end(op, &e2);
		return;
	}
	op->offset += n;
	rc = ann_next(op);
	if (rc < 0) {
		e2.err = rc;
		ann_end(op, &e2);
	}
}

static int ann_next(struct ann_op *op)
{
	char path[1024];

	/* published annotations only, as the client does without all_annotations (3.3.3) */
	snprintf(path, sizeof(path),
		 "/annotations?annotation_worklist_id=%s&status=published&offset=%" PRIu64
		 "&limit=%u",
		 op->worklist, op->offset, ANN_PAGE);
	return json_get(op->c, path, on_ann_page, op);
}

int dm_annotations(const struct dm_client *c, const char *worklist_id, dm_annotations_cb cb,
		   void *ctx)
{
	struct ann_op *op = calloc(1, sizeof(*op));
	int rc;

	if (!op)
		return -ENOMEM;
	op->c = c;
	op->cb = cb;
	op->ctx = ctx;
	op->a = calloc(1, sizeof(*op->a));
	if (!op->a || !(op->a->by_resource = json_object())) {
		free(op->a);
		free(op);
		return -ENOMEM;
	}
	if (!worklist_id) {
		struct dm_error e = { 0 };
		ann_end(op, &e);
		return 0;
	}
	op->worklist = escape(worklist_id);
	if (!op->worklist) {
		dm_annotations_free(op->a);
		free(op);
		return -ENOMEM;
	}
	rc = ann_next(op);
	if (rc < 0) {
		dm_annotations_free(op->a);
		free(op->worklist);
		free(op);
	}
	return rc;
}

/* ---- resources ---- */

struct page_op {
	const struct dm_client *c;
	const struct dm_annotations *ann;
	dm_page_cb cb;
	void *ctx;
};

void dm_page_free(struct dm_page *p)
{
	if (!p)
		return;
	for (uint32_t i = 0; i < p->n; i++) {
		struct dm_resource *r = &p->items[i];
		free(r->id);
		free(r->filename);
		free(r->mimetype);
		free(r->meta);
	}
	free(p->items);
	free(p);
}

char *dm_file_url(const struct dm_client *c, const char *resource_id)
{
	char *id = escape(resource_id), *url;
	size_t n;

	if (!id)
		return NULL;
	n = strlen(c->server) + strlen(id) + 32;
	url = malloc(n);
	if (url)
		snprintf(url, n, "%s/resources/%s/file", c->server, id);
	free(id);
	return url;
}

static char *mask_url(const struct dm_client *c, const char *rid, const char *aid)
{
	char *r = escape(rid), *a = escape(aid), *url = NULL;
	size_t n;

	if (r && a) {
		n = strlen(c->server) + strlen(r) + strlen(a) + 40;
		url = malloc(n);
		if (url)
			snprintf(url, n, "%s/annotations/%s/annotations/%s/file", c->server, r, a);
	}
	free(r);
	free(a);
	return url;
}

/* Fills `r` from one resource record. Returns 0, 1 to skip it (deleted), or < 0. */
static int take_resource(const struct page_op *op, json_t *o, struct dm_resource *r)
{
	json_t *size = json_object_get(o, "size"), *deleted = json_object_get(o, "deleted"),
	       *deleted_at = json_object_get(o, "deleted_at"), *anns;
	json_t *rec;

	if (json_is_true(deleted) || json_is_string(deleted_at))
		return 1;
	r->id = dup_str(o, "id");
	r->filename = dup_str(o, "filename");
	r->mimetype = dup_str(o, "mimetype");
	if (json_is_integer(size))
		r->size = json_integer_value(size);
	else if (json_is_string(size))
		r->size = strtoll(json_string_value(size), NULL, 10);
	else
		r->size = -1;
	if (!r->id)
		return -EINVAL;
	if (!r->filename)
		r->filename = strdup("");
	if (!r->mimetype)
		r->mimetype = strdup("application/octet-stream");

	rec = json_deep_copy(o);
	anns = op->ann ? json_object_get(op->ann->by_resource, r->id) : NULL;
	json_object_set_new(rec, "annotations", anns ? json_deep_copy(anns) : json_array());
	/* its segmentation files are read from this record when it is fetched (dm_masks_of) */
	r->meta = json_dumps(rec, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(rec);
	if (!r->meta || !r->filename || !r->mimetype)
		return -ENOMEM;
	r->meta_len = strlen(r->meta);
	return 0;
}

static void on_resources(struct json_req *q, const struct dm_error *e, json_t *root)
{
	struct page_op *op = q->owner;
	struct dm_error e2 = { 0 };
	struct dm_page *page = NULL;
	json_t *data, *list, *o, *total;
	size_t i, n;

	if (e->err) {
		op->cb(op->ctx, e, NULL);
		free(op);
		return;
	}
	/* {"data":[{"resources":[...]}],"totalCount":N}, or older {"data":[...]} (3.4) */
	data = json_object_get(root, "data");
	list = NULL;
	if (json_is_array(data) && json_array_size(data) >= 1 &&
	    json_is_array(json_object_get(json_array_get(data, 0), "resources")))
		list = json_object_get(json_array_get(data, 0), "resources");
	else if (json_is_array(data))
		list = data;
	if (!list) {
		bad_shape(&e2, "GET /resources is not {\"data\":[{\"resources\":[...]}]}");
		op->cb(op->ctx, &e2, NULL);
		free(op);
		return;
	}
	n = json_array_size(list);
	page = calloc(1, sizeof(*page));
	if (page)
		page->items = calloc(n ? n : 1, sizeof(*page->items));
	if (!page || !page->items) {
		free(page);
		e2.err = -ENOMEM;
		op->cb(op->ctx, &e2, NULL);
		free(op);
		return;
	}
	total = json_object_get(root, "totalCount");
	page->total = json_is_integer(total) ? (uint64_t)json_integer_value(total)
		      : json_is_string(total) ? strtoull(json_string_value(total), NULL, 10)
					      : 0;
	page->last = n < DM_PAGE_SIZE;
	page->returned = (uint32_t)n;
	json_array_foreach(list, i, o) {
		struct dm_resource *r = &page->items[page->n];
		int rc = take_resource(op, o, r);
		if (rc < 0) {
			page->n++; /* so that dm_page_free frees what was taken */
			dm_page_free(page);
			bad_shape(&e2, "a resource without an id");
			op->cb(op->ctx, &e2, NULL);
			free(op);
			return;
		}
		if (rc == 0)
			page->n++;
	}
	op->cb(op->ctx, &e2, page);
	free(op);
}

int dm_resources_page(const struct dm_client *c, const struct dm_project *proj, uint64_t offset,
		      const struct dm_annotations *ann, dm_page_cb cb, void *ctx)
{
	struct page_op *op = calloc(1, sizeof(*op));
	char filter[1024];
	char *f, *pid, path[2048];
	json_t *items;
	int rc;

	if (!op)
		return -ENOMEM;
	op->c = c;
	op->ann = ann;
	op->cb = cb;
	op->ctx = ctx;
	/* the project filter of section 3.4, as HEAD sends it */
	items = json_pack("{s:[s],s:s}", "items", proj->name, "filterType", "intersection");
	f = items ? json_dumps(items, JSON_COMPACT) : NULL;
	json_decref(items);
	snprintf(filter, sizeof(filter), "%s", f ? f : "");
	free(f);
	f = escape(filter);
	pid = escape(proj->id);
	if (!f || !pid) {
		free(f);
		free(pid);
		free(op);
		return -ENOMEM;
	}
	snprintf(path, sizeof(path),
		 "/resources?status=&project=%s&projectId=%s&order_field=created_at"
		 "&order_by_asc=true&offset=%" PRIu64 "&limit=%u",
		 f, pid, offset, DM_PAGE_SIZE);
	free(f);
	free(pid);
	rc = json_get(c, path, on_resources, op);
	if (rc < 0)
		free(op);
	return rc;
}

/* ---- metadata of stored items ---- */

int dm_masks_of(const struct dm_client *c, const char *resource_id, const char *meta,
		size_t meta_len, struct dm_mask **ret_masks, uint32_t *ret_n)
{
	json_t *rec = json_loadb(meta, meta_len, 0, NULL), *anns, *a;
	struct dm_mask *masks = NULL;
	uint32_t n = 0;
	size_t i;

	*ret_masks = NULL;
	*ret_n = 0;
	if (!rec)
		return 0; /* no metadata: no masks */
	anns = json_object_get(rec, "annotations");
	json_array_foreach(anns, i, a) {
		json_t *type = json_object_get(a, "annotation_type"), *aid = json_object_get(a, "id");
		struct dm_mask *m;

		if (!json_is_string(type))
			type = json_object_get(a, "type");
		if (!json_is_string(type) || strcmp(json_string_value(type), "segmentation") != 0 ||
		    !json_is_string(aid))
			continue;
		m = realloc(masks, (n + 1) * sizeof(*m));
		if (!m)
			goto nomem;
		masks = m;
		masks[n].annotation_id = strdup(json_string_value(aid));
		masks[n].url = mask_url(c, resource_id, json_string_value(aid));
		n++;
		if (!masks[n - 1].annotation_id || !masks[n - 1].url)
			goto nomem;
	}
	json_decref(rec);
	*ret_masks = masks;
	*ret_n = n;
	return 0;
nomem:
	for (uint32_t k = 0; k < n; k++) {
		free(masks[k].annotation_id);
		free(masks[k].url);
	}
	free(masks);
	json_decref(rec);
	return -ENOMEM;
}

int dm_meta_with_masks(const char *meta, size_t meta_len, const struct dm_mask *masks,
		       const uint8_t (*digests)[32], uint32_t n, char **ret, size_t *ret_len)
{
	json_t *rec = json_loadb(meta, meta_len, 0, NULL), *mb;
	char hex[65];
	char *out;

	if (!rec)
		rec = json_object();
	mb = json_object();
	if (!rec || !mb) {
		json_decref(rec);
		json_decref(mb);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		for (int k = 0; k < 32; k++)
			snprintf(hex + 2 * k, 3, "%02x", digests[i][k]);
		json_object_set_new(mb, masks[i].annotation_id, json_string(hex));
	}
	json_object_set_new(rec, "mask_blobs", mb);
	out = json_dumps(rec, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(rec);
	if (!out)
		return -ENOMEM;
	*ret = out;
	*ret_len = strlen(out);
	return 0;
}

