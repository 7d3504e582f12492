/*
 * npy: the NumPy .npy format, version 1.0, for writing tensors anyone can load with
 * numpy.load(). Shared by dmcache-decode and the dmcache CLI (`dmcache get -o item.npy`).
 * Pure functions over caller buffers plus one writer over a file descriptor; no allocation.
 */
#ifndef DMC_NPY_H
#define DMC_NPY_H

#include <stddef.h>
#include <stdint.h>

#define NPY_NDIM_MAX 8
/* The header is padded so that the data starts on a 64-byte boundary, as numpy writes it. */
#define NPY_HEADER_MAX 512

/*
 * Writes the header for an array of numpy type `descr` (e.g. "<i2", "|u1"), C order, with
 * `ndim` dimensions `shape`, into `out` (capacity `cap`). Returns the header length (a
 * multiple of 64), -EINVAL for a bad descr or ndim, -ENOBUFS when cap is too small.
 */
int npy_header(char *out, size_t cap, const char *descr, const uint64_t *shape, unsigned ndim);

/* The numpy descr for a dtype name ("int16" -> "<i2" on little-endian hosts), or NULL. */
const char *npy_descr(const char *dtype_name);

/*
 * Writes a complete .npy file to `fd`: header, then `len` bytes of `data`, which must be
 * exactly the product of `shape` times the element size. Short writes and EINTR are
 * retried. Returns 0 or a negative errno.
 */
int npy_write_fd(int fd, const char *descr, const uint64_t *shape, unsigned ndim,
		 const void *data, size_t len);

#endif
