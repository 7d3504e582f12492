/*
 * dmcache wire protocol, version 1: the specification.
 *
 * This header is the document to read to write another client. proto.c is a pure codec for
 * it: no I/O, no logging, no globals, no allocation. The daemon (dmcached) and libdmcache
 * share it.
 *
 * Transport
 *   A SOCK_STREAM Unix socket. The daemon takes the peer's identity from SO_PEERCRED at
 *   accept, never from a payload. File descriptors travel as SCM_RIGHTS ancillary data
 *   attached to the first byte of the frame that announces them (header field nfds).
 *
 * Frame
 *   Every message is one frame: a fixed 16-byte header, then `length` payload bytes.
 *   All integers are little-endian, whatever the host.
 *
 *     offset size field
 *          0    4 length      payload bytes after the header, 0 .. DMC_FRAME_MAX
 *          4    2 opcode      enum dmc_opcode
 *          6    2 flags       DMC_FLAG_*; undefined bits must be zero
 *          8    4 request_id  chosen by the client; replies and events echo it
 *         12    1 nfds        file descriptors passed with this frame, 0 .. DMC_FDS_MAX
 *         13    3 reserved    must be zero
 *
 *   A receiver that sees length > DMC_FRAME_MAX, nfds > DMC_FDS_MAX, an undefined flag bit
 *   or nonzero reserved bytes has a protocol error: the connection is closed, nothing else.
 *
 * Conversation
 *   The first frame a client sends is HELLO; anything else first closes the connection.
 *   Requests carry ids so they can be pipelined. Each request gets exactly one final frame
 *   with the same request id: a reply (same opcode, DMC_FLAG_REPLY) or an ERROR frame.
 *   Requests that stream (PREFETCH progress) send events first: frames with DMC_FLAG_REPLY
 *   and DMC_FLAG_MORE set, then the final frame without DMC_FLAG_MORE.
 *   An unknown opcode gets ERROR DMC_E_UNSUPPORTED and the connection stays open.
 *
 * Payload encoding
 *   Fields follow each other in the order given for each message, with no padding:
 *     u8, u16, u32, u64, i32, i64   little-endian integers
 *     str                           u32 byte length, then that many bytes; no NUL byte
 *                                   inside, not NUL-terminated; at most DMC_STR_MAX bytes
 *     f64                           IEEE 754 binary64, its 8 bytes as a u64
 *   A payload must be consumed exactly: missing bytes or bytes left over are a protocol
 *   error. Messages grow only by a new protocol version, or by fields that only a new
 *   flag bit announces (OPEN's DMC_OPEN_POLICY): a daemon that does not know the bit
 *   refuses the request (undefined bits are refused), so an old peer never misreads it.
 *
 * Errors
 *   Every error that reaches a client is a stable code (enum dmc_error) plus a message.
 *   The numbers start at 1000 so that libdmcache can return them negated alongside
 *   negative errno values in one int (see dmcache.h). Numbers are never reused.
 */
#ifndef DMC_PROTO_H
#define DMC_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DMC_PROTO_VERSION 1u     /* the newest version this codec speaks */
#define DMC_PROTO_VERSION_MIN 1u /* the oldest */

#define DMC_HEADER_SIZE 16u
#define DMC_FRAME_MAX (1u << 20) /* payload bytes; bulk data travels through shared memory */
#define DMC_FDS_MAX 253u /* the kernel's SCM_MAX_FD: descriptors of one sendmsg */
#define DMC_LOCAL_AHEAD 0x80000000u /* LOCAL_NEED first: a window out of order */
#define DMC_STR_MAX (64u << 10)  /* one string field */

enum dmc_opcode {
	/* connection */
	DMC_OP_HELLO = 1,
	DMC_OP_PING = 2,
	DMC_OP_STATUS = 3,
	DMC_OP_ERROR = 4, /* daemon to client only, as the final frame of a failed request */

	/* numbers reserved for the cache and serving messages of later work; never reuse */
	DMC_OP_PREFETCH = 16,
	DMC_OP_CANCEL = 17,
	DMC_OP_LIST = 18,
	DMC_OP_EVICT = 19,
	DMC_OP_VERIFY = 20,
	DMC_OP_OPEN = 32,
	DMC_OP_GET = 33,
	DMC_OP_RELEASE = 34,
	DMC_OP_STREAM = 35,
	DMC_OP_CLOSE = 36,
	DMC_OP_STOP = 37,

	/* local dataset folders read through the client's descriptors (see LOCAL_NEED) */
	DMC_OP_LOCAL_NEED = 21,
	DMC_OP_LOCAL_FILES = 22,

	/* the cluster tier's administration (dmcache tier ls / gc), admins only */
	DMC_OP_TIER = 23,
};

enum dmc_flag {
	DMC_FLAG_REPLY = 1u << 0, /* daemon to client: a reply or event for request_id */
	DMC_FLAG_MORE = 1u << 1,  /* with REPLY: an event; more frames follow for request_id */
};
#define DMC_FLAGS_DEFINED (DMC_FLAG_REPLY | DMC_FLAG_MORE)

enum dmc_error {
	DMC_E_PROTOCOL = 1001,              /* malformed request */
	DMC_E_UNSUPPORTED = 1002,           /* unknown opcode, no common protocol version */
	DMC_E_NOT_FOUND_OR_DENIED = 1003,   /* absent, or the caller's key is not entitled;
					     * http_status 401/403 when the server refused
					     * the caller's own key (OPEN, PREFETCH), else 0 */
	DMC_E_UPSTREAM_TRANSIENT = 1004,    /* retries exhausted; retry_after_ms says when */
	DMC_E_UPSTREAM_PERMANENT = 1005,    /* upstream refused; http_status says how */
	DMC_E_INTEGRITY = 1006,             /* bytes did not match their recorded digest */
	DMC_E_CACHE_FULL = 1007,            /* max_size or min_free reached, nothing evictable */
	DMC_E_LIMIT_EXCEEDED = 1008,        /* a configured size or time limit */
	DMC_E_DECODE_FAILED = 1009,         /* the decoder rejected or crashed on the input */
	DMC_E_IO = 1010,                    /* local I/O; sys_errno says which */
	DMC_E_OVERLOADED = 1011,            /* too many connections or queued requests, or out
					     * of memory: try again later */
	DMC_E_INTERNAL = 1012,              /* a bug: please report */
	DMC_E_INVALID_ARGUMENT = 1013,      /* a well-formed request with a bad value */
	DMC_E_CANCELLED = 1014,             /* the job was cancelled or the daemon is stopping */
};
#define DMC_E_FIRST_ 1001
#define DMC_E_LAST_ 1014

/* The frame header, decoded. */
struct dmc_header {
	uint32_t length;
	uint16_t opcode;
	uint16_t flags;
	uint32_t request_id;
	uint8_t nfds;
};

