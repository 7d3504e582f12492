/* A local folder's item table kept on disk and mapped back. See local_table.h. Any thread
 * for write/map/remove (blocking: the threadpool); local_table_gc() on the loop. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "local_table.h"
#include "store.h"

#define LOCAL_TABLE_MAGIC "DMCLTAB\n"
#define LOCAL_TABLE_VERSION 1u
#define LOCAL_TABLE_HEADER 96u
#define TMP_PREFIX ".tmp-"

/* The header as it is on disk (host byte order, no padding before `check`). */
struct table_header {
	char magic[8];
	uint32_t version;
	uint32_t uid;
	uint8_t digest[32];
	uint32_t n, n_paths, n_masks;
	uint32_t item_size; /* sizeof(struct local_item), sizeof(struct local_mask) << 16 */
	uint64_t pool_len;
	uint64_t file_size;
	uint8_t check[8]; /* SHA-256 of the 80 bytes above, its first 8 bytes */
	uint8_t zero[8];
};
_Static_assert(sizeof(struct table_header) == LOCAL_TABLE_HEADER, "table header layout");
_Static_assert(offsetof(struct table_header, check) == 80, "table header layout");

static void table_name(char *buf, size_t len, const char *dir, uid_t uid, const uint8_t *digest)
{
	char hex[2 * 32 + 1];

	for (unsigned i = 0; i < 32; i++)
		snprintf(hex + 2 * i, 3, "%02x", digest[i]);
	snprintf(buf, len, "%s/" LOCAL_TABLE_DIR "/%u-%s", dir, (unsigned)uid, hex);
}

static int header_check(const struct table_header *h, uint8_t out[8])
{
	uint8_t md[32];
	unsigned int mdlen = 0;

	if (EVP_Digest(h, offsetof(struct table_header, check), md, &mdlen, store_sha256(), NULL) !=
		    1 ||
	    mdlen != sizeof(md))
		return -ENOMEM;
	memcpy(out, md, 8);
	return 0;
}

static uint32_t sizes_word(void)
{
	return (uint32_t)sizeof(struct local_item) | (uint32_t)sizeof(struct local_mask) << 16;
}

int local_table_write(const char *cache_dir, uid_t uid, const struct local_dataset *l)
{
	char dir[4096], tmp[4200], final[4200];
	struct table_header h;
	struct iovec iov[4];
	size_t want, done = 0;
	int fd, rc = 0;

	if (!l->n || !l->pool_len || l->map)
		return -EINVAL;
	if (snprintf(dir, sizeof(dir), "%s/" LOCAL_TABLE_DIR, cache_dir) >= (int)sizeof(dir))
		return -ENAMETOOLONG;
	if (mkdir(dir, 0700) != 0 && errno != EEXIST)
		return -errno;
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, LOCAL_TABLE_MAGIC, 8);
	h.version = LOCAL_TABLE_VERSION;
	h.uid = (uint32_t)uid;
	memcpy(h.digest, l->digest, 32);
	h.n = l->n;
	h.n_paths = l->n_paths;
	h.n_masks = l->n_masks;
	h.item_size = sizes_word();
	h.pool_len = l->pool_len;
	want = sizeof(h) + (size_t)l->n * sizeof(*l->items) +
	       (size_t)l->n_masks * sizeof(*l->masks) + l->pool_len;
	h.file_size = want;
	if ((rc = header_check(&h, h.check)) < 0)
		return rc;
	snprintf(tmp, sizeof(tmp), "%s/" TMP_PREFIX "XXXXXX", dir);
	fd = mkostemp(tmp, O_CLOEXEC);
	if (fd < 0)
		return -errno;
	iov[0] = (struct iovec){ &h, sizeof(h) };
	iov[1] = (struct iovec){ l->items, (size_t)l->n * sizeof(*l->items) };
	iov[2] = (struct iovec){ l->masks, (size_t)l->n_masks * sizeof(*l->masks) };
	iov[3] = (struct iovec){ l->pool, l->pool_len };
	while (done < want) {
		struct iovec v[4];
		size_t skip = done;
		int nv = 0;
		ssize_t w;

		for (int i = 0; i < 4; i++) {
			if (skip >= iov[i].iov_len) {
				skip -= iov[i].iov_len;
				continue;
			}
			v[nv].iov_base = (char *)iov[i].iov_base + skip;
			v[nv++].iov_len = iov[i].iov_len - skip;
			skip = 0;
		}
		w = pwritev(fd, v, nv, (off_t)done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			rc = w < 0 ? -errno : -EIO;
			break;
		}
		done += (size_t)w;
	}
	if (rc == 0 && fsync(fd) != 0)
		rc = -errno;
	if (close(fd) != 0 && rc == 0)
		rc = -errno;
	table_name(final, sizeof(final), cache_dir, uid, l->digest);
	if (rc == 0 && rename(tmp, final) != 0)
		rc = -errno;
	if (rc < 0)
		unlink(tmp);
	return rc;
}

void local_table_remove(const char *cache_dir, uid_t uid, const uint8_t digest[32])
{
	char path[4200];

	table_name(path, sizeof(path), cache_dir, uid, digest);
	unlink(path);
}

/* The table's structure, as local_parse() builds it: offsets inside the pool, masks and
 * paths counted in order. */
