/* Local dataset folders: the dataset.json parser and path checks. See local.h. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "local.h"
#include "proto.h"
#include "store.h"

void local_dataset_free(struct local_dataset *l)
{
	if (!l)
		return;
	for (uint32_t i = 0; i < l->n; i++) {
		struct local_item *it = &l->items[i];
		free(it->id);
		free(it->path);
		free(it->filename);
		free(it->mimetype);
		free(it->meta);
		for (uint32_t k = 0; k < it->n_masks; k++) {
			free(it->masks[k].annotation_id);
			free(it->masks[k].path);
		}
		free(it->masks);
	}
	free(l->items);
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
	return k == 0 ? l->items[lo].path : l->items[lo].masks[k - 1].path;
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

static int local_item(struct local_dataset *l, json_t *rec, const char *path_key, size_t index,
		      char *err, size_t errlen)
{
	struct local_item *it = &l->items[l->n];
	json_t *path = json_object_get(rec, path_key), *id = json_object_get(rec, "id");
	json_t *anns, *a;
	const char *slash;
	size_t i;
	int rc;

	if ((rc = checked_path(path, path_key, index, err, errlen)) < 0)
		return rc;
	it->first_path = l->n_paths;
	it->path = strdup(json_string_value(path));
	it->id = strdup(json_is_string(id) ? json_string_value(id) : json_string_value(path));
	slash = strrchr(it->path ? it->path : "", '/');
	it->filename = json_is_string(json_object_get(rec, "filename"))
			       ? strdup(json_string_value(json_object_get(rec, "filename")))
			       : strdup(slash ? slash + 1 : it->path ? it->path : "");
	it->mimetype = json_is_string(json_object_get(rec, "mimetype"))
			       ? strdup(json_string_value(json_object_get(rec, "mimetype")))
			       : strdup(mime_of(json_string_value(path)));
	l->n++; /* from here on, local_dataset_free frees this item's fields */
	l->n_paths++;
	if (!it->path || !it->id || !it->filename || !it->mimetype)
		return -ENOMEM;
	anns = json_object_get(rec, "annotations");
	json_array_foreach(anns, i, a) {
		json_t *file = json_object_get(a, "file"), *aid = json_object_get(a, "id");
		struct local_mask *m;
		if (!json_is_string(file))
			continue;
		if ((rc = checked_path(file, "file", index, err, errlen)) < 0)
			return rc;
		if (l->n_paths >= LOCAL_PATHS_MAX) {
			snprintf(err, errlen, "dataset.json names more than %u files", LOCAL_PATHS_MAX);
			return -DMC_E_LIMIT_EXCEEDED;
		}
		if (it->n_masks + 1 >= DMC_FDS_MAX) {
			snprintf(err, errlen, "dataset.json: item %zu has more than %u segmentation "
				 "files", index, DMC_FDS_MAX - 1);
			return -DMC_E_LIMIT_EXCEEDED;
		}
		m = realloc(it->masks, (it->n_masks + 1) * sizeof(*m));
		if (!m)
			return -ENOMEM;
		it->masks = m;
		m[it->n_masks].annotation_id =
			strdup(json_is_string(aid) ? json_string_value(aid) : json_string_value(file));
		m[it->n_masks].path = strdup(json_string_value(file));
		it->n_masks++;
		l->n_paths++;
		if (!m[it->n_masks - 1].annotation_id || !m[it->n_masks - 1].path)
			return -ENOMEM;
	}
	it->meta = json_dumps(rec, JSON_COMPACT | JSON_SORT_KEYS);
	if (!it->meta)
		return -ENOMEM;
	it->meta_len = strlen(it->meta);
	return 0;
}

