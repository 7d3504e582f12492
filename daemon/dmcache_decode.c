/*
 * dmcache-decode: decode one file into a .npy tensor and its metadata (a developer tool,
 * built but not installed). Decodes in-process, or through the sandboxed worker pool with
 * --pool, exactly as the daemon does.
 *
 *   dmcache-decode [--pool] [--frames | --frame N] [--lut] [--dtype T]
 *                  [--max-decode-bytes N] [--timeout-ms N] FILE -o OUT.npy [--meta OUT.json]
 *   dmcache-decode [--pool] --probe [--frame N] [--lut] [--dtype T] FILE [--meta OUT.json]
 *
 * --frames decodes frame by frame (each frame an item of its own, as with frame-by-frame
 * datasets) and writes the frames stacked, shape (F, C, H, W); --frame N writes only frame N.
 * With --pool, --frames first learns the frame count from a probe-only job, as the daemon
 * does. --probe decodes no pixels and prints the tensor descriptor as one line of JSON:
 * {"format", "codec", "dtype", "shape": [F, C, H, W], "frames" (of the item), "nbytes"}.
 * Exit status: 0 success, 2 usage or I/O error, 3 limit exceeded, 4 decode failed,
 * 1 anything else. Errors print "dmcache-decode: FILE: <error name>: <reason>".
 * --verbose prints the codec libraries' own messages (GDCM, OpenJPEG) to stderr, each line
 * "dmcache-decode: <library>: <message>"; without it they are dropped.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "decode.h"
#include "decode_pool.h"
#include "npy.h"
#include "proto.h"

enum {
	EXIT_DECODE_OK = 0,
	EXIT_OTHER = 1,
	EXIT_USAGE = 2,
	EXIT_LIMIT = 3,
	EXIT_DECODE = 4,
};

struct args {
	const char *file, *out, *meta;
	bool pool, frames, lut, probe, verbose;
	long frame; /* -1: all */
	enum decode_dtype dtype;
	uint64_t max_decode_bytes;
	uint64_t timeout_ms;
};

static void usage(FILE *f)
{
	fprintf(f, "usage: dmcache-decode [--pool] [--frames | --frame N] [--lut] [--dtype T]\n"
		   "                      [--max-decode-bytes N] [--timeout-ms N] [--verbose] FILE\n"
		   "                      -o OUT.npy [--meta OUT.json]\n"
		   "       dmcache-decode [--pool] --probe [--frame N] [--lut] [--dtype T] FILE\n"
		   "                      [--meta OUT.json]\n");
}

static int parse_u64(const char *s, uint64_t *ret)
{
	char *end;
	errno = 0;
	if (!s || !*s || *s == '-')
		return -1;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end)
		return -1;
	*ret = v;
	return 0;
}

static int parse_args(int argc, char **argv, struct args *a)
{
	memset(a, 0, sizeof(*a));
	a->frame = -1;
	for (int i = 1; i < argc; i++) {
		const char *s = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		uint64_t u;
		if (strcmp(s, "--pool") == 0) {
			a->pool = true;
		} else if (strcmp(s, "--frames") == 0) {
			a->frames = true;
		} else if (strcmp(s, "--lut") == 0) {
			a->lut = true;
		} else if (strcmp(s, "--probe") == 0) {
			a->probe = true;
		} else if (strcmp(s, "--verbose") == 0) {
			a->verbose = true;
		} else if (strcmp(s, "--frame") == 0) {
			if (parse_u64(v, &u) || u > UINT32_MAX)
				return -1;
			a->frame = (long)u;
			i++;
		} else if (strcmp(s, "--dtype") == 0) {
			a->dtype = decode_dtype_from_name(v);
			if (a->dtype == DECODE_DTYPE_NONE)
				return -1;
			i++;
		} else if (strcmp(s, "--max-decode-bytes") == 0) {
			if (parse_u64(v, &a->max_decode_bytes) || a->max_decode_bytes == 0)
				return -1;
			i++;
		} else if (strcmp(s, "--timeout-ms") == 0) {
			if (parse_u64(v, &a->timeout_ms) || a->timeout_ms == 0)
				return -1;
			i++;
		} else if (strcmp(s, "-o") == 0) {
			if (!v)
				return -1;
			a->out = v;
			i++;
		} else if (strcmp(s, "--meta") == 0) {
			if (!v)
				return -1;
			a->meta = v;
			i++;
		} else if (strcmp(s, "-h") == 0 || strcmp(s, "--help") == 0) {
			usage(stdout);
			exit(0);
		} else if (s[0] == '-' && s[1]) {
			return -1;
		} else if (!a->file) {
			a->file = s;
		} else {
			return -1;
		}
	}
	if (!a->file || (!a->out && !a->probe) || (a->frames && (a->frame >= 0 || a->probe)))
		return -1;
	return 0;
}