/* A string borrowed from the buffer it was decoded from: not NUL-terminated. */
struct dmc_str {
	const char *ptr;
	uint32_t len;
};

/*
 * Messages. Each names its fields in wire order; "request" is client to daemon,
 * "reply" is the final frame with DMC_FLAG_REPLY.
 */

/* HELLO request: the range of versions the client speaks, and who it is. */
struct dmc_hello {
	uint32_t version_min;  /* u32 */
	uint32_t version_max;  /* u32 */
	struct dmc_str client; /* str: free text, e.g. "libdmcache 0.1.0" */
};

/* HELLO reply: the version both will speak (the highest common one), and the daemon. */
struct dmc_hello_reply {
	uint32_t version;      /* u32 */
	uint32_t daemon_uid;   /* u32: informational; clients check SO_PEERCRED themselves */
	uint32_t frame_max;    /* u32: the largest payload the daemon accepts */
	struct dmc_str daemon; /* str: e.g. "dmcached 0.1.0" */
};

/* PING request and reply: an opaque token echoed back. */
struct dmc_ping {
	uint64_t token; /* u64 */
};

/* STATUS request: no fields (length 0). */

/*
 * STATUS reply: the daemon's version and uptime, then named counters. Names are stable
 * snake_case identifiers; later versions of the daemon add names, never change their
 * meaning. A client prints what it receives.
 *
 *   str version, u64 uptime_ms, u32 pid, u32 n, then n times (str name, i64 value)
 */
struct dmc_status_entry {
	struct dmc_str name;
	int64_t value;
};
#define DMC_STATUS_ENTRIES_MAX 256u

/* ERROR: the final frame of a failed request. */
struct dmc_error_msg {
	uint32_t code;            /* u32: enum dmc_error */
	uint32_t http_status;     /* u32: upstream HTTP status, or 0 */
	uint32_t retry_after_ms;  /* u32: for DMC_E_UPSTREAM_TRANSIENT and OVERLOADED, or 0 */
	int32_t sys_errno;        /* i32: for DMC_E_IO, a positive errno; or 0 */
	struct dmc_str resource;  /* str: the resource concerned, or empty */
	struct dmc_str message;   /* str: human-readable, no secrets, no foreign paths */
};

/*
 * The cache: prefetching, listing, eviction, verification.
 *
 * PREFETCH request: start (or join) a job that brings a dataset version into the cache.
 *
 *   u32 source, u32 flags, str project, str version, str server, str api_key
 *
 *   source   enum dmc_source
 *   flags    DMC_PREFETCH_OFFLINE: do not contact the server; the newest complete snapshot
 *            (or `version`) the caller holds a grant for, within grant_ttl, is the answer
 *            (DATAMINT only; a grant is the caller's own earlier proof with its key, see
 *            docs/security.md).
 *            DMC_PREFETCH_ALLOW_PARTIAL: start although what the snapshot still needs does
 *            not fit in max_size or above min_free (items that cannot be stored fail);
 *            without it such a job fails at once with CACHE_FULL and the numbers.
 *            DMC_PREFETCH_DECODE: once the items are stored, decode each of them with the
 *            default options (no LUT, the source dtype: what a plain GET reads) in the
 *            decode workers and keep the tensor of every compressed one (JPEG, JPEG
 *            lossless/LS/2000, HTJ2K, RLE, deflate DICOM, PNG, .nii.gz) in the tensor
 *            cache, so that the first GET reads the stored tensor; uncompressed items are
 *            skipped. While it runs, events carry a notice "decoding: D of N items"; an
 *            item that cannot be decoded is an event with its error and does not fail the
 *            job; the final record's notice says how many were decoded, skipped and
 *            failed.
 *            DMC_PREFETCH_SHARD: the frame ends with u32 rank, u32 world (1 <= world <=
 *            DMC_SHARD_WORLD_MAX, rank < world): the whole project is listed with the
 *            caller's key, but only the items whose position in the listing's stable order
 *            is rank modulo world are fetched (a node's share of a cluster's pre-warm).
 *            DMC_PREFETCH_TO_TIER: fill the daemon's cluster tier (tier_url), not its cache:
 *            items the tier has count as done without being fetched; the others are
 *            downloaded, uploaded to the tier (file and mapping; not masks) and dropped from
 *            the node's cache, and are not recorded in the snapshot. INVALID_ARGUMENT when
 *            no tier is configured.
 *            Other bits are refused.
 *   project  DATAMINT: a project name or id. LOCAL: the absolute path of a dataset
 *            directory as the Datamint Python client writes it (dataset.json, images/).
 *            For LOCAL the path is only a label (the snapshot's project id): the frame
 *            carries (nfds = 1) the folder's dataset.json opened by the client, and the
 *            files are read through descriptors the client passes (LOCAL_NEED below).
 *   version  "" or "latest" for the newest; otherwise a version string (Datamint: the
 *            dataset's updated_at), which must be the server's current one or cached.
 *   server   DATAMINT: the API base URL ("https://api.datamint.io"); LOCAL: "".
 *   api_key  DATAMINT: the caller's key; LOCAL: "". The daemon keeps it in memory only,
 *            for the uid that sent it, and never logs, stores or echoes it.
 *
 * The daemon answers with events (DMC_FLAG_REPLY | DMC_FLAG_MORE), each a progress record,
 * about once a second and for each failed item, then a final PREFETCH reply (a progress
 * record in state DONE, FAILED or CANCELLED). A job that cannot start (unknown project,
 * refused key, unreachable server) ends with ERROR instead. The job goes on when the
 * client disconnects; a second PREFETCH of the same version by the same uid joins it.
 *
 * progress record:
 *   u64 job_id, u64 snapshot_id, u32 state, str project_id, str project_name, str version,
 *   u64 items_total, u64 items_done, u64 items_cached, u64 items_failed,
 *   u64 bytes_total, u64 bytes_done, u64 rate_bps, u64 eta_ms,
 *   u32 error_code, u32 http_status, str error_resource, str error_message
 *
 *   items_done counts items now in the cache, items_cached those of them that were there
 *   before the job (no download); bytes_done counts bytes downloaded by this job. The error
 *   fields describe one failed item in the event that reports it; code 0 otherwise. In a
 *   final record in state FAILED they hold the first error. An event with code 0 and a
 *   message is a notice: a request is retried after a transient failure, the message
 *   saying when and why ("retrying in 2.0 s (attempt 2 of 5): HTTP 503"), the resource
 *   naming the item, or empty for the project's own requests (resolving, listing).
 */
enum dmc_source {
	DMC_SOURCE_DATAMINT = 1,
	DMC_SOURCE_LOCAL = 2,
};

