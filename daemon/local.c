/* Local dataset folders: the dataset.json parser (a streaming scanner of the top-level
 * object, jansson for each value) and path checks. See local.h. Any thread; no global state. */
#include <errno.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "local.h"
#include "proto.h"
#include "store.h"

void local_stamp_of(const struct stat *st, struct local_stamp *ret)
{
	memset(ret, 0, sizeof(*ret));
	ret->dev = (uint64_t)st->st_dev;
	ret->ino = (uint64_t)st->st_ino;
	ret->size = (int64_t)st->st_size;
	ret->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000ll + st->st_mtim.tv_nsec;
	ret->ctime_ns = (int64_t)st->st_ctim.tv_sec * 1000000000ll + st->st_ctim.tv_nsec;
}

void local_listing_free(struct local_dataset *l)
{
	free(l->listing);
	free(l->lpool);
	l->listing = NULL;
	l->lpool = NULL;
	l->lpool_len = l->lpool_cap = 0;
}

void local_dataset_free(struct local_dataset *l)
{
	if (!l)
		return;
	local_listing_free(l);
	if (l->map) {
		munmap(l->map, l->map_len);
	} else {
		free(l->items);
		free(l->masks);
		free(l->pool);
	}
	free(l->root);
	free(l->name);
	free(l->version);
	free(l);
}

int local_path_ok(const char *path, size_t len)
{
	const char *p = path, *end = path + len;

	if (len == 0 || len > DMC_LOCAL_PATH_MAX || memchr(path, '\0', len) || path[0] == '/')
		return -EACCES;
	while (p < end) {
		const char *slash = memchr(p, '/', (size_t)(end - p));
		size_t n = slash ? (size_t)(slash - p) : (size_t)(end - p);
		if (n == 2 && p[0] == '.' && p[1] == '.')
			return -EACCES;
		p += n + 1;
	}
	return 0;
}

const char *local_path(const struct local_dataset *l, uint32_t k)
{
	uint32_t lo = 0, hi = l->n;

	/* the last item whose first path is <= k */
	while (hi - lo > 1) {
		uint32_t mid = lo + (hi - lo) / 2;
		if (l->items[mid].first_path <= k)
			lo = mid;
		else
			hi = mid;
	}
	if (lo >= l->n || k < l->items[lo].first_path ||
	    k > l->items[lo].first_path + l->items[lo].n_masks)
		return NULL;
	k -= l->items[lo].first_path;
	return k == 0 ? local_item_path(l, lo) : local_mask_path(l, lo, k - 1);
}

static const char *mime_of(const char *path)
{
	size_t n = strlen(path);
	static const struct {
		const char *ext, *mime;
	} map[] = {
		{ ".dcm", "application/dicom" }, { ".dicom", "application/dicom" },
		{ ".png", "image/png" },	   { ".jpg", "image/jpeg" },
		{ ".jpeg", "image/jpeg" },	   { ".nii.gz", "application/nifti" },
		{ ".nii", "application/nifti" },
	};

	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
		size_t e = strlen(map[i].ext);
		if (n >= e && strcasecmp(path + n - e, map[i].ext) == 0)
			return map[i].mime;
	}
	return "application/octet-stream";
}

/* ---- the item table (local.h) ---- */
#define POOL_MAX ((size_t)UINT32_MAX)        /* ids and paths: offsets are 32 bits */
#define LPOOL_MAX (4ull * LOCAL_JSON_MAX) /* compact records never grow that much */

struct pool {
	char **p;
	size_t *len, *cap;
	size_t max;
};

static struct pool ids_pool(struct local_dataset *l)
{
	return (struct pool){ &l->pool, &l->pool_len, &l->pool_cap, POOL_MAX };
}

static struct pool listing_pool(struct local_dataset *l)
{
	return (struct pool){ &l->lpool, &l->lpool_len, &l->lpool_cap, LPOOL_MAX };
}

static int pool_reserve(struct pool b, size_t more)
{
	size_t cap = *b.cap ? *b.cap : (size_t)1 << 16;
	char *p;

	if (*b.len + more <= *b.cap)
		return 0;
	if (*b.len + more > b.max)
		return -EFBIG; /* jr_array() words it */
	while (cap < *b.len + more)
		cap *= 2;
	p = realloc(*b.p, cap);
	if (!p)
		return -ENOMEM;
	*b.p = p;
	*b.cap = cap;
	return 0;
}