static bool table_sound(const struct local_dataset *l)
{
	uint32_t masks = 0, paths = 0;

	if (!l->pool_len || l->pool[l->pool_len - 1] != '\0')
		return false;
	for (uint32_t i = 0; i < l->n; i++) {
		const struct local_item *it = &l->items[i];
		if (it->id >= l->pool_len || it->path >= l->pool_len || it->first_mask != masks ||
		    it->first_path != paths || it->n_masks > l->n_masks - masks)
			return false;
		masks += it->n_masks;
		paths += 1 + it->n_masks;
	}
	if (masks != l->n_masks || paths != l->n_paths)
		return false;
	for (uint32_t k = 0; k < l->n_masks; k++)
		if (l->masks[k].annotation_id >= l->pool_len || l->masks[k].path >= l->pool_len)
			return false;
	return true;
}

int local_table_map(const char *cache_dir, uid_t uid, const uint8_t digest[32], uint32_t n,
		    const char *root, struct local_dataset **ret)
{
	char path[4200];
	struct table_header h;
	struct local_dataset *l = NULL;
	uint8_t check[8];
	struct stat st;
	uint64_t items_len, masks_len;
	void *map = MAP_FAILED;
	int fd, rc = -EBADMSG;

	table_name(path, sizeof(path), cache_dir, uid, digest);
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? -ENOENT : -EBADMSG;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size < (off_t)sizeof(h) ||
	    pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h))
		goto out;
	items_len = (uint64_t)h.n * sizeof(struct local_item);
	masks_len = (uint64_t)h.n_masks * sizeof(struct local_mask);
	if (memcmp(h.magic, LOCAL_TABLE_MAGIC, 8) != 0 || h.version != LOCAL_TABLE_VERSION ||
	    header_check(&h, check) < 0 || memcmp(check, h.check, 8) != 0 ||
	    h.uid != (uint32_t)uid || memcmp(h.digest, digest, 32) != 0 || h.n != n || !n ||
	    h.item_size != sizes_word() || h.n_masks > LOCAL_PATHS_MAX ||
	    h.n_paths > LOCAL_PATHS_MAX || h.pool_len > LOCAL_JSON_MAX ||
	    h.file_size != (uint64_t)st.st_size ||
	    h.file_size != sizeof(h) + items_len + masks_len + h.pool_len)
		goto out;
	map = mmap(NULL, (size_t)h.file_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (map == MAP_FAILED) {
		rc = -errno;
		goto out;
	}
	l = calloc(1, sizeof(*l));
	if (!l || !(l->root = strdup(root)) || !(l->name = strdup("")) ||
	    !(l->version = strdup(""))) {
		rc = -ENOMEM;
		goto out;
	}
	l->map = map;
	l->map_len = (size_t)h.file_size;
	map = MAP_FAILED; /* l's now */
	l->items = (struct local_item *)((char *)l->map + sizeof(h));
	l->masks = (struct local_mask *)((char *)l->items + items_len);
	l->pool = (char *)l->masks + masks_len;
	l->n = l->items_cap = h.n;
	l->n_paths = h.n_paths;
	l->n_masks = l->masks_cap = h.n_masks;
	l->pool_len = l->pool_cap = h.pool_len;
	l->paths_only = true;
	memcpy(l->digest, digest, 32);
	if (!table_sound(l))
		goto out;
	local_table_trim(l);
	rc = 0;
out:
	if (map != MAP_FAILED)
		munmap(map, (size_t)h.file_size);
	close(fd);
	if (rc < 0) {
		local_dataset_free(l);
		if (rc == -EBADMSG)
			unlink(path);
		return rc;
	}
	*ret = l;
	return 0;
}

bool local_table_path_ok(const char *p)
{
	return local_path_ok(p, strlen(p)) == 0;
}

void local_table_trim(const struct local_dataset *l)
{
	if (l && l->map)
		madvise(l->map, l->map_len, MADV_DONTNEED);
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

int local_table_gc(const char *cache_dir, bool (*keep)(void *ctx, uid_t uid, const uint8_t *digest),
		   void *ctx)
{
	char dir[4096];
	struct dirent *e;
	DIR *d;
	int removed = 0;

	snprintf(dir, sizeof(dir), "%s/" LOCAL_TABLE_DIR, cache_dir);
	if (!(d = opendir(dir)))
		return 0;
	while ((e = readdir(d))) {
		uint8_t digest[32];
		unsigned long uid;
		char *end;
		bool ok;

		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (strncmp(e->d_name, TMP_PREFIX, strlen(TMP_PREFIX)) == 0) {
			struct stat st;
			/* a write in progress on the threadpool is younger than this */
			if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
			    st.st_mtime > time(NULL) - 3600)
				continue;
			ok = false;
		} else {
			errno = 0;
			uid = strtoul(e->d_name, &end, 10);
			ok = errno == 0 && end != e->d_name && *end == '-' && uid <= UINT32_MAX &&
			     strlen(end + 1) == 64;
			for (unsigned i = 0; ok && i < 32; i++) {
				int hi = hexval(end[1 + 2 * i]), lo = hexval(end[2 + 2 * i]);
				ok = hi >= 0 && lo >= 0;
				digest[i] = (uint8_t)(hi << 4 | lo);
			}
			if (ok)
				ok = keep(ctx, (uid_t)uid, digest);
		}
		if (!ok && unlinkat(dirfd(d), e->d_name, 0) == 0)
			removed++;
	}
	closedir(d);
	return removed;
}