enum dmc_job_state {
	DMC_JOB_RESOLVING = 1,   /* finding the project and its version */
	DMC_JOB_LISTING = 2,     /* reading the resource list into a snapshot */
	DMC_JOB_DOWNLOADING = 3, /* fetching what the cache lacks */
	DMC_JOB_DONE = 4,
	DMC_JOB_FAILED = 5,      /* some items failed; the others are stored */
	DMC_JOB_CANCELLED = 6,
};

struct dmc_prefetch {
	uint32_t source;
	uint32_t flags;
	struct dmc_str project;
	struct dmc_str version;
	struct dmc_str server;
	struct dmc_str api_key;
	uint32_t shard_rank, shard_world; /* on the wire with DMC_PREFETCH_SHARD only */
};

struct dmc_progress {
	uint64_t job_id;
	uint64_t snapshot_id; /* 0 until the snapshot exists */
	uint32_t state;       /* enum dmc_job_state */
	struct dmc_str project_id;
	struct dmc_str project_name;
	struct dmc_str version;
	uint64_t items_total, items_done, items_cached, items_failed;
	uint64_t bytes_total, bytes_done;
	uint64_t rate_bps; /* download rate over the last seconds */
	uint64_t eta_ms;   /* 0 when unknown or done */
	uint32_t error_code;
	uint32_t http_status;
	struct dmc_str error_resource;
	struct dmc_str error_message;
};

/*
 * CANCEL request: stops the caller's jobs for a project (any uid's, for root).
 *   str project, str server      (as in PREFETCH; server "" matches any)
 * Reply: u32 jobs_cancelled.
 *
 * LIST request: no fields. Reply: the snapshots the caller may see (all for admins: root
 * and the admin group; for others, those they hold a grant for):
 *   u32 n, then n snapshot records (at most DMC_LIST_MAX):
 *   u64 id, u32 source, u32 complete, str server, str project_id, str project_name,
 *   str version, u64 items, u64 items_stored, u64 bytes, u64 created_ms (Unix time),
 *   u32 owner_uid (UINT32_MAX: made before owners were recorded), u64 bytes_stored
 *   complete: 0 partial, 1 every item stored, 2 a job is filling it now (downloading)
 *
 * EVICT request: removes snapshots from the cache, and the blobs no other snapshot uses.
 *   u32 flags, str project      (DMC_EVICT_ALL: every snapshot the caller may see; else
 *                                those whose project name or id is `project`)
 *   An admin's EVICT removes the snapshots; anyone else's removes their own snapshots and,
 *   of a snapshot another uid owns, only their own grant.
 * Reply: u64 snapshots, u64 blobs, u64 bytes (freed).
 *
 * VERIFY request: re-checks every blob's checksum, removes bad ones. No fields. Admins
 * only (it reads every user's data); others get NOT_FOUND_OR_DENIED.
 * Reply: u64 blobs_checked, u64 blobs_bad, u64 bytes_checked.
 */
/*
 * TIER request: administration of the cluster tier, done by the daemon with its own tier
 * credentials. Admins only (root and the admin group); others get NOT_FOUND_OR_DENIED.
 *   u32 action, u32 flags
 *   action DMC_TIER_LS: lists the tier's blobs and counts its mappings
 *   action DMC_TIER_GC: deletes mappings older than tier_retention, then blobs no remaining
 *     mapping names that are older than DMC_TIER_GC_GRACE_S (DMC_TIER_DRY_RUN: only says
 *     which it would delete)
 *   action DMC_TIER_VERIFY: reads every blob and checks it as a node would (its header,
 *     the SHA-256 of its decoded content); DMC_TIER_REPAIR deletes the bad ones
 * Reply: u64 blobs, u64 blob_bytes, u64 maps, u64 maps_deleted, u64 blobs_deleted,
 *   u64 bytes_deleted, u64 blobs_bad, u32 truncated, str entries
 *   entries: one line per blob, "<sha256 hex> <size> <last modified, Unix s> <state>\n",
 *   state "ok", "deleted" (gc: deleted, or would be with DMC_TIER_DRY_RUN) or "kept" (gc:
 *   referenced or within the grace period), "bad" (verify; deleted too with
 *   DMC_TIER_REPAIR, counted in blobs_deleted); truncated 1 when lines were left out to fit
 *   DMC_TIER_ENTRIES_MAX bytes (the counts still cover every object).
 */
#define DMC_TIER_LS 1u
#define DMC_TIER_VERIFY 2u
#define DMC_TIER_GC 3u
#define DMC_TIER_DRY_RUN 1u
#define DMC_TIER_REPAIR 2u
#define DMC_TIER_FLAGS_DEFINED (DMC_TIER_DRY_RUN | DMC_TIER_REPAIR)
#define DMC_TIER_ENTRIES_MAX (60u << 10) /* within DMC_STR_MAX */
#define DMC_TIER_GC_GRACE_S 3600u

#define DMC_LIST_MAX 2048u
#define DMC_EVICT_ALL 1u
#define DMC_PREFETCH_OFFLINE 1u
#define DMC_PREFETCH_ALLOW_PARTIAL 2u
#define DMC_PREFETCH_DECODE 4u
#define DMC_PREFETCH_SHARD 8u
#define DMC_PREFETCH_TO_TIER 16u
#define DMC_PREFETCH_FLAGS_DEFINED \
	(DMC_PREFETCH_OFFLINE | DMC_PREFETCH_ALLOW_PARTIAL | DMC_PREFETCH_DECODE | \
	 DMC_PREFETCH_SHARD | DMC_PREFETCH_TO_TIER)
#define DMC_SHARD_WORLD_MAX 65536u

struct dmc_snapshot_info {
	uint64_t id;
	uint32_t source;
	uint32_t complete;
	struct dmc_str server;
	struct dmc_str project_id;
	struct dmc_str project_name;
	struct dmc_str version;
	uint64_t items, items_stored, bytes;
	uint64_t created_ms;
	uint32_t owner_uid;
	uint64_t bytes_stored;
};

struct dmc_evict_reply {
	uint64_t snapshots, blobs, bytes;
};

struct dmc_tier_reply {
	uint64_t blobs, blob_bytes, maps;
	uint64_t maps_deleted, blobs_deleted, bytes_deleted;
	uint64_t blobs_bad;
	uint32_t truncated;
	struct dmc_str entries;
};

struct dmc_verify_reply {
	uint64_t blobs_checked, blobs_bad, bytes_checked;
};