/* Reads the whole of `fd` (a regular file, checked) with pread; never waits. */
static int read_json(int fd, struct stat *st, char **ret, size_t *ret_len, char *err,
		     size_t errlen)
{
	char *buf;
	size_t got = 0;

	if (fstat(fd, st) != 0)
		return -errno;
	if (!S_ISREG(st->st_mode)) {
		snprintf(err, errlen, "dataset.json is not a regular file");
		return -EINVAL;
	}
	if ((uint64_t)st->st_size > LOCAL_JSON_MAX) {
		snprintf(err, errlen, "dataset.json is larger than %llu bytes",
			 (unsigned long long)LOCAL_JSON_MAX);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	buf = malloc((size_t)st->st_size + 1);
	if (!buf)
		return -ENOMEM;
	while (got < (size_t)st->st_size) {
		ssize_t n = pread(fd, buf + got, (size_t)st->st_size - got, (off_t)got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			int rc = n < 0 ? -errno : -EIO; /* EAGAIN too: nothing is waited for */
			snprintf(err, errlen, "cannot read dataset.json: %s",
				 n < 0 ? strerror(errno) : "it shrank while read");
			free(buf);
			return rc;
		}
		got += (size_t)n;
	}
	*ret = buf;
	*ret_len = got;
	return 0;
}

int local_parse(int json_fd, const char *root, struct local_dataset **ret, char *err,
		size_t errlen)
{
	struct local_dataset *l = calloc(1, sizeof(*l));
	struct stat st;
	json_t *doc = NULL, *list, *rec, *v;
	json_error_t jerr;
	const char *path_key = "file";
	char *buf = NULL;
	size_t len = 0, i;
	int rc;

	if (!l)
		return -ENOMEM;
	l->root = strdup(root);
	if (!l->root) {
		rc = -ENOMEM;
		goto fail;
	}
	rc = read_json(json_fd, &st, &buf, &len, err, errlen);
	if (rc < 0)
		goto fail;
	rc = store_digest_of(buf, len, l->digest);
	if (rc < 0) {
		snprintf(err, errlen, "cannot hash dataset.json");
		goto fail;
	}
	doc = json_loadb(buf, len, 0, &jerr);
	if (!json_is_object(doc)) {
		rc = -DMC_E_INVALID_ARGUMENT;
		snprintf(err, errlen, "dataset.json:%d: %s", jerr.line, doc ? "not an object"
									  : jerr.text);
		goto fail;
	}
	/* section 4.4: Gen 0 "images"/"image_file"; later "resources"/"file" */
	list = json_object_get(doc, "resources");
	if (!json_is_array(list)) {
		list = json_object_get(doc, "images");
		path_key = "image_file";
	}
	if (!json_is_array(list)) {
		rc = -DMC_E_INVALID_ARGUMENT;
		snprintf(err, errlen, "dataset.json has neither \"resources\" nor \"images\"");
		goto fail;
	}
	if (json_array_size(list) > LOCAL_ITEMS_MAX) {
		rc = -DMC_E_LIMIT_EXCEEDED;
		snprintf(err, errlen, "dataset.json lists more than %u items", LOCAL_ITEMS_MAX);
		goto fail;
	}
	v = json_object_get(doc, "name");
	if (json_is_string(v)) {
		l->name = strdup(json_string_value(v));
	} else {
		const char *b = strrchr(l->root, '/');
		l->name = strdup(b && b[1] ? b + 1 : l->root);
	}
	v = json_object_get(doc, "updated_at");
	if (json_is_string(v)) {
		l->version = strdup(json_string_value(v));
	} else {
		char t[64];
		snprintf(t, sizeof(t), "mtime:%lld.%09ld", (long long)st.st_mtim.tv_sec,
			 st.st_mtim.tv_nsec);
		l->version = strdup(t);
	}
	l->items = calloc(json_array_size(list) ? json_array_size(list) : 1, sizeof(*l->items));
	if (!l->name || !l->version || !l->items) {
		rc = -ENOMEM;
		goto fail;
	}
	json_array_foreach(list, i, rec) {
		if (!json_is_object(rec)) {
			rc = -DMC_E_INVALID_ARGUMENT;
			snprintf(err, errlen, "dataset.json: item %zu is not an object", i);
			goto fail;
		}
		rc = local_item(l, rec, path_key, i, err, errlen);
		if (rc < 0)
			goto fail;
	}
	json_decref(doc);
	free(buf);
	*ret = l;
	return 0;
fail:
	json_decref(doc);
	free(buf);
	local_dataset_free(l);
	return rc;
}
