/*
 * bench_decode_helper: the timed loops of tests/bench/bench_decode.py, in one process each.
 *
 *   bench_decode_helper MODE SECONDS FILE...
 *
 * MODE
 *   ours    decode_probe + decode_run, one context and one output buffer reused (the
 *           in-process path of a decoder worker)
 *   pool    the same through the sandboxed worker pool, one worker, one job at a time
 *           (adds the shared-memory copy-in and the control-socket round trip)
 *   tj      a bare TurboJPEG loop: tjDecompress2 to interleaved RGB/gray, handle and buffer
 *           reused (the baseline for JPEG)
 *   gdcm    GDCM called directly: gdcm::ImageReader on the bytes, then Image::GetBuffer
 *   zstd    zstd level-1 decompression of the decoded tensor (compressed once, untimed)
 *
 * Every mode runs with the decoder workers' malloc settings. Cycles over the files for
 * SECONDS and prints one JSON line:
 *   {"mode": ..., "items": N, "seconds": S, "per_s": N/S, "bytes": decoded bytes per item,
 *    "zstd_ratio": R (zstd mode only)}
 */
#include <malloc.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#if defined(__clang__)
#pragma clang diagnostic ignored "-Wdeprecated-copy"
#pragma clang diagnostic ignored "-Wdeprecated-copy-with-user-provided-copy"
#endif
#include <gdcmImage.h>
#include <gdcmImageReader.h>
#include <gdcmTrace.h>
#include <turbojpeg.h>
#include <uv.h>
#include <zstd.h>

#include "decode.h"
#include "decode_pool.h"

namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::vector<uint8_t>> load(int argc, char **argv, int first)
{
	std::vector<std::vector<uint8_t>> files;
	for (int i = first; i < argc; i++) {
		std::ifstream f(argv[i], std::ios::binary);
		files.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
	}
	return files;
}

void report(const char *mode, long items, double secs, double bytes, double ratio)
{
	printf("{\"mode\": \"%s\", \"items\": %ld, \"seconds\": %.4f, \"per_s\": %.2f, "
	       "\"bytes\": %.0f, \"zstd_ratio\": %.4f}\n",
	       mode, items, secs, items / secs, bytes, ratio);
}

int fail(const char *what)
{
	fprintf(stderr, "bench_decode_helper: %s\n", what);
	return 1;
}

/* Decodes files[i] in-process: the tensor, for zstd and for sizes. */
bool decode_once(struct decode_ctx *ctx, const std::vector<uint8_t> &in, std::vector<uint8_t> &out)
{
	struct decode_desc d;
	char err[256];
	if (decode_probe(ctx, in.data(), in.size(), nullptr, &d, err, sizeof(err)) < 0) {
		fprintf(stderr, "bench_decode_helper: %s\n", err);
		return false;
	}
	out.resize(d.nbytes);
	return decode_run(ctx, in.data(), in.size(), nullptr, out.data(), out.size(), err,
			  sizeof(err)) == 0;
}

struct PoolRun {
	const std::vector<std::vector<uint8_t>> *files;
	struct decode_pool *pool;
	struct decode_job job;
	size_t next = 0;
	long items = 0;
	Clock::time_point end;
	bool failed = false;
	double bytes = 0;
};

void on_pool_done(struct decode_job *job);

void pool_submit(PoolRun *r)
{
	const std::vector<uint8_t> &f = (*r->files)[r->next++ % r->files->size()];
	memset(&r->job, 0, sizeof(r->job));
	r->job.in = f.data();
	r->job.in_len = f.size();
	r->job.resource = "bench";
	r->job.data = r;
	if (decode_pool_submit(r->pool, &r->job, on_pool_done) < 0) {
		r->failed = true;
		decode_pool_stop(r->pool);
	}
}

void on_pool_done(struct decode_job *job)
{
	PoolRun *r = static_cast<PoolRun *>(job->data);
	if (job->status < 0) {
		fprintf(stderr, "bench_decode_helper: %s\n", job->err);
		r->failed = true;
		decode_pool_stop(r->pool);
		return;
	}
	r->items++;
	r->bytes = (double)job->desc.nbytes;
	if (Clock::now() >= r->end) {
		decode_pool_stop(r->pool);
		return;
	}
	pool_submit(r);
}

} /* namespace */