/*
 * Serving: tensors through shared memory.
 *
 * The first OPEN on a connection also sets up its *arena*: one memfd of `arena_bytes`
 * (negotiated: the daemon grants at most its configured cap) that the daemon maps writable
 * and passes to the client with the OPEN reply (nfds = 1, SCM_RIGHTS), once. It is sealed
 * against shrinking, growing and writes through any new mapping (F_SEAL_SHRINK |
 * F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL): the client maps it read-only. Every
 * tensor and metadata document the daemon hands out lives in the arena at an offset the
 * reply names, until the client RELEASEs it. When the arena is full, replies wait for
 * releases (backpressure); an item larger than the whole arena fails with LIMIT_EXCEEDED.
 *
 * OPEN request: open a dataset version for reading, with the caller's own credentials.
 *   u32 source, u32 flags, u32 dtype, str project, str version, str server, str api_key,
 *   u64 arena_bytes
 *   source, project, version, server, api_key: as in PREFETCH. The daemon checks the
 *     caller's access with the caller's key (a prefetch job of the caller's, joined or
 *     started, lists the project); items not cached yet are fetched while the job runs.
 *   flags: DMC_OPEN_LUT (modality LUT / NIfTI scaling applied, float32 unless dtype);
 *     DMC_OPEN_FRAMES (frame by frame: the handle's items are the frames of the dataset's
 *     items in order, each of shape (1, C, H, W), and its item count is the sum of their
 *     frames, as the Datamint client's return_frame_by_frame. The reply waits until the
 *     dataset is stored and every item's frame count is known (probed by the decoders);
 *     an item that could not be stored fails the OPEN with NOT_FOUND_OR_DENIED. Each
 *     item's metadata gets "frame": its frame index.)
 *     DMC_OPEN_MASKS (segmentation masks: item i is the label map of item i, uint8
 *     (frames, 1, height, width) on the image's grid: 0 for background, k + 1 for the
 *     k-th name of the dataset's sorted segmentation labels, which every item's metadata
 *     lists as "labels". Frame-scoped masks paint their frame, image-scoped ones every
 *     frame; masks of another size are resampled by nearest neighbour; a label-map file
 *     counts where it equals the annotation's "values", other masks where nonzero. Like
 *     DMC_OPEN_FRAMES, the reply waits until the dataset is stored. Not with FRAMES;
 *     LUT and dtype do not apply.)
 *     DMC_OPEN_OFFLINE: the server is not contacted, as DMC_PREFETCH_OFFLINE.
 *     DMC_OPEN_RAW (the stored original: item i is the file of item i exactly as it was
 *     downloaded or read (DICOM, PNG, JPEG, NIfTI, ...), uint8 of shape (1, 1, 1, bytes),
 *     checked against its SHA-256 like every read; its metadata's "dicom" is null. What a
 *     client needs to give the user the file itself, e.g. pydicom's FileDataset. Not with
 *     LUT or a dtype; with FRAMES, every frame of an item is the item's file. With MASKS
 *     instead, item i is the segmentation files stored for item i (its record's mask
 *     files), back to back in the order of the record's annotations, and the metadata
 *     gains "files": [{"id": <annotation id>, "bytes": n}, ...] saying where each one is;
 *     the reply comes at once, as for RAW alone.)
 *     DMC_OPEN_POLICY: a uniformity policy follows arena_bytes (below).
 *     DMC_OPEN_REGIONS: the client accepts hot tensors handed over in place (see "Regions"
 *     below): the OPEN reply grows by two fields and may pass the snapshot's region, and
 *     every GET reply of the handle grows by one byte per item. A client that does not set
 *     it sees none of this.
 *   dtype: enum dmc_dtype of the output, or 0 for the source dtype. DMC_DTYPE_F16 and
 *     DMC_DTYPE_BF16 are made by the daemon from float32 values (round to nearest even,
 *     as numpy's and torch's float32 casts).
 *   arena_bytes: wished arena size; 0 for the daemon's default. Ignored after the first OPEN.
 *   policy (only with DMC_OPEN_POLICY; struct dmc_policy):
 *     u32 ops, u32 resize, u32 height, u32 width, u32 channels, f64 pad_value,
 *     f64 window_center, f64 window_width
 *     Applied by the daemon's decode workers to every item of the handle, in this order:
 *     DMC_POLICY_WINDOW: the modality LUT is applied (as DMC_OPEN_LUT), then
 *       y = clip((x - (center - width / 2)) / width, 0, 1), computed in double, as float32;
 *       window_width > 0, both finite.
 *     DMC_POLICY_CHANNELS: `channels` 1 or 3. To 3: gray repeated, gray+alpha's gray
 *       repeated, RGBA/CMYK's first three kept. To 1: 0.299 R + 0.587 G + 0.114 B (ITU-R
 *       601-2 luma, double, as float32) of 3 or 4 channels, gray+alpha's gray.
 *     At most one of (height, width 1 .. 65535 each):
 *       DMC_POLICY_SIZE: resized to (height, width) by `resize`: DMC_RESIZE_BILINEAR and
 *         DMC_RESIZE_AREA are Pillow's BILINEAR and BOX resampling of float32 planes (mode
 *         "F": the same coefficients, double sums, float32 between the two passes), as
 *         float32; DMC_RESIZE_NEAREST takes source pixel floor((x + 0.5) * in / out),
 *         computed exactly (Pillow's NEAREST computes it in floating point and may take
 *         the pixel before where it is an exact integer), values unchanged.
 *       DMC_POLICY_CROP: the centered (height, width) window (offset floor((in - out) / 2)
 *         in each dimension); a dimension smaller than the window is padded around with
 *         pad_value.
 *       DMC_POLICY_PAD: the image at the top-left of a (height, width) canvas of pad_value;
 *         a larger dimension is cut at the bottom/right. pad_value finite.
 *     The output dtype is `dtype` when nonzero (values rounded to nearest and saturated
 *     for integers), else float32 when a step computed new values (window, bilinear or
 *     area resize, luma), else the decoded dtype. Fields a flag does not use must be 0;
 *     with SIZE, resize is 1 .. 3; without it 0. Not with DMC_OPEN_MASKS. The decoded
 *     tensors the daemon keeps are keyed by the whole policy.
 * OPEN reply (nfds 1 on the first OPEN of the connection, else 0):
 *   u64 handle, u64 snapshot_id, u64 items, str project_id, str project_name, str version,
 *   u64 arena_bytes
 *   and with DMC_OPEN_REGIONS only: u64 region_id, u64 region_bytes
 *   region_id is the snapshot's region (0: none for this handle: hot_max is 0, the handle
 *   serves masks or raw files, or the daemon could not make one; its GETs then use the
 *   arena only). When the connection has not received that region before, its read-only
 *   descriptor is attached after the arena's (nfds counts both: the arena's first when it
 *   is passed too). region_bytes is its size: map it read-only, MAP_SHARED.
 *
 * GET request: items of an open dataset, in the order asked.
 *   u64 handle, u32 n (1 .. DMC_GET_MAX), n times u64 index
 * GET reply: u32 n, then n item records:
 *   u64 index, u32 status (0 or enum dmc_error), u32 dtype, u32 ndim, 4 times u64 shape,
 *   u64 offset, u64 nbytes, u64 meta_offset, u64 meta_len, str message
 *   shape is (frames, channels, height, width); ndim is 4. The tensor is nbytes at offset
 *   in the arena, C order; the metadata (JSON: {"resource": ..., "dicom": ...}) is
 *   meta_len bytes at meta_offset. A failed item has status != 0, a message, and no space.
 *   With DMC_OPEN_REGIONS on the handle, n times u8 in_region follow the n records: 1 when
 *   the item's tensor is at `offset` in the handle's region (not in the arena; its
 *   metadata is still in the arena), else 0.
 *
 * RELEASE request: gives arena space back.  u32 n, n times u64 offset (tensor or metadata
 *   offsets from GET replies). Reply: u32 released. An item handed in a region is given
 *   back by its meta_offset alone (its tensor offset is the region's, not the arena's):
 *   that also unpins its tensor in the region.
 *
 * Regions (DMC_OPEN_REGIONS; GET items, and STREAM batch items, see STREAM):
 *   A region holds decoded tensors of one snapshot's items, and of no other snapshot's:
 *   a memfd of fixed size, sealed against shrinking and growing, that the daemon writes
 *   and passes read-only (an O_RDONLY descriptor of a file the daemon owns, mode 0400:
 *   neither write(), nor a writable shared mapping, nor ftruncate, nor reopening it
 *   through /proc for writing works). It is passed, once per connection, only with the
 *   reply to an OPEN of that snapshot, after the OPEN's usual access check. A GET item
 *   that is in the daemon's hot set is handed as an offset in the region (its tensor
 *   copied there once, then shared by every connection of the snapshot) instead of a
 *   copy into the arena. Such a tensor is pinned until the client RELEASEs the item's
 *   meta_offset or its connection ends: the daemon neither moves nor reuses it before.
 *   Unpinned tensors are evicted least recently used first when the regions' bytes pass
 *   hot_max, and their pages are given back (FALLOC_FL_PUNCH_HOLE): reading a range not
 *   held may show zeros or another tensor of the same snapshot.
 *
 * CLOSE request: u64 handle. Reply: no fields. Closing the connection closes everything.
 *   Streams of the handle stop (as with STOP) first.
 *
 * STREAM request: one epoch of batches, in an order the daemon computes.
 *   u64 handle, u64 seed, u64 epoch, u32 flags, u32 rank, u32 world_size, u32 batch_size,
 *   u32 ahead
 *   flags: DMC_STREAM_SHUFFLE, DMC_STREAM_DROP_LAST. rank < world_size; batch_size
 *   1 .. DMC_GET_MAX; ahead 0 .. DMC_STREAM_AHEAD_MAX, 0 meaning DMC_STREAM_AHEAD_DEFAULT.
 *   Order: position p of the epoch holds item perm(p mod items), where perm is the identity
 *     without SHUFFLE and otherwise dmc_stream_perm() keyed by seed + epoch (a bijection of
 *     0 .. items-1: equal for equal seeds and epochs, different across epochs). As torch's
 *     DistributedSampler: without DROP_LAST each rank reads ceil(items / world_size)
 *     positions (the tail repeats the head: padding); with DROP_LAST, when items is not a
 *     multiple of world_size, ceil((items - world_size) / world_size). Rank r reads
 *     positions r, r + world_size, r + 2 world_size, ...; so the ranks of an epoch together
 *     read every item exactly once, plus the padding. The rank's list is cut into batches
 *     of batch_size; DROP_LAST also drops a short last batch. dmc_stream_plan() and
 *     dmc_stream_index() compute all of this.
 *   Events (DMC_FLAG_MORE), one per batch, in order:
 *     u64 batch, u32 n, u32 uniform, u64 data_offset, u64 data_len, u64 meta_offset,
 *     u64 meta_len, then n item records as in the GET reply, then (only with
 *     DMC_OPEN_REGIONS on the handle, as in the GET reply) n times u8 in_region
 *   The batch's tensors lie back to back at data_offset, in item order, and its metadata
 *   documents back to back at meta_offset; the item records point inside those two blocks.
 *   uniform is 1 when every item succeeded with the same dtype and shape: the data is then
 *   one C-order tensor (n, frames, channels, height, width). A failed item has its status
 *   and message and takes no space; the batch still comes. The client gives a whole batch
 *   back with RELEASE of data_offset and meta_offset (not of its items' offsets).
 *   With DMC_OPEN_REGIONS, an item in the daemon's hot set is handed in place, as a GET
 *   item is (see Regions): in_region 1, its offset in the handle's region, no copy and no
 *   arena space; it is pinned until the RELEASE of the batch's meta_offset (or the
 *   connection's end; a batch dropped by STOP before it was sent pinned nothing). The
 *   other items are in the arena as above: data_len counts only theirs, and they lie
 *   back to back there (exactly nbytes apart when uniform); the data is one tensor only
 *   when no item is in_region. Without the flag no item is ever in_region and the
 *   trailer is absent (the event of a daemon older than this has none either: clients
 *   take its absence as every item in the arena).
 *   The daemon keeps up to `ahead` batches decoded and sent beyond the one the client is
 *   reading: it prepares batch k + ahead + 1 only when batch k is released.
 *   Final reply: u64 batches (sent), u32 stopped. Errors that end the stream early (a
 *   batch larger than the arena: LIMIT_EXCEEDED) are its final ERROR frame instead.
 *
 * STOP request: u32 stream (the request id of a STREAM of this connection). Batches not
 *   sent yet are dropped; sent ones stay the client's until released. Reply: u32 stopped
 *   (0 when no such stream runs). The stream's own final reply comes before or after it
 *   (after, when items were in work): a client reads until it has both.
 */