/* Appends `len` bytes and a NUL: *ret_off is where they start. */
static int pool_add(struct pool b, const char *s, size_t len, uint64_t *ret_off)
{
	int rc = pool_reserve(b, len + 1);

	if (rc < 0)
		return rc;
	memcpy(*b.p + *b.len, s, len);
	(*b.p)[*b.len + len] = '\0';
	*ret_off = *b.len;
	*b.len += len + 1;
	return 0;
}

static int pool_add_json(struct pool b, json_t *s, uint64_t *ret_off)
{
	return pool_add(b, json_string_value(s), json_string_length(s), ret_off);
}

/* The same into the ids' pool, whose offsets are 32 bits. */
static int ids_add(struct local_dataset *l, json_t *s, uint32_t *ret_off)
{
	uint64_t off = 0;
	int rc = pool_add_json(ids_pool(l), s, &off);

	*ret_off = (uint32_t)off;
	return rc;
}

/* The parse is over: the arrays shrink to their size. */
static void table_fix(struct local_dataset *l)
{
	void *v;

	if (l->pool_len && (v = realloc(l->pool, l->pool_len)))
		l->pool = v, l->pool_cap = l->pool_len;
	if (l->lpool_len && (v = realloc(l->lpool, l->lpool_len)))
		l->lpool = v, l->lpool_cap = l->lpool_len;
	if (l->n && (v = realloc(l->items, l->n * sizeof(*l->items))))
		l->items = v, l->items_cap = l->n;
	if (l->n && l->listing && (v = realloc(l->listing, l->n * sizeof(*l->listing))))
		l->listing = v;
	if (l->n_masks && (v = realloc(l->masks, l->n_masks * sizeof(*l->masks))))
		l->masks = v, l->masks_cap = l->n_masks;
}

/* The table empties (another list of items replaces it). */
static void table_reset(struct local_dataset *l)
{
	l->n = l->n_paths = l->n_masks = 0;
	l->pool_len = l->lpool_len = 0;
}

/* A path of dataset.json, checked before the client is ever asked for it. */
static int checked_path(json_t *v, const char *what, size_t index, char *err, size_t errlen)
{
	if (!json_is_string(v)) {
		snprintf(err, errlen, "dataset.json: item %zu has no \"%s\"", index, what);
		return -DMC_E_INVALID_ARGUMENT;
	}
	if (local_path_ok(json_string_value(v), json_string_length(v)) < 0) {
		snprintf(err, errlen, "dataset.json: item %zu: '%.200s': outside the dataset folder",
			 index, json_string_value(v));
		return -EACCES;
	}
	return 0;
}

