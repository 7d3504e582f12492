/*
 * npy: NumPy .npy version 1.0 writer (see npy.h and numpy's format.py).
 */
#include "npy.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const struct {
	const char *name;
	const char *le, *be;
} descrs[] = {
	{ "uint8", "|u1", "|u1" },   { "int8", "|i1", "|i1" },    { "uint16", "<u2", ">u2" },
	{ "int16", "<i2", ">i2" },   { "uint32", "<u4", ">u4" },  { "int32", "<i4", ">i4" },
	{ "uint64", "<u8", ">u8" },  { "int64", "<i8", ">i8" },   { "float32", "<f4", ">f4" },
	{ "float64", "<f8", ">f8" }, { "bool", "|b1", "|b1" },    { "float16", "<f2", ">f2" },
};

const char *npy_descr(const char *dtype_name)
{
	for (size_t i = 0; i < sizeof(descrs) / sizeof(descrs[0]); i++)
		if (dtype_name && strcmp(dtype_name, descrs[i].name) == 0)
			return __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? descrs[i].le : descrs[i].be;
	return NULL;
}

static int descr_ok(const char *d)
{
	if (!d || strlen(d) != 3 || (d[0] != '<' && d[0] != '>' && d[0] != '|'))
		return 0;
	if (!strchr("biuf", d[1]) || d[2] < '1' || d[2] > '8')
		return 0;
	return 1;
}

int npy_header(char *out, size_t cap, const char *descr, const uint64_t *shape, unsigned ndim)
{
	char dict[NPY_HEADER_MAX];
	size_t n = 0;
	int w;

	if (!descr_ok(descr) || ndim > NPY_NDIM_MAX)
		return -EINVAL;
	w = snprintf(dict, sizeof(dict), "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
	if (w < 0 || (size_t)w >= sizeof(dict))
		return -EINVAL;
	n = (size_t)w;
	for (unsigned i = 0; i < ndim; i++) {
		const char *sep = i + 1 < ndim ? ", " : ndim == 1 ? "," : "";
		w = snprintf(dict + n, sizeof(dict) - n, "%llu%s", (unsigned long long)shape[i], sep);
		if (w < 0 || (size_t)w >= sizeof(dict) - n)
			return -EINVAL;
		n += (size_t)w;
	}
	w = snprintf(dict + n, sizeof(dict) - n, "), }");
	if (w < 0 || (size_t)w >= sizeof(dict) - n)
		return -EINVAL;
	n += (size_t)w;

	/* magic(6) + version(2) + header length(2) + dict + spaces + '\n', a multiple of 64 */
	size_t total = 10 + n + 1;
	total = (total + 63) / 64 * 64;
	if (total > cap)
		return -ENOBUFS;
	size_t hlen = total - 10;
	memcpy(out, "\x93NUMPY\x01\x00", 8);
	out[8] = (char)(hlen & 0xff);
	out[9] = (char)(hlen >> 8);
	memcpy(out + 10, dict, n);
	memset(out + 10 + n, ' ', total - 10 - n - 1);
	out[total - 1] = '\n';
	return (int)total;
}

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len > 0) {
		ssize_t w = write(fd, p, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += w;
		len -= (size_t)w;
	}
	return 0;
}

int npy_write_fd(int fd, const char *descr, const uint64_t *shape, unsigned ndim,
		 const void *data, size_t len)
{
	char hdr[NPY_HEADER_MAX];
	int h = npy_header(hdr, sizeof(hdr), descr, shape, ndim);
	if (h < 0)
		return h;
	unsigned __int128 expect = (unsigned char)(descr[2] - '0');
	for (unsigned i = 0; i < ndim; i++)
		expect *= shape[i];
	if (expect != len)
		return -EINVAL;
	int r = write_all(fd, hdr, (size_t)h);
	if (r < 0)
		return r;
	return write_all(fd, data, len);
}