enum dmc_dtype {
	DMC_DTYPE_U8 = 1,
	DMC_DTYPE_I8 = 2,
	DMC_DTYPE_U16 = 3,
	DMC_DTYPE_I16 = 4,
	DMC_DTYPE_U32 = 5,
	DMC_DTYPE_I32 = 6,
	DMC_DTYPE_U64 = 7,
	DMC_DTYPE_I64 = 8,
	DMC_DTYPE_F32 = 9,
	DMC_DTYPE_F64 = 10,
	DMC_DTYPE_F16 = 11,  /* IEEE 754 binary16 (numpy's float16) */
	DMC_DTYPE_BF16 = 12, /* bfloat16: the high half of a float32 (torch.bfloat16) */
};
#define DMC_DTYPE_LAST_ 12

#define DMC_OPEN_LUT 1u
#define DMC_OPEN_FRAMES 2u /* frame-by-frame: one item per frame, shape (1, C, H, W) */
#define DMC_OPEN_MASKS 4u  /* each item's segmentation label map, uint8 (F, 1, H, W) */
#define DMC_OPEN_OFFLINE 8u /* as DMC_PREFETCH_OFFLINE: from the caller's grants only */
#define DMC_OPEN_RAW 16u    /* each item's stored original file, uint8 (1, 1, 1, bytes) */
#define DMC_OPEN_POLICY 32u /* a struct dmc_policy follows arena_bytes */
#define DMC_OPEN_REGIONS 64u /* hot tensors handed in the snapshot's region (see Regions) */
#define DMC_OPEN_FLAGS_DEFINED                                                                    \
	(DMC_OPEN_LUT | DMC_OPEN_FRAMES | DMC_OPEN_MASKS | DMC_OPEN_OFFLINE | DMC_OPEN_RAW |          \
	 DMC_OPEN_POLICY | DMC_OPEN_REGIONS)