int main(int argc, char **argv)
{
	if (argc < 4)
		return fail("usage: bench_decode_helper MODE SECONDS FILE...");
	/* The decoder workers' malloc settings (decode_worker.c), for every mode alike. */
	mallopt(M_MMAP_THRESHOLD, 32 << 20);
	mallopt(M_TRIM_THRESHOLD, 256 << 20);
	mallopt(M_ARENA_MAX, 1);
	std::string mode = argv[1];
	double seconds = atof(argv[2]);
	auto files = load(argc, argv, 3);
	auto budget = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
	long items = 0;
	double bytes = 0;
	Clock::time_point t0, t1;

	if (mode == "ours") {
		struct decode_ctx *ctx = decode_ctx_new(nullptr);
		std::vector<uint8_t> out(64u << 20);
		struct decode_desc d;
		char err[256];
		t0 = Clock::now();
		do {
			const auto &f = files[items % files.size()];
			if (decode_probe(ctx, f.data(), f.size(), nullptr, &d, err, sizeof(err)) < 0 ||
			    decode_run(ctx, f.data(), f.size(), nullptr, out.data(), out.size(), err,
				       sizeof(err)) < 0)
				return fail(err);
			bytes = (double)d.nbytes;
			items++;
		} while ((t1 = Clock::now()) - t0 < budget);
		decode_ctx_free(ctx);
	} else if (mode == "pool") {
		uv_loop_t loop;
		uv_loop_init(&loop);
		struct decode_pool_config cfg;
		decode_pool_config_default(&cfg);
		cfg.workers = 1;
		cfg.in_bytes = 64u << 20;
		cfg.out_bytes = 256u << 20;
		PoolRun r;
		r.files = &files;
		if (decode_pool_start(&loop, &cfg, &r.pool) < 0)
			return fail("cannot start the pool");
		/* The clock starts once the worker is up. */
		struct decode_pool_stats st;
		do {
			uv_run(&loop, UV_RUN_ONCE);
			decode_pool_stats(r.pool, &st);
		} while (st.idle < 1);
		r.items = 0;
		t0 = Clock::now();
		r.end = t0 + budget;
		pool_submit(&r);
		uv_run(&loop, UV_RUN_DEFAULT);
		t1 = Clock::now();
		uv_loop_close(&loop);
		if (r.failed)
			return 1;
		items = r.items;
		bytes = r.bytes;
	} else if (mode == "tj") {
		tjhandle tj = tjInitDecompress();
		std::vector<uint8_t> out(64u << 20);
		t0 = Clock::now();
		do {
			const auto &f = files[items % files.size()];
			int w, h, sub, cs;
			if (tjDecompressHeader3(tj, f.data(), f.size(), &w, &h, &sub, &cs) != 0)
				return fail(tjGetErrorStr2(tj));
			int pf = cs == TJCS_GRAY ? TJPF_GRAY : TJPF_RGB;
			if (tjDecompress2(tj, f.data(), f.size(), out.data(), w, 0, h, pf, 0) != 0)
				return fail(tjGetErrorStr2(tj));
			bytes = (double)w * h * tjPixelSize[pf];
			items++;
		} while ((t1 = Clock::now()) - t0 < budget);
		tjDestroy(tj);
	} else if (mode == "gdcm") {
		gdcm::Trace::SetWarning(false);
		gdcm::Trace::SetError(false);
		std::vector<char> out;
		t0 = Clock::now();
		do {
			const auto &f = files[items % files.size()];
			std::istringstream is(std::string(f.begin(), f.end()));
			gdcm::ImageReader r;
			r.SetStream(is);
			if (!r.Read())
				return fail("gdcm::ImageReader failed");
			const gdcm::Image &img = r.GetImage();
			out.resize(img.GetBufferLength());
			if (!img.GetBuffer(out.data()))
				return fail("gdcm::Image::GetBuffer failed");
			bytes = (double)out.size();
			items++;
		} while ((t1 = Clock::now()) - t0 < budget);
	} else if (mode == "zstd") {
		struct decode_ctx *ctx = decode_ctx_new(nullptr);
		std::vector<std::vector<uint8_t>> comp;
		std::vector<size_t> raw;
		double in = 0, outb = 0;
		for (const auto &f : files) {
			std::vector<uint8_t> t;
			if (!decode_once(ctx, f, t))
				return fail("decode failed");
			std::vector<uint8_t> c(ZSTD_compressBound(t.size()));
			size_t n = ZSTD_compress(c.data(), c.size(), t.data(), t.size(), 1);
			if (ZSTD_isError(n))
				return fail("zstd failed");
			c.resize(n);
			comp.push_back(std::move(c));
			raw.push_back(t.size());
			in += (double)t.size();
			outb += (double)n;
		}
		decode_ctx_free(ctx);
		std::vector<uint8_t> out(64u << 20);
		ZSTD_DCtx *z = ZSTD_createDCtx();
		t0 = Clock::now();
		do {
			size_t i = items % comp.size();
			size_t n = ZSTD_decompressDCtx(z, out.data(), out.size(), comp[i].data(),
						       comp[i].size());
			if (ZSTD_isError(n) || n != raw[i])
				return fail("zstd decompression failed");
			bytes = (double)n;
			items++;
		} while ((t1 = Clock::now()) - t0 < budget);
		ZSTD_freeDCtx(z);
		report("zstd", items, std::chrono::duration<double>(t1 - t0).count(), bytes, in / outb);
		return 0;
	} else {
		return fail("unknown mode");
	}
	report(mode.c_str(), items, std::chrono::duration<double>(t1 - t0).count(), bytes, 0);
	return 0;
}