static int fail(const char *file, int code, const char *reason)
{
	const char *name = code >= 1000 ? dmc_error_name((uint32_t)code) : NULL;
	if (name)
		fprintf(stderr, "dmcache-decode: %s: %s: %s\n", file, name, reason);
	else
		fprintf(stderr, "dmcache-decode: %s: %s: %s\n", file, strerror(code), reason);
	if (code == DMC_E_LIMIT_EXCEEDED)
		return EXIT_LIMIT;
	if (code == DMC_E_DECODE_FAILED)
		return EXIT_DECODE;
	return EXIT_OTHER;
}

static int read_file(const char *path, uint8_t **ret, size_t *ret_len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return -EINVAL;
	}
	if ((uint64_t)st.st_size > DECODE_DEFAULT_MAX_INPUT_BYTES) {
		close(fd);
		return -EFBIG;
	}
	size_t len = (size_t)st.st_size;
	uint8_t *buf = malloc(len ? len : 1);
	size_t got = 0;
	while (buf && got < len) {
		ssize_t n = read(fd, buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	close(fd);
	if (!buf)
		return -ENOMEM;
	if (got != len) {
		free(buf);
		return -EIO;
	}
	*ret = buf;
	*ret_len = len;
	return 0;
}

static int write_text(const char *path, const char *text, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	const char *p = text;
	size_t left = len;
	while (left) {
		ssize_t w = write(fd, p, left);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			int e = -errno;
			close(fd);
			return e;
		}
		p += w;
		left -= (size_t)w;
	}
	if (write(fd, "\n", 1) != 1 || close(fd) != 0)
		return -EIO;
	return 0;
}

static int write_npy(const char *path, const struct decode_desc *d, uint32_t frames,
		     const void *data)
{
	uint64_t shape[4] = { frames, d->channels, d->height, d->width };
	const char *descr = npy_descr(decode_dtype_name(d->dtype));
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	size_t len = (size_t)(d->nbytes / d->frames * frames);
	int r = npy_write_fd(fd, descr, shape, 4, data, len);
	if (close(fd) != 0 && r == 0)
		r = -errno;
	return r;
}

static void print_desc(const struct decode_desc *d)
{
	printf("{\"format\":\"%s\",\"codec\":\"%s\",\"dtype\":\"%s\",\"shape\":[%u,%u,%u,%u],"
	       "\"frames\":%u,\"nbytes\":%" PRIu64 "}\n",
	       decode_format_name(d->format), decode_codec_name(d->codec),
	       decode_dtype_name(d->dtype), d->frames, d->channels, d->height, d->width,
	       d->src_frames, d->nbytes);
}

/* ---- in-process ---- */