/* The uniformity policy of OPEN (see above). */
#define DMC_POLICY_SIZE 1u
#define DMC_POLICY_CROP 2u
#define DMC_POLICY_PAD 4u
#define DMC_POLICY_CHANNELS 8u
#define DMC_POLICY_WINDOW 16u
#define DMC_POLICY_OPS_DEFINED                                                                    \
	(DMC_POLICY_SIZE | DMC_POLICY_CROP | DMC_POLICY_PAD | DMC_POLICY_CHANNELS |               \
	 DMC_POLICY_WINDOW)
#define DMC_POLICY_GEOMETRY (DMC_POLICY_SIZE | DMC_POLICY_CROP | DMC_POLICY_PAD)
#define DMC_POLICY_DIM_MAX 65535u
enum dmc_resize {
	DMC_RESIZE_BILINEAR = 1,
	DMC_RESIZE_NEAREST = 2,
	DMC_RESIZE_AREA = 3,
};

struct dmc_policy {
	uint32_t ops;      /* DMC_POLICY_* */
	uint32_t resize;   /* enum dmc_resize, with SIZE */
	uint32_t height, width; /* with SIZE, CROP or PAD */
	uint32_t channels; /* 1 or 3, with CHANNELS */
	double pad_value;  /* with CROP or PAD */
	double window_center, window_width; /* with WINDOW */
};
#define DMC_GET_MAX 4096u

#define DMC_STREAM_SHUFFLE 1u
#define DMC_STREAM_DROP_LAST 2u
#define DMC_STREAM_FLAGS_DEFINED (DMC_STREAM_SHUFFLE | DMC_STREAM_DROP_LAST)
#define DMC_STREAM_AHEAD_DEFAULT 2u
#define DMC_STREAM_AHEAD_MAX 8u

struct dmc_open {
	uint32_t source;
	uint32_t flags;
	uint32_t dtype;
	struct dmc_str project;
	struct dmc_str version;
	struct dmc_str server;
	struct dmc_str api_key;
	uint64_t arena_bytes;
	struct dmc_policy policy; /* with DMC_OPEN_POLICY; else all zero */
};

struct dmc_open_reply {
	uint64_t handle;
	uint64_t snapshot_id;
	uint64_t items;
	struct dmc_str project_id;
	struct dmc_str project_name;
	struct dmc_str version;
	uint64_t arena_bytes;
	/* with DMC_OPEN_REGIONS: the encoder writes them when `regions` is set; the decoder
	 * reads them (and sets `regions`) when the payload holds them */
	bool regions;
	uint64_t region_id, region_bytes;
};

struct dmc_item_desc {
	uint64_t index;
	uint32_t status;
	uint32_t dtype;
	uint32_t ndim;
	uint64_t shape[4];
	uint64_t offset, nbytes;
	uint64_t meta_offset, meta_len;
	struct dmc_str message;
};

struct dmc_stream_req {
	uint64_t handle;
	uint64_t seed, epoch;
	uint32_t flags;
	uint32_t rank, world_size;
	uint32_t batch_size;
	uint32_t ahead;
};

struct dmc_batch_head {
	uint64_t batch;
	uint32_t n;
	uint32_t uniform;
	uint64_t data_offset, data_len;
	uint64_t meta_offset, meta_len;
};

/*
 * Local dataset folders: files read with the requesting user's own permissions.
 *
 * The daemon (often root) never opens a path of a local folder. A PREFETCH or OPEN of a
 * LOCAL source carries one descriptor, the folder's dataset.json, opened by the client
 * beneath the folder (no symbolic link, no "..", read-only, non-blocking). The daemon
 * parses it, refuses it when a path leaves the folder (absolute, "..", empty), and then
 * asks for the files it names, in order (per item: the image, then its segmentation
 * files), a window at a time:
 *
 * LOCAL_NEED event (daemon to client; DMC_FLAG_REPLY | DMC_FLAG_MORE, the request id of
 * the PREFETCH or OPEN):
 *   u32 first, u32 n (1 .. DMC_FDS_MAX), n times str path
 *   first    the position of the first path in the dataset's list of paths (0, then
 *            increasing; windows never overlap and come in order), or DMC_LOCAL_AHEAD
 *            with a sequence number in the low bits: the files of items a GET waits
 *            for, asked ahead of that order (their paths are not consecutive, and a later
 *            window in order asks for them again); answered the same way
 *   path     relative to the folder, at most DMC_LOCAL_PATH_MAX bytes
 *
 * LOCAL_FILES (client to daemon; flags 0, the request id of the PREFETCH or OPEN; no reply
 * of its own: the request's events and final frame go on):
 *   u32 first, u32 n, n times i32 err
 *   first, n as in the LOCAL_NEED it answers. err is 0 when the client opened the path
 *   as a regular file: its descriptor is attached, in path order (nfds = the number of
 *   zeros); else a positive errno (EACCES, ENOENT, ELOOP: a symbolic link, EXDEV: outside
 *   the folder, EINVAL: not a regular file), which fails that item with
 *   "<path>: <reason>".
 *
 * The daemon checks every descriptor with fstat (a regular file; anything else fails the
 * item) and reads it with pread from offset 0 without waiting (a read that would block
 * fails the item). An item is linked to stored content only by the SHA-256 of the bytes
 * just read, or by the same uid's own earlier read of the same inode with the same size,
 * modification and change times. The job needs the requesting connection: when it closes,
 * or the client stops answering, the job ends (CANCELLED); LOCAL jobs are not joined.
 */
#define DMC_LOCAL_PATH_MAX 4096u

/* ---- codec ---- */

/* Codec results. DMC_PROTO_AGAIN: need more bytes. */
enum {
	DMC_PROTO_OK = 0,
	DMC_PROTO_AGAIN = -11,  /* -EAGAIN */
	DMC_PROTO_ERROR = -71,  /* -EPROTO */
	DMC_PROTO_NOSPACE = -105, /* -ENOBUFS: the output buffer is too small */
};