/* Adds record `rec` (an object: item `index` of the list) to the table. */
static int table_item(struct local_dataset *l, json_t *rec, const char *path_key, size_t index,
		      char *err, size_t errlen)
{
	json_t *path = json_object_get(rec, path_key), *id = json_object_get(rec, "id");
	json_t *fname = json_object_get(rec, "filename"), *mime = json_object_get(rec, "mimetype");
	struct pool lp = listing_pool(l);
	struct local_record *lr, scratch;
	struct local_item *it;
	json_t *anns, *a;
	const char *slash, *mt;
	size_t i, meta_len;
	int rc;

	if (l->n >= LOCAL_ITEMS_MAX) {
		snprintf(err, errlen, "dataset.json lists more than %u items", LOCAL_ITEMS_MAX);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	if ((rc = checked_path(path, path_key, index, err, errlen)) < 0)
		return rc;
	if (l->n == l->items_cap) {
		uint32_t cap = l->items_cap ? l->items_cap * 2 : 1024;
		void *v = realloc(l->items, (size_t)cap * sizeof(*l->items));
		if (!v)
			return -ENOMEM;
		l->items = v;
		l->items_cap = cap;
		if (!l->paths_only) {
			v = realloc(l->listing, (size_t)cap * sizeof(*l->listing));
			if (!v)
				return -ENOMEM;
			l->listing = v;
		}
	}
	it = &l->items[l->n];
	lr = l->paths_only ? &scratch : &l->listing[l->n];
	memset(it, 0, sizeof(*it));
	memset(lr, 0, sizeof(*lr));
	it->first_path = l->n_paths;
	it->first_mask = l->n_masks;
	if ((rc = ids_add(l, path, &it->path)) < 0 ||
	    (rc = ids_add(l, json_is_string(id) ? id : path, &it->id)) < 0)
		return rc;
	slash = strrchr(json_string_value(path), '/');
	if (l->paths_only)
		rc = 0;
	else if (json_is_string(fname))
		rc = pool_add_json(lp, fname, &lr->filename);
	else if (slash)
		rc = pool_add(lp, slash + 1, strlen(slash + 1), &lr->filename);
	else
		rc = pool_add_json(lp, path, &lr->filename);
	if (rc < 0)
		return rc;
	mt = mime_of(json_string_value(path));
	rc = l->paths_only ? 0
	     : json_is_string(mime) ? pool_add_json(lp, mime, &lr->mimetype)
				    : pool_add(lp, mt, strlen(mt), &lr->mimetype);
	if (rc < 0)
		return rc;
	if (l->n_paths >= LOCAL_PATHS_MAX) {
		snprintf(err, errlen, "dataset.json names more than %u files", LOCAL_PATHS_MAX);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	anns = json_object_get(rec, "annotations");
	json_array_foreach(anns, i, a) {
		json_t *file = json_object_get(a, "file"), *aid = json_object_get(a, "id");
		struct local_mask *m;
		if (!json_is_string(file))
			continue;
		if ((rc = checked_path(file, "file", index, err, errlen)) < 0)
			return rc;
		if (l->n_paths + 1 + it->n_masks >= LOCAL_PATHS_MAX) {
			snprintf(err, errlen, "dataset.json names more than %u files", LOCAL_PATHS_MAX);
			return -DMC_E_LIMIT_EXCEEDED;
		}
		if (it->n_masks + 1 >= DMC_FDS_MAX) {
			snprintf(err, errlen, "dataset.json: item %zu has more than %u segmentation "
				 "files", index, DMC_FDS_MAX - 1);
			return -DMC_E_LIMIT_EXCEEDED;
		}
		if (l->n_masks == l->masks_cap) {
			uint32_t cap = l->masks_cap ? l->masks_cap * 2 : 256;
			void *v = realloc(l->masks, (size_t)cap * sizeof(*l->masks));
			if (!v)
				return -ENOMEM;
			l->masks = v;
			l->masks_cap = cap;
		}
		m = &l->masks[l->n_masks];
		if ((rc = ids_add(l, json_is_string(aid) ? aid : file, &m->annotation_id)) < 0 ||
		    (rc = ids_add(l, file, &m->path)) < 0)
			return rc;
		l->n_masks++;
		it->n_masks++;
	}
	if (l->paths_only) {
		l->n_paths += 1 + it->n_masks;
		l->n++;
		return 0;
	}
	/* the record as compact JSON with sorted keys, written straight into the pool */
	meta_len = json_dumpb(rec, NULL, 0, JSON_COMPACT | JSON_SORT_KEYS);
	if (meta_len == 0)
		return -ENOMEM;
	if ((rc = pool_reserve(lp, meta_len + 1)) < 0)
		return rc;
	if (json_dumpb(rec, l->lpool + l->lpool_len, meta_len, JSON_COMPACT | JSON_SORT_KEYS) !=
	    meta_len)
		return -ENOMEM;
	l->lpool[l->lpool_len + meta_len] = '\0';
	lr->meta = l->lpool_len;
	lr->meta_len = meta_len;
	l->lpool_len += meta_len + 1;
	l->n_paths += 1 + it->n_masks;
	l->n++;
	return 0;
}

/* ---- the reader: dataset.json a block at a time ----
 *
 * The top-level object is scanned here (whitespace, quotes, brackets, commas and colons);
 * every value in it is decoded on its own by jansson (json_loadb), which checks all that
 * lies within. An array at the top level is decoded one element at a time, so no more
 * than one resource record is ever a jansson tree. Every byte read is hashed.
 */
#define JR_BUF ((size_t)256 << 10)

struct jr {
	int fd;
	uint64_t off, size; /* the next offset to read; the size fstat() said */
	size_t pos, len;
	unsigned long line;
	EVP_MD_CTX *md;
	bool cap_on;        /* bytes taken are appended to cap */
	char *cap;
	size_t cap_len, cap_size;
	int rc;             /* the first failure, its message in err */
	char *err;
	size_t errlen;
	unsigned char buf[JR_BUF];
};

/* A syntax error at the current line (unless a failure is on record already). */
static int jr_fail(struct jr *r, const char *what)
{
	if (r->rc < 0)
		return r->rc;
	r->rc = -DMC_E_INVALID_ARGUMENT;
	snprintf(r->err, r->errlen, "dataset.json:%lu: %s", r->line, what);
	return r->rc;
}

/* The next byte, not taken; -1 at the end of the file or on a failure (r->rc). */
static int jr_peek(struct jr *r)
{
	ssize_t n;

	if (r->pos < r->len)
		return r->buf[r->pos];
	if (r->rc < 0 || r->off >= r->size)
		return -1;
	do
		n = pread(r->fd, r->buf, r->size - r->off < JR_BUF ? (size_t)(r->size - r->off)
								   : JR_BUF, (off_t)r->off);
	while (n < 0 && errno == EINTR);
	if (n <= 0) { /* EAGAIN too: nothing is waited for */
		r->rc = n < 0 ? -errno : -EIO;
		snprintf(r->err, r->errlen, "cannot read dataset.json: %s",
			 n < 0 ? strerror(errno) : "it shrank while read");
		return -1;
	}
	if (EVP_DigestUpdate(r->md, r->buf, (size_t)n) != 1) {
		r->rc = -ENOMEM;
		snprintf(r->err, r->errlen, "cannot hash dataset.json");
		return -1;
	}
	r->off += (uint64_t)n;
	r->len = (size_t)n;
	r->pos = 0;
	return r->buf[0];
}

/* The next byte, taken (and captured when r->cap_on); -1 as jr_peek(). */
static int jr_get(struct jr *r)
{
	int c = jr_peek(r);

	if (c < 0)
		return c;
	r->pos++;
	if (c == '\n')
		r->line++;
	if (r->cap_on) {
		if (r->cap_len == r->cap_size) {
			size_t size = r->cap_size ? r->cap_size * 2 : 4096;
			char *p = realloc(r->cap, size);
			if (!p) {
				r->rc = -ENOMEM;
				snprintf(r->err, r->errlen, "out of memory");
				return -1;
			}
			r->cap = p;
			r->cap_size = size;
		}
		r->cap[r->cap_len++] = (char)c;
	}
	return c;
}

static void jr_skip_ws(struct jr *r)
{
	int c;

	while ((c = jr_peek(r)) == ' ' || c == '\t' || c == '\n' || c == '\r')
		jr_get(r);
}

/* Takes one JSON value's bytes: a string, array or object by its quotes and brackets, a
 * number or literal up to the next delimiter. What lies within is checked by its decode. */
static int jr_skip_value(struct jr *r)
{
	size_t depth = 0;
	bool in_str = false;
	int c = jr_peek(r);

	if (c < 0)
		return jr_fail(r, "unexpected end of file");
	if (c != '"' && c != '[' && c != '{') {
		while ((c = jr_peek(r)) >= 0 && c != ',' && c != ']' && c != '}' && c != ' ' &&
		       c != '\t' && c != '\n' && c != '\r')
			jr_get(r);
		return r->rc;
	}
	do {
		if ((c = jr_get(r)) < 0)
			return jr_fail(r, "unexpected end of file");
		if (in_str) {
			if (c == '\\' && jr_get(r) < 0)
				return jr_fail(r, "unexpected end of file");
			if (c == '"')
				in_str = false;
		} else if (c == '"') {
			in_str = true;
		} else if (c == '[' || c == '{') {
			depth++;
		} else if (c == ']' || c == '}') {
			depth--; /* >= 1 here: the value began with a bracket */
		}
	} while (in_str || depth > 0);
	return 0;
}

/* Takes and decodes the next value (any JSON value): a new reference, or NULL (r->rc). */
static json_t *jr_value(struct jr *r)
{
	unsigned long line = r->line;
	json_error_t jerr;
	json_t *v;

	r->cap_len = 0;
	r->cap_on = true;
	jr_skip_value(r);
	r->cap_on = false;
	if (r->rc < 0)
		return NULL;
	v = json_loadb(r->cap, r->cap_len, JSON_DECODE_ANY, &jerr);
	if (!v) {
		r->rc = -DMC_E_INVALID_ARGUMENT;
		snprintf(r->err, r->errlen, "dataset.json:%lu: %s",
			 line + (jerr.line > 0 ? (unsigned long)jerr.line - 1 : 0), jerr.text);
	}
	return v;
}

/* An array at the top level, element by element: each one checked, and with `take` each
 * one (a resource record) added to the table. */
static int jr_array(struct jr *r, struct local_dataset *l, bool take, const char *path_key)
{
	int c, rc;

	jr_get(r); /* [ */
	jr_skip_ws(r);
	if (jr_peek(r) == ']') {
		jr_get(r);
		return 0;
	}
	for (size_t i = 0;; i++) {
		json_t *rec = jr_value(r);
		if (!rec)
			return r->rc;
		if (take && !json_is_object(rec)) {
			json_decref(rec);
			r->rc = -DMC_E_INVALID_ARGUMENT;
			snprintf(r->err, r->errlen, "dataset.json: item %zu is not an object", i);
			return r->rc;
		}
		rc = take ? table_item(l, rec, path_key, i, r->err, r->errlen) : 0;
		json_decref(rec);
		if (rc == -ENOMEM)
			snprintf(r->err, r->errlen, "out of memory");
		if (rc == -EFBIG) {
			rc = -DMC_E_LIMIT_EXCEEDED;
			snprintf(r->err, r->errlen, "dataset.json: item %zu: the records are too "
				 "large to hold", i);
		}
		if (rc < 0)
			return r->rc = rc;
		jr_skip_ws(r);
		c = jr_get(r);
		if (c == ']')
			return 0;
		if (c != ',')
			return jr_fail(r, c < 0 ? "unexpected end of file" : "',' or ']' expected");
		jr_skip_ws(r);
	}
}

enum { LIST_NONE, LIST_IMAGES, LIST_RESOURCES };

/* The whole file: one object, its "resources" (or section 4.4's Gen 0 "images") streamed
 * into the table; *name and *updated get the values of "name" and "updated_at". */
static int jr_document(struct jr *r, struct local_dataset *l, json_t **name, json_t **updated)
{
	bool seen_res = false, seen_img = false;
	int list = LIST_NONE, c;

	jr_skip_ws(r);
	if ((c = jr_get(r)) != '{')
		return jr_fail(r, c < 0 ? "unexpected end of file" : "not an object");
	jr_skip_ws(r);
	if (jr_peek(r) == '}') {
		jr_get(r);
	} else {
		for (;;) {
			json_t *key, *v;
			const char *k;
			bool is_res, is_img;
			if (jr_peek(r) != '"')
				return jr_fail(r, "string or '}' expected");
			if (!(key = jr_value(r)))
				return r->rc;
			k = json_string_value(key);
			is_res = strcmp(k, "resources") == 0;
			is_img = strcmp(k, "images") == 0;
			if ((is_res && seen_res) || (is_img && seen_img)) {
				json_decref(key);
				return jr_fail(r, is_res ? "\"resources\" given twice"
							 : "\"images\" given twice");
			}
			seen_res |= is_res;
			seen_img |= is_img;
			jr_skip_ws(r);
			if (jr_get(r) != ':') {
				json_decref(key);
				return jr_fail(r, "':' expected");
			}
			jr_skip_ws(r);
			if (jr_peek(r) == '[') {
				/* "resources" wins over "images", whichever comes first */
				bool take = is_res || (is_img && list != LIST_RESOURCES);
				if (take) {
					table_reset(l);
					list = is_res ? LIST_RESOURCES : LIST_IMAGES;
				}
				json_decref(key);
				if (jr_array(r, l, take, is_res ? "file" : "image_file") < 0)
					return r->rc;
			} else {
				if (!(v = jr_value(r))) {
					json_decref(key);
					return r->rc;
				}
				if (strcmp(k, "name") == 0 || strcmp(k, "updated_at") == 0) {
					json_t **slot = k[0] == 'n' ? name : updated;
					json_decref(*slot);
					*slot = v; /* the last one, as a decoded object keeps */
				} else {
					json_decref(v);
				}
				json_decref(key);
			}
			jr_skip_ws(r);
			c = jr_get(r);
			if (c == '}')
				break;
			if (c != ',')
				return jr_fail(r, c < 0 ? "unexpected end of file"
						       : "',' or '}' expected");
			jr_skip_ws(r);
		}
	}
	jr_skip_ws(r);
	if (jr_peek(r) >= 0)
		return jr_fail(r, "end of file expected");
	if (r->rc < 0)
		return r->rc;
	if (list == LIST_NONE) {
		snprintf(r->err, r->errlen,
			 "dataset.json has neither \"resources\" nor \"images\"");
		return r->rc = -DMC_E_INVALID_ARGUMENT;
	}
	return 0;
}

int local_parse(int json_fd, const char *root, bool paths_only, struct local_dataset **ret,
		char *err, size_t errlen)
{
	struct local_dataset *l = calloc(1, sizeof(*l));
	struct jr *r = calloc(1, sizeof(*r));
	json_t *name = NULL, *updated = NULL;
	struct local_stamp after;
	struct timespec now;
	struct stat st;
	unsigned int dlen = 0;
	int rc;

	if (!l || !r || !(l->root = strdup(root)) || !(r->md = EVP_MD_CTX_new()) ||
	    EVP_DigestInit_ex(r->md, store_sha256(), NULL) != 1) {
		rc = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	clock_gettime(CLOCK_REALTIME, &now);
	if (fstat(json_fd, &st) != 0) {
		rc = -errno;
		snprintf(err, errlen, "dataset.json: %s", strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = -EINVAL;
		snprintf(err, errlen, "dataset.json is not a regular file");
		goto out;
	}
	if ((uint64_t)st.st_size > LOCAL_JSON_MAX) {
		rc = -DMC_E_LIMIT_EXCEEDED;
		snprintf(err, errlen, "dataset.json is larger than %llu bytes",
			 (unsigned long long)LOCAL_JSON_MAX);
		goto out;
	}
	l->paths_only = paths_only;
	r->fd = json_fd;
	r->size = (uint64_t)st.st_size;
	r->line = 1;
	r->err = err;
	r->errlen = errlen;
	local_stamp_of(&st, &l->stamp);
	if ((rc = jr_document(r, l, &name, &updated)) < 0)
		goto out;
	/* what a later OPEN may take from this parse without reading (prefetch_local.c) */
	if (fstat(json_fd, &st) == 0) {
		int64_t now_ns = (int64_t)now.tv_sec * 1000000000ll + now.tv_nsec;
		local_stamp_of(&st, &after);
		l->stable = memcmp(&after, &l->stamp, sizeof(after)) == 0 &&
			    after.size == (int64_t)r->off &&
			    after.mtime_ns < now_ns - LOCAL_RACY_NS &&
			    after.ctime_ns < now_ns - LOCAL_RACY_NS;
	}
	if (EVP_DigestFinal_ex(r->md, l->digest, &dlen) != 1 || dlen != sizeof(l->digest)) {
		rc = -ENOMEM;
		snprintf(err, errlen, "cannot hash dataset.json");
		goto out;
	}
	if (json_is_string(name)) {
		l->name = strdup(json_string_value(name));
	} else {
		const char *b = strrchr(l->root, '/');
		l->name = strdup(b && b[1] ? b + 1 : l->root);
	}
	if (json_is_string(updated)) {
		l->version = strdup(json_string_value(updated));
	} else {
		char t[64];
		snprintf(t, sizeof(t), "mtime:%lld.%09ld", (long long)st.st_mtim.tv_sec,
			 st.st_mtim.tv_nsec);
		l->version = strdup(t);
	}
	if (!l->name || !l->version) {
		rc = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	table_fix(l);
out:
	json_decref(name);
	json_decref(updated);
	if (r) {
		EVP_MD_CTX_free(r->md);
		free(r->cap);
		free(r);
	}
	if (rc < 0) {
		local_dataset_free(l);
		return rc;
	}
	*ret = l;
	return 0;
}