static int run_local(const struct args *a, const uint8_t *in, size_t len,
		     const struct decode_limits *lim)
{
	char err[256];
	struct decode_desc d;
	struct decode_opts o = { 0, 0, a->dtype };
	int r, rc = EXIT_OTHER;
	uint8_t *out = NULL;
	char *meta = NULL;
	struct decode_ctx *ctx = decode_ctx_new(lim);
	if (!ctx)
		return fail(a->file, ENOMEM, "out of memory");
	if (a->lut)
		o.flags |= DECODE_F_LUT;
	if (a->frame >= 0) {
		o.flags |= DECODE_F_FRAME;
		o.frame = (uint32_t)a->frame;
	}
	r = decode_probe(ctx, in, len, &o, &d, err, sizeof(err));
	if (r < 0) {
		rc = fail(a->file, -r, err);
		goto out;
	}
	uint32_t frames = d.frames;
	if (a->meta) {
		size_t cap = lim->max_meta_bytes + 8192, mlen;
		meta = malloc(cap);
		if (!meta) {
			rc = fail(a->file, ENOMEM, "out of memory");
			goto out;
		}
		r = decode_meta(ctx, in, len, &o, meta, cap, &mlen, err, sizeof(err));
		if (r < 0) {
			rc = fail(a->file, -r, err);
			goto out;
		}
		r = write_text(a->meta, meta, mlen);
		if (r < 0) {
			rc = fail(a->meta, -r, "cannot write the metadata");
			goto out;
		}
	}
	if (a->probe) {
		print_desc(&d);
		rc = EXIT_DECODE_OK;
		goto out;
	}
	out = malloc(d.nbytes ? (size_t)d.nbytes : 1);
	if (!out) {
		rc = fail(a->file, ENOMEM, "out of memory for the tensor");
		goto out;
	}
	if (a->frames) {
		/* Frame by frame, each decode an item of its own. */
		struct decode_desc fd;
		size_t fbytes = (size_t)(d.nbytes / d.frames);
		o.flags |= DECODE_F_FRAME;
		for (uint32_t f = 0; f < frames; f++) {
			o.frame = f;
			r = decode_probe(ctx, in, len, &o, &fd, err, sizeof(err));
			if (r == 0)
				r = decode_run(ctx, in, len, &o, out + (size_t)f * fbytes, fbytes, err,
					       sizeof(err));
			if (r < 0) {
				rc = fail(a->file, -r, err);
				goto out;
			}
		}
	} else {
		r = decode_run(ctx, in, len, &o, out, (size_t)d.nbytes, err, sizeof(err));
		if (r < 0) {
			rc = fail(a->file, -r, err);
			goto out;
		}
	}
	r = write_npy(a->out, &d, frames, out);
	if (r < 0) {
		rc = fail(a->out, -r, "cannot write the tensor");
		goto out;
	}
	rc = EXIT_DECODE_OK;
out:
	free(out);
	free(meta);
	decode_ctx_free(ctx);
	return rc;
}

/* ---- through the worker pool ---- */

struct pool_run {
	const struct args *a;
	struct decode_pool *pool;
	struct decode_job job;
	uint8_t *frames_buf;
	uint32_t frame, nframes;
	size_t frame_bytes;
	struct decode_desc desc;
	int rc;
	bool done;
};

static void on_done(struct decode_job *job);

static int submit(struct pool_run *pr)
{
	int r = decode_pool_submit(pr->pool, &pr->job, on_done);
	if (r < 0) {
		pr->rc = fail(pr->a->file, -r, pr->job.err);
		pr->done = true;
	}
	return r;
}

static void on_done(struct decode_job *job)
{
	struct pool_run *pr = job->data;
	const struct args *a = pr->a;
	int r;
	if (job->status < 0) {
		pr->rc = fail(a->file, -job->status, job->err);
		goto finish;
	}
	if (job->meta && a->meta) {
		r = write_text(a->meta, job->meta, job->meta_len);
		if (r < 0) {
			pr->rc = fail(a->meta, -r, "cannot write the metadata");
			goto finish;
		}
	}
	if (a->probe) {
		print_desc(&job->desc);
		r = 0;
	} else if (a->frames) {
		if (job->probe_only) {
			/* The probe (of frame 0) tells the frame count and a frame's size. */
			pr->desc = job->desc;
			pr->nframes = job->desc.src_frames;
			pr->frame_bytes = (size_t)job->desc.nbytes;
			pr->frames_buf = malloc(pr->frame_bytes * pr->nframes);
			if (!pr->frames_buf) {
				pr->rc = fail(a->file, ENOMEM, "out of memory");
				goto finish;
			}
			job->probe_only = false;
			job->want_meta = false;
			if (submit(pr) == 0)
				return;
			goto finish;
		}
		memcpy(pr->frames_buf + (size_t)pr->frame * pr->frame_bytes, job->out,
		       pr->frame_bytes);
		if (++pr->frame < pr->nframes) {
			job->opts.frame = pr->frame;
			job->want_meta = false;
			if (submit(pr) == 0)
				return;
			goto finish;
		}
		pr->desc.frames = 1;
		pr->desc.nbytes = pr->frame_bytes;
		r = write_npy(a->out, &pr->desc, pr->nframes, pr->frames_buf);
	} else {
		r = write_npy(a->out, &job->desc, job->desc.frames, job->out);
	}
	if (r < 0) {
		pr->rc = fail(a->out, -r, "cannot write the tensor");
		goto finish;
	}
	pr->rc = EXIT_DECODE_OK;
finish:
	pr->done = true;
	decode_pool_stop(pr->pool);
}