/*
 * Reads a frame header from `buf`. Returns DMC_PROTO_AGAIN when fewer than
 * DMC_HEADER_SIZE bytes are there, DMC_PROTO_ERROR for an invalid header, else
 * DMC_PROTO_OK with *ret_hdr filled. The payload is complete when
 * len >= DMC_HEADER_SIZE + ret_hdr->length.
 */
int dmc_header_decode(const uint8_t *buf, size_t len, struct dmc_header *ret_hdr);

/* Writes the 16 header bytes for `hdr` into `out`. `hdr` must be valid. */
void dmc_header_encode(const struct dmc_header *hdr, uint8_t out[DMC_HEADER_SIZE]);

/* Bounds-checked reader over a payload, with a sticky error. */
struct dmc_reader {
	const uint8_t *buf;
	size_t len;
	size_t pos;
	int err; /* DMC_PROTO_OK until the first failure, then DMC_PROTO_ERROR */
};

/* Bounds-checked writer into a caller-owned buffer, with a sticky error. */
struct dmc_writer {
	uint8_t *buf;
	size_t cap;
	size_t len;
	int err; /* DMC_PROTO_OK until the first failure, then DMC_PROTO_NOSPACE */
};

void dmc_reader_init(struct dmc_reader *r, const void *buf, size_t len);
uint8_t dmc_read_u8(struct dmc_reader *r);
uint16_t dmc_read_u16(struct dmc_reader *r);
uint32_t dmc_read_u32(struct dmc_reader *r);
uint64_t dmc_read_u64(struct dmc_reader *r);
int32_t dmc_read_i32(struct dmc_reader *r);
int64_t dmc_read_i64(struct dmc_reader *r);
struct dmc_str dmc_read_str(struct dmc_reader *r);
/* DMC_PROTO_OK when no read failed and every byte was consumed, else DMC_PROTO_ERROR. */
int dmc_reader_finish(struct dmc_reader *r);

void dmc_writer_init(struct dmc_writer *w, void *buf, size_t cap);
void dmc_write_u8(struct dmc_writer *w, uint8_t v);
void dmc_write_u16(struct dmc_writer *w, uint16_t v);
void dmc_write_u32(struct dmc_writer *w, uint32_t v);
void dmc_write_u64(struct dmc_writer *w, uint64_t v);
void dmc_write_i32(struct dmc_writer *w, int32_t v);
void dmc_write_i64(struct dmc_writer *w, int64_t v);
/* Writes a str field; a string longer than DMC_STR_MAX or with a NUL is a NOSPACE error. */
void dmc_write_str(struct dmc_writer *w, const char *s, size_t len);
void dmc_write_cstr(struct dmc_writer *w, const char *s);

/*
 * Whole frames. Each encoder writes header + payload into `out` (capacity `cap`) and
 * returns the frame's size, or DMC_PROTO_NOSPACE. Each decoder takes the payload only
 * (after the header) and returns DMC_PROTO_OK or DMC_PROTO_ERROR; decoded strings borrow
 * from `payload`.
 *
 * `frame_begin`/`frame_end` let other messages be built field by field: frame_begin
 * reserves the header, frame_end fills it in and returns the frame's size.
 */
void dmc_frame_begin(struct dmc_writer *w, void *out, size_t cap);
int dmc_frame_end(struct dmc_writer *w, uint16_t opcode, uint16_t flags, uint32_t request_id,
		  uint8_t nfds);

int dmc_hello_encode(const struct dmc_hello *m, uint32_t request_id, void *out, size_t cap);
int dmc_hello_decode(const void *payload, size_t len, struct dmc_hello *ret);
int dmc_hello_reply_encode(const struct dmc_hello_reply *m, uint32_t request_id, void *out,
			   size_t cap);
int dmc_hello_reply_decode(const void *payload, size_t len, struct dmc_hello_reply *ret);

int dmc_ping_encode(const struct dmc_ping *m, uint16_t flags, uint32_t request_id, void *out,
		    size_t cap);
int dmc_ping_decode(const void *payload, size_t len, struct dmc_ping *ret);

int dmc_status_encode(uint32_t request_id, void *out, size_t cap);
int dmc_status_decode(const void *payload, size_t len);

/*
 * STATUS reply. Encode: `entries` borrowed for the call. Decode: fills at most `max`
 * entries (more is a protocol error) and sets *ret_n; strings borrow from `payload`.
 */
int dmc_status_reply_encode(const char *version, uint64_t uptime_ms, uint32_t pid,
			    const struct dmc_status_entry *entries, uint32_t n,
			    uint32_t request_id, void *out, size_t cap);
int dmc_status_reply_decode(const void *payload, size_t len, struct dmc_str *ret_version,
			    uint64_t *ret_uptime_ms, uint32_t *ret_pid,
			    struct dmc_status_entry *entries, uint32_t max, uint32_t *ret_n);

int dmc_error_encode(const struct dmc_error_msg *m, uint32_t request_id, void *out, size_t cap);
int dmc_error_decode(const void *payload, size_t len, struct dmc_error_msg *ret);

/* Cache messages. Record readers/writers work inside a frame being built or read. */
int dmc_prefetch_encode(const struct dmc_prefetch *m, uint32_t request_id, void *out,
			size_t cap);
int dmc_prefetch_decode(const void *payload, size_t len, struct dmc_prefetch *ret);

void dmc_progress_write(struct dmc_writer *w, const struct dmc_progress *m);
void dmc_progress_read(struct dmc_reader *r, struct dmc_progress *ret);
/* A PREFETCH event (more = true) or final reply. */
int dmc_progress_encode(const struct dmc_progress *m, bool more, uint32_t request_id, void *out,
			size_t cap);
int dmc_progress_decode(const void *payload, size_t len, struct dmc_progress *ret);

int dmc_cancel_encode(const char *project, const char *server, uint32_t request_id, void *out,
		      size_t cap);
int dmc_cancel_decode(const void *payload, size_t len, struct dmc_str *ret_project,
		      struct dmc_str *ret_server);
int dmc_cancel_reply_encode(uint32_t cancelled, uint32_t request_id, void *out, size_t cap);
int dmc_cancel_reply_decode(const void *payload, size_t len, uint32_t *ret_cancelled);

int dmc_list_encode(uint32_t request_id, void *out, size_t cap);
void dmc_snapshot_info_write(struct dmc_writer *w, const struct dmc_snapshot_info *m);
void dmc_snapshot_info_read(struct dmc_reader *r, struct dmc_snapshot_info *ret);
/* LIST reply: dmc_frame_begin, u32 n, n records, dmc_frame_end(DMC_OP_LIST, REPLY). To read:
 * dmc_reader_init on the payload, dmc_read_u32 for n (<= DMC_LIST_MAX), n records, then
 * dmc_reader_finish. */

