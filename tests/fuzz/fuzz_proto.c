/*
 * Fuzz target for the protocol decoder: the input is a byte stream as a daemon would read
 * it from a socket. Frames are cut from it with dmc_header_decode and each payload is fed
 * to every message decoder; decoded strings are touched so ASan sees any bad bound.
 */
#include <stdint.h>
#include <string.h>

#include "proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile unsigned sink;

static void touch(struct dmc_str s)
{
	for (uint32_t i = 0; i < s.len; i++)
		sink += (unsigned char)s.ptr[i];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t off = 0;

	while (off < size) {
		struct dmc_header h;
		const uint8_t *p;
		struct dmc_hello hello;
		struct dmc_hello_reply hr;
		struct dmc_ping ping;
		struct dmc_error_msg em;
		struct dmc_status_entry entries[8];
		struct dmc_str v;
		uint64_t up;
		uint32_t pid, n;

		if (dmc_header_decode(data + off, size - off, &h) != DMC_PROTO_OK)
			break;
		if (size - off - DMC_HEADER_SIZE < h.length)
			break; /* need more bytes */
		p = data + off + DMC_HEADER_SIZE;
		if (dmc_hello_decode(p, h.length, &hello) == DMC_PROTO_OK)
			touch(hello.client);
		if (dmc_hello_reply_decode(p, h.length, &hr) == DMC_PROTO_OK)
			touch(hr.daemon);
		if (dmc_ping_decode(p, h.length, &ping) == DMC_PROTO_OK)
			sink += (unsigned)ping.token;
		(void)dmc_status_decode(p, h.length);
		if (dmc_status_reply_decode(p, h.length, &v, &up, &pid, entries, 8, &n) ==
		    DMC_PROTO_OK) {
			touch(v);
			for (uint32_t i = 0; i < n; i++)
				touch(entries[i].name);
		}
		if (dmc_error_decode(p, h.length, &em) == DMC_PROTO_OK) {
			touch(em.resource);
			touch(em.message);
			(void)dmc_error_name(em.code);
		}
		{
			struct dmc_prefetch pf;
			struct dmc_progress pr;
			struct dmc_evict_reply er;
			struct dmc_verify_reply vr;
			struct dmc_str a, b;
			struct dmc_reader r;
			uint32_t u;

			if (dmc_prefetch_decode(p, h.length, &pf) == DMC_PROTO_OK) {
				touch(pf.project);
				touch(pf.api_key);
			}
			if (dmc_progress_decode(p, h.length, &pr) == DMC_PROTO_OK) {
				touch(pr.project_name);
				touch(pr.error_message);
			}
			if (dmc_cancel_decode(p, h.length, &a, &b) == DMC_PROTO_OK) {
				touch(a);
				touch(b);
			}
			(void)dmc_cancel_reply_decode(p, h.length, &u);
			if (dmc_evict_decode(p, h.length, &u, &a) == DMC_PROTO_OK)
				touch(a);
			(void)dmc_evict_reply_decode(p, h.length, &er);
			(void)dmc_verify_reply_decode(p, h.length, &vr);
			{
				struct dmc_tier_reply tr;
				if (dmc_tier_reply_decode(p, h.length, &tr) == DMC_PROTO_OK)
					touch(tr.entries);
				(void)dmc_tier_decode(p, h.length, &u, &u);
			}
			{
				struct dmc_open om;
				struct dmc_open_reply orp;
				struct dmc_item_desc d;
				uint64_t hnd;
				if (dmc_open_decode(p, h.length, &om) == DMC_PROTO_OK)
					touch(om.project);
				if (dmc_open_reply_decode(p, h.length, &orp) == DMC_PROTO_OK)
					touch(orp.version);
				{
					struct dmc_stream_req sm;
					struct dmc_batch_head bh;
					if (dmc_stream_decode(p, h.length, &sm) == DMC_PROTO_OK) {
						uint64_t per, nb;
						dmc_stream_plan(sm.seed, &sm, &per, &nb);
						sink += (unsigned)dmc_stream_index(sm.seed, &sm,
										   sm.epoch);
						sink += (unsigned)(per + nb);
					}
					dmc_reader_init(&r, p, h.length);
					dmc_batch_head_read(&r, &bh);
					sink += bh.n;
				}
				if (dmc_get_begin(&r, p, h.length, &hnd, &u) == DMC_PROTO_OK)
					for (uint32_t i = 0; i < u; i++)
						sink += (unsigned)dmc_read_u64(&r);
				dmc_reader_init(&r, p, h.length);
				u = dmc_read_u32(&r);
				for (uint32_t i = 0; i < u && i < DMC_GET_MAX && !r.err; i++) {
					dmc_item_desc_read(&r, &d);
					if (!r.err)
						touch(d.message);
				}
			}
			dmc_reader_init(&r, p, h.length);
			u = dmc_read_u32(&r);
			for (uint32_t i = 0; i < u && i < DMC_LIST_MAX && !r.err; i++) {
				struct dmc_snapshot_info si;
				dmc_snapshot_info_read(&r, &si);
				if (!r.err)
					touch(si.project_name);
			}
		}
		off += DMC_HEADER_SIZE + h.length;
	}
	return 0;
}