static int run_pool(const struct args *a, const uint8_t *in, size_t len,
		    const struct decode_limits *lim)
{
	uv_loop_t loop;
	struct decode_pool_config cfg;
	struct pool_run pr;
	int r;

	memset(&pr, 0, sizeof(pr));
	pr.a = a;
	pr.rc = EXIT_OTHER;
	if (uv_loop_init(&loop) != 0)
		return fail(a->file, ENOMEM, "cannot create the event loop");
	decode_pool_config_default(&cfg);
	cfg.workers = 1;
	cfg.limits = *lim;
	cfg.out_bytes = (size_t)lim->max_decode_bytes;
	cfg.in_bytes = len > 4096 ? len : 4096;
	if (a->timeout_ms)
		cfg.timeout_ms = a->timeout_ms;
	r = decode_pool_start(&loop, &cfg, &pr.pool);
	if (r < 0) {
		uv_loop_close(&loop);
		return fail(a->file, -r, "cannot start the decoder pool");
	}
	pr.job.in = in;
	pr.job.in_len = len;
	pr.job.opts.dtype = a->dtype;
	if (a->lut)
		pr.job.opts.flags |= DECODE_F_LUT;
	if (a->frame >= 0 || a->frames) {
		pr.job.opts.flags |= DECODE_F_FRAME;
		pr.job.opts.frame = a->frame >= 0 ? (uint32_t)a->frame : 0;
	}
	pr.job.want_meta = a->meta != NULL;
	pr.job.probe_only = a->probe || a->frames;
	pr.job.resource = a->file;
	pr.job.data = &pr;
	if (submit(&pr) < 0)
		decode_pool_stop(pr.pool);
	uv_run(&loop, UV_RUN_DEFAULT);
	uv_loop_close(&loop);
	free(pr.frames_buf);
	return pr.rc;
}

/* One write(2) to fd 2: during a GDCM call the `stderr` stream is captured
 * (decode_gdcm.cc), and in a sandboxed worker stdio's first use of a stream would ioctl. */
static void print_codec_line(const char *lib, const char *line)
{
	char buf[640];
	int n = snprintf(buf, sizeof(buf), "dmcache-decode: %s: %s\n", lib, line);
	if (n > (int)sizeof(buf) - 1) {
		n = (int)sizeof(buf) - 1;
		buf[n - 1] = '\n';
	}
	if (n > 0 && write(STDERR_FILENO, buf, (size_t)n) < 0)
		return;
}

int main(int argc, char **argv)
{
	struct args a;
	struct decode_limits lim;
	uint8_t *in = NULL;
	size_t len = 0;
	int r, rc;

	if (parse_args(argc, argv, &a) < 0) {
		usage(stderr);
		return EXIT_USAGE;
	}
	if (a.verbose)
		decode_set_diag(print_codec_line);
	decode_limits_default(&lim);
	if (a.max_decode_bytes)
		lim.max_decode_bytes = a.max_decode_bytes;
	r = read_file(a.file, &in, &len);
	if (r < 0) {
		fprintf(stderr, "dmcache-decode: %s: %s\n", a.file, strerror(-r));
		return EXIT_USAGE;
	}
	rc = a.pool ? run_pool(&a, in, len, &lim) : run_local(&a, in, len, &lim);
	free(in);
	return rc;
}