int dmc_evict_encode(uint32_t flags, const char *project, uint32_t request_id, void *out,
		     size_t cap);
int dmc_evict_decode(const void *payload, size_t len, uint32_t *ret_flags,
		     struct dmc_str *ret_project);
int dmc_evict_reply_encode(const struct dmc_evict_reply *m, uint32_t request_id, void *out,
			   size_t cap);
int dmc_evict_reply_decode(const void *payload, size_t len, struct dmc_evict_reply *ret);

int dmc_tier_encode(uint32_t action, uint32_t flags, uint32_t request_id, void *out,
		    size_t cap);
int dmc_tier_decode(const void *payload, size_t len, uint32_t *ret_action, uint32_t *ret_flags);
int dmc_tier_reply_encode(const struct dmc_tier_reply *m, uint32_t request_id, void *out,
			  size_t cap);
int dmc_tier_reply_decode(const void *payload, size_t len, struct dmc_tier_reply *ret);
int dmc_verify_encode(uint32_t request_id, void *out, size_t cap);
int dmc_verify_reply_encode(const struct dmc_verify_reply *m, uint32_t request_id, void *out,
			    size_t cap);
int dmc_verify_reply_decode(const void *payload, size_t len, struct dmc_verify_reply *ret);

/* Requests with no fields (STATUS, LIST, VERIFY): DMC_PROTO_OK when the payload is empty. */
int dmc_empty_decode(const void *payload, size_t len);

/* Serving messages. GET and RELEASE lists are read with dmc_reader like LIST.
 * OPEN: the policy is written and read only with DMC_OPEN_POLICY; the decoder checks every
 * field of it (dmc_policy_check) and zeroes it without the flag. */
int dmc_policy_check(const struct dmc_policy *p);
int dmc_open_encode(const struct dmc_open *m, uint32_t request_id, void *out, size_t cap);
int dmc_open_decode(const void *payload, size_t len, struct dmc_open *ret);
int dmc_open_reply_encode(const struct dmc_open_reply *m, uint8_t nfds, uint32_t request_id,
			  void *out, size_t cap);
int dmc_open_reply_decode(const void *payload, size_t len, struct dmc_open_reply *ret);
/* GET request: encode from an array; decode gives the handle and n, the indices follow in r. */
int dmc_get_encode(uint64_t handle, const uint64_t *indices, uint32_t n, uint32_t request_id,
		   void *out, size_t cap);
int dmc_get_begin(struct dmc_reader *r, const void *payload, size_t len, uint64_t *ret_handle,
		  uint32_t *ret_n);
void dmc_item_desc_write(struct dmc_writer *w, const struct dmc_item_desc *m);
void dmc_item_desc_read(struct dmc_reader *r, struct dmc_item_desc *ret);
int dmc_release_encode(const uint64_t *offsets, uint32_t n, uint32_t request_id, void *out,
		       size_t cap);
int dmc_close_encode(uint64_t handle, uint32_t request_id, void *out, size_t cap);
int dmc_stream_encode(const struct dmc_stream_req *m, uint32_t request_id, void *out, size_t cap);
/* Checks every field's range too (flags, rank < world_size, batch_size, ahead). */
int dmc_stream_decode(const void *payload, size_t len, struct dmc_stream_req *ret);
void dmc_batch_head_write(struct dmc_writer *w, const struct dmc_batch_head *m);
void dmc_batch_head_read(struct dmc_reader *r, struct dmc_batch_head *ret);
int dmc_stop_encode(uint32_t stream, uint32_t request_id, void *out, size_t cap);

/*
 * The order of STREAM. dmc_stream_perm(): a keyed bijection of 0 .. n-1 (a 4-round Feistel
 * network over the smallest even number of bits >= 2 that holds n - 1, cycle-walking until
 * the value is below n; round keys from splitmix64 of `key`); O(1) memory, any position.
 * dmc_stream_plan(): the positions a rank reads in an epoch (*ret_per_rank) and its number
 * of batches (*ret_batches). dmc_stream_index(): the item at the rank's q-th position.
 */
uint64_t dmc_stream_perm(uint64_t i, uint64_t n, uint64_t key);
void dmc_stream_plan(uint64_t items, const struct dmc_stream_req *m, uint64_t *ret_per_rank,
		     uint64_t *ret_batches);
uint64_t dmc_stream_index(uint64_t items, const struct dmc_stream_req *m, uint64_t q);

/*
 * Local folders. LOCAL_NEED: encode from `n` paths; decode with dmc_local_need_begin, then n
 * dmc_read_str (each checked by the caller against DMC_LOCAL_PATH_MAX) and dmc_reader_finish.
 * LOCAL_FILES: the encoder sets nfds to the number of zero errs; the decoder checks n <=
 * min(max, DMC_FDS_MAX), each err in 0 .. 4095 and that the zeros number `nfds`.
 * dmc_frame_set_nfds() rewrites the nfds of an encoded frame (PREFETCH and OPEN of LOCAL).
 */
int dmc_local_need_encode(uint32_t first, const char *const *paths, uint32_t n,
			  uint32_t request_id, void *out, size_t cap);
int dmc_local_need_begin(struct dmc_reader *r, const void *payload, size_t len,
			 uint32_t *ret_first, uint32_t *ret_n);
int dmc_local_files_encode(uint32_t first, const int32_t *errs, uint32_t n, uint32_t request_id,
			   void *out, size_t cap);
int dmc_local_files_decode(const void *payload, size_t len, uint8_t nfds, uint32_t *ret_first,
			   uint32_t *ret_n, int32_t *errs, uint32_t max);
int dmc_frame_set_nfds(void *frame, size_t len, uint8_t nfds);

/* Size of one dtype's element in bytes, 0 when unknown. */
unsigned dmc_dtype_size(uint32_t dtype);
/* "uint8", "int16", "float32", ... (numpy names), or NULL. */
const char *dmc_dtype_name(uint32_t dtype);

/* The stable name of an error code ("not_found_or_denied"), or NULL when unknown. */
const char *dmc_error_name(uint32_t code);
/* A short English description of an error code, or NULL when unknown. */
const char *dmc_error_text(uint32_t code);
/* Text of a negative error as the daemon and library return them: -DMC_E_* codes by
 * dmc_error_text(), anything else as an errno by strerror(). Never NULL. */
const char *dmc_err_text(int err);
/* The name of an opcode ("HELLO"), or NULL when unknown. */
const char *dmc_opcode_name(uint16_t opcode);

#ifdef __cplusplus
}
#endif

#endif /* DMC_PROTO_H */
