/*
 * dmcache prefetch: starts (or joins) a prefetch job in dmcached and follows it.
 *
 * On a terminal: one line redrawn with '\r' (bar, percent, items, bytes, rate, ETA).
 * Otherwise: one plain line per second at most, and at each change of state. With
 * --json: one JSON object per event, for scripts. Per-item errors are printed as they
 * come (stderr), the summary at the end (stdout).
 *
 * Ctrl-C detaches: the job belongs to the daemon, which goes on. SIGINT is caught
 * without SA_RESTART and the flag is handed to libdmcache (dmc_set_interrupt_flag), so
 * the wait for the next event returns at once.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"

/* The daemon sends an event about once a second: this much silence means it is stuck. */
#define PREFETCH_TIMEOUT_MS 120000
#define PLAIN_INTERVAL_MS 1000
#define LINE_MAX_COLS 512

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
	(void)sig;
	interrupted = 1;
}

struct view {
	bool tty;            /* redraw one line on stdout */
	bool json;
	bool line_open;      /* a '\r' line is on screen */
	int64_t t0_ms;
	int64_t last_print_ms;
	uint32_t last_state;
	uint64_t errors_printed;
	const char *label;   /* the project as the user named it */
};

static const char *state_name(uint32_t s)
{
	switch (s) {
	case DMC_JOB_RESOLVING: return "resolving";
	case DMC_JOB_LISTING: return "listing";
	case DMC_JOB_DOWNLOADING: return "downloading";
	case DMC_JOB_DONE: return "done";
	case DMC_JOB_FAILED: return "failed";
	case DMC_JOB_CANCELLED: return "cancelled";
	}
	return "unknown";
}

static int terminal_columns(void)
{
	struct winsize ws;

	if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20)
		return ws.ws_col < LINE_MAX_COLS ? ws.ws_col : LINE_MAX_COLS - 1;
	return 80;
}

static const char *project_label(const struct view *v, const struct dmc_progress_info *p)
{
	return *p->project_name ? p->project_name : *p->project_id ? p->project_id : v->label;
}

/*
 * Percent done, or -1 when unknown: of the bytes to download (bytes_total counts what the
 * cache lacked, as the ETA does), else of the items finished (stored or failed).
 */
static int percent(const struct dmc_progress_info *p)
{
	uint64_t fin = p->items_done + p->items_failed;

	if (p->bytes_total)
		return p->bytes_done >= p->bytes_total
			       ? 100
			       : (int)((double)p->bytes_done * 100 / (double)p->bytes_total);
	if (!p->items_total)
		return -1;
	if (fin >= p->items_total)
		return 100;
	return (int)(fin * 100 / p->items_total);
}

/*
 * The numbers: "450/1000 items  1.2 GiB/2.6 GiB  12.3 MiB/s  ETA 1m 52s" on a terminal
 * (sep "  ", of "/"), "450/1000 items, 1.2 GiB of 2.6 GiB, ..." in plain lines.
 */
static void format_numbers(char *buf, size_t len, const struct dmc_progress_info *p,
			   const char *sep, const char *of)
{
	char done[32], total[32], rate[32], eta[32];
	int n;

	cli_format_bytes(done, sizeof(done), p->bytes_done);
	cli_format_bytes(total, sizeof(total), p->bytes_total);
	cli_format_bytes(rate, sizeof(rate), p->rate_bps);
	n = snprintf(buf, len, "%llu/%llu items", (unsigned long long)p->items_done,
		     (unsigned long long)p->items_total);
	if (n < 0 || (size_t)n >= len)
		return;
	if (p->items_failed)
		n += snprintf(buf + n, len - (size_t)n, " (%llu failed)",
			      (unsigned long long)p->items_failed);
	if (n < 0 || (size_t)n >= len)
		return;
	if (p->bytes_total)
		n += snprintf(buf + n, len - (size_t)n, "%s%s%s%s", sep, done, of, total);
	else
		n += snprintf(buf + n, len - (size_t)n, "%s%s", sep, done);
	if (n < 0 || (size_t)n >= len)
		return;
	n += snprintf(buf + n, len - (size_t)n, "%s%s/s", sep, rate);
	if (n < 0 || (size_t)n >= len)
		return;
	if (p->eta_ms) {
		/* rounded up: "ETA 0s" would be a lie while bytes remain */
		cli_format_seconds(eta, sizeof(eta), p->eta_ms + 499);
		snprintf(buf + n, len - (size_t)n, "%sETA %s", sep, eta);
	}
}

static void clear_line(struct view *v)
{
	if (v->line_open) {
		fputs("\r\033[K", stdout);
		fflush(stdout);
		v->line_open = false;
	}
}

static void draw_tty(struct view *v, const struct dmc_progress_info *p)
{
	char line[LINE_MAX_COLS], nums[256], bar[48]; /* the bar is at most 40 cells */
	int cols = terminal_columns(), pct = percent(p), width;

	if (p->state == DMC_JOB_RESOLVING) {
		snprintf(line, sizeof(line), "%s: resolving the project and its version...",
			 project_label(v, p));
	} else if (p->state == DMC_JOB_LISTING) {
		snprintf(line, sizeof(line), "%s: listing resources... %llu so far",
			 project_label(v, p), (unsigned long long)p->items_total);
	} else {
		format_numbers(nums, sizeof(nums), p, "  ", "/");
		/*
		 * "[bar] 100%  numbers": the bar's width depends on the terminal, so that it does
		 * not jump as the numbers change: what typical numbers (about 55 columns) leave,
		 * 10 to 40 cells. Longer numbers shorten it; below 10 cells there is none.
		 */
		width = cols - 1 - 9 - 55;
		if (width > 40)
			width = 40;
		if (width > cols - 1 - 9 - (int)strlen(nums))
			width = cols - 1 - 9 - (int)strlen(nums);
		if (width >= 10 && pct >= 0) {
			int fill = pct * width / 100;
			memset(bar, '#', (size_t)fill);
			memset(bar + fill, '-', (size_t)(width - fill));
			bar[width] = '\0';
			snprintf(line, sizeof(line), "[%s] %3d%%  %s", bar, pct, nums);
		} else if (pct >= 0) {
			snprintf(line, sizeof(line), "%3d%%  %s", pct, nums);
		} else {
			snprintf(line, sizeof(line), "%s", nums);
		}
	}
	if ((int)strlen(line) > cols - 1)
		line[cols - 1] = '\0';
	printf("\r%s\033[K", line);
	fflush(stdout);
	v->line_open = true;
}

static void print_plain(struct view *v, const struct dmc_progress_info *p)
{
	char nums[256];
	int pct = percent(p);

	if (p->state == DMC_JOB_RESOLVING) {
		printf("%s: resolving\n", project_label(v, p));
	} else if (p->state == DMC_JOB_LISTING) {
		printf("%s: listing, %llu resources so far\n", project_label(v, p),
		       (unsigned long long)p->items_total);
	} else {
		format_numbers(nums, sizeof(nums), p, ", ", " of ");
		if (pct >= 0)
			printf("%s: %s %d%%, %s\n", project_label(v, p), state_name(p->state), pct,
			       nums);
		else
			printf("%s: %s, %s\n", project_label(v, p), state_name(p->state), nums);
	}
	fflush(stdout);
}

static void print_item_error(struct view *v, const struct dmc_progress_info *p)
{
	const char *name = dmc_error_name(p->error_code);

	clear_line(v);
	fprintf(stderr, "dmcache: %s%s%s%s (%s", *p->error_resource ? "item " : "",
		p->error_resource, *p->error_resource ? ": " : "",
		*p->error_message ? p->error_message : "failed", name ? name : "error");
	if (p->http_status)
		fprintf(stderr, ", HTTP %u", p->http_status);
	fputs(")\n", stderr);
	v->errors_printed++;
}

/* A notice (code 0, a message): a request is retried; one line per event, so per retry. */
static void print_notice(struct view *v, const struct dmc_progress_info *p)
{
	clear_line(v);
	fprintf(stderr, "dmcache: %s%s%s%s\n", *p->error_resource ? "item " : "",
		p->error_resource, *p->error_resource ? ": " : "", p->error_message);
}

static json_t *progress_json(const char *event, const struct dmc_progress_info *p,
			     int64_t elapsed_ms)
{
	json_t *o = json_object();

	json_object_set_new(o, "event", json_string(event));
	json_object_set_new(o, "job_id", json_integer((json_int_t)p->job_id));
	json_object_set_new(o, "snapshot_id", json_integer((json_int_t)p->snapshot_id));
	json_object_set_new(o, "state", json_string(state_name(p->state)));
	json_object_set_new(o, "project_id", json_string(p->project_id));
	json_object_set_new(o, "project_name", json_string(p->project_name));
	json_object_set_new(o, "version", json_string(p->version));
	json_object_set_new(o, "items_total", json_integer((json_int_t)p->items_total));
	json_object_set_new(o, "items_done", json_integer((json_int_t)p->items_done));
	json_object_set_new(o, "items_cached", json_integer((json_int_t)p->items_cached));
	json_object_set_new(o, "items_failed", json_integer((json_int_t)p->items_failed));
	json_object_set_new(o, "bytes_total", json_integer((json_int_t)p->bytes_total));
	json_object_set_new(o, "bytes_done", json_integer((json_int_t)p->bytes_done));
	json_object_set_new(o, "rate_bps", json_integer((json_int_t)p->rate_bps));
	json_object_set_new(o, "eta_ms", json_integer((json_int_t)p->eta_ms));
	json_object_set_new(o, "elapsed_ms", json_integer(elapsed_ms));
	if (p->error_code) {
		const char *name = dmc_error_name(p->error_code);
		json_t *e = json_object();

		json_object_set_new(e, "code", json_integer(p->error_code));
		json_object_set_new(e, "name", name ? json_string(name) : json_null());
		json_object_set_new(e, "http_status", json_integer(p->http_status));
		json_object_set_new(e, "resource", json_string(p->error_resource));
		json_object_set_new(e, "message", json_string(p->error_message));
		json_object_set_new(o, "error", e);
	} else if (*p->error_message) {
		json_object_set_new(o, "notice", json_string(p->error_message));
		if (*p->error_resource)
			json_object_set_new(o, "notice_resource", json_string(p->error_resource));
	}
	return o;
}

/* Prints `o` as one line and frees it. */
static void print_json_line(json_t *o)
{
	char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);

	if (text)
		printf("%s\n", text);
	fflush(stdout);
	free(text);
	json_decref(o);
}

static int on_progress(const struct dmc_progress_info *p, void *userdata)
{
	struct view *v = userdata;
	int64_t now = cli_now_ms();

	if (interrupted)
		return 1;
	if (v->json) {
		print_json_line(progress_json("progress", p, now - v->t0_ms));
		return 0;
	}
	if (p->error_code)
		print_item_error(v, p);
	else if (*p->error_message)
		print_notice(v, p);
	if (v->tty) {
		draw_tty(v, p);
	} else if (p->state != v->last_state || now - v->last_print_ms >= PLAIN_INTERVAL_MS) {
		print_plain(v, p);
		v->last_print_ms = now;
	}
	v->last_state = p->state;
	return 0;
}

static void print_summary(struct view *v, const struct dmc_progress_info *p)
{
	char bytes[32], took[32], rate[32];
	int64_t elapsed = cli_now_ms() - v->t0_ms;
	uint64_t fetched = p->items_done >= p->items_cached ? p->items_done - p->items_cached : 0;

	clear_line(v);
	if (p->state == DMC_JOB_FAILED && p->error_code && !v->errors_printed)
		print_item_error(v, p); /* the first error, when no event showed it */
	cli_format_bytes(bytes, sizeof(bytes), p->bytes_done);
	cli_format_seconds(took, sizeof(took), elapsed > 0 ? (uint64_t)elapsed : 0);
	cli_format_bytes(rate, sizeof(rate),
			 elapsed > 0 ? p->bytes_done * 1000 / (uint64_t)elapsed : 0);
	printf("%s%s%s: %s\n", project_label(v, p), *p->version ? " version " : "", p->version,
	       p->state == DMC_JOB_DONE && !p->items_failed ? "complete"
	       : p->state == DMC_JOB_CANCELLED		   ? "cancelled"
							   : "finished with failures");
	printf("  items:  %llu of %llu stored (%llu downloaded, %llu from the cache), "
	       "%llu failed\n",
	       (unsigned long long)p->items_done, (unsigned long long)p->items_total,
	       (unsigned long long)fetched, (unsigned long long)p->items_cached,
	       (unsigned long long)p->items_failed);
	printf("  bytes:  %s downloaded in %s (%s/s)\n", bytes, took, rate);
	if (p->snapshot_id)
		printf("  snapshot %llu (dmcache ls)\n", (unsigned long long)p->snapshot_id);
	if (!p->error_code && *p->error_message)
		printf("  %s\n", p->error_message); /* e.g. "served from cache: ..." */
	fflush(stdout);
}

static void prefetch_usage(FILE *out)
{
	fprintf(out,
		"Usage: dmcache prefetch PROJECT [--version V] [--server URL] [--api-key KEY]\n"
		"                        [--json] [--offline] [--allow-partial] [--decode]\n"
		"                        [--shard RANK/WORLD|auto] [--to-tier]\n"
		"       dmcache prefetch --source DIR [--json] [--decode]\n"
		"       dmcache prefetch --cancel PROJECT [--server URL] [--json]\n"
		"       dmcache prefetch --cancel --source DIR [--json]\n"
		"Brings a dataset version into dmcached's cache and shows the progress.\n\n"
		"  PROJECT          a Datamint project name or id\n"
		"  --version V      a version (the project's updated_at); default: the newest\n"
		"  --server URL     the Datamint API (default: DATAMINT_API_URL, then\n"
		"                   datamintapi.yaml, then " DMC_DATAMINT_DEFAULT_URL ")\n"
		"  --api-key KEY    the API key; other users can see it in ps: prefer\n"
		"                   DATAMINT_API_KEY or datamint-config's datamintapi.yaml\n"
		"  --source DIR     a local dataset directory (dataset.json, images/) instead\n"
		"                   of Datamint: no server, no key\n"
		"  --json           one JSON object per event on stdout (with --cancel: one\n"
		"                   object, the jobs cancelled)\n"
		"  --offline        do not contact the server: check that the newest complete\n"
		"                   snapshot you were entitled to within grant_ttl is there\n"
		"                   (also DMCACHE_OFFLINE=1)\n"
		"  --allow-partial  start even if the snapshot does not fit in max_size or above\n"
		"                   min_free (what cannot be stored fails); without it such a\n"
		"                   prefetch is refused at once with the numbers\n"
		"  --decode         then decode the compressed items (JPEG, JPEG 2000, RLE,\n"
		"                   PNG, .nii.gz...) into the tensor cache, so that the first\n"
		"                   epoch reads stored tensors; an item that cannot be decoded\n"
		"                   is reported and does not fail the prefetch\n"
		"  --shard R/W      fetch only this node's share: the items whose position in\n"
		"                   the listing is R modulo W (the whole project is listed);\n"
		"                   --shard auto: RANK/WORLD_SIZE from the environment\n"
		"                   (torchrun's)\n"
		"  --to-tier        fill the daemon's cluster tier (tier_url), not its cache:\n"
		"                   what the tier lacks is downloaded, uploaded and dropped\n"
		"  --cancel         stop the running job instead (exit 0 even if none ran)\n\n"
		"Ctrl-C detaches: the daemon goes on with the job (exit status 130).\n"
		"Exit status: 0 every item stored, 1 items failed or the job could not run,\n"
		"2 usage or credentials error, 3 the daemon could not be reached, 4 a local\n"
		"error.\n");
}

static int do_cancel(const char *project, const char *server, bool json)
{
	char srv[4096];
	uint32_t n = 0;
	dmc_client *c;
	int rc;

	srv[0] = '\0';
	if (server) {
		size_t len = strlen(server);
		while (len && server[len - 1] == '/')
			len--; /* as the credentials code stores it */
		if (len >= sizeof(srv)) {
			fprintf(stderr, "dmcache prefetch: the server URL is too long\n");
			return EXIT_USAGE;
		}
		memcpy(srv, server, len);
		srv[len] = '\0';
	}
	c = cli_connect(CLI_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_cancel(c, project, srv, &n);
	if (rc < 0) {
		rc = cli_report(c, "prefetch --cancel", rc);
		dmc_close(c);
		return rc;
	}
	dmc_close(c);
	if (json) {
		json_t *o = json_object();

		json_object_set_new(o, "project", json_string(project));
		json_object_set_new(o, "cancelled", json_integer(n));
		return cli_print_json(o);
	}
	if (n)
		printf("cancelled %u prefetch job%s of '%s'\n", n, n == 1 ? "" : "s", project);
	else
		printf("no prefetch of '%s' is running\n", project);
	return 0;
}

/* Installs on_sigint for SIGINT, without SA_RESTART, so blocking waits see EINTR. */
static void catch_sigint(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigint;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;
	sigaction(SIGINT, &sa, NULL);
}

static int follow(struct view *v, const struct dmc_prefetch_args *a, const char *cancel_hint)
{
	struct dmc_progress_info fin;
	dmc_client *c;
	int rc;

	c = cli_connect(PREFETCH_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	dmc_set_interrupt_flag(c, &interrupted);
	v->t0_ms = v->last_print_ms = cli_now_ms();
	if (!v->json && !v->tty) {
		printf("%s: starting the prefetch\n", v->label);
		fflush(stdout);
	}
	rc = dmc_prefetch(c, a, on_progress, v, &fin);
	if (rc == -EINTR || rc == -ECANCELED) {
		clear_line(v);
		if (v->json) {
			json_t *o = json_object();
			json_object_set_new(o, "event", json_string("detached"));
			print_json_line(o);
		}
		fprintf(stderr, "detached: dmcached continues the prefetch; "
				"`dmcache prefetch --cancel %s` stops it\n",
			cancel_hint);
		dmc_close(c);
		return EXIT_DETACHED;
	}
	if (rc < 0) {
		const struct dmc_error_info *e = dmc_last_error(c);

		clear_line(v);
		if (v->json && rc <= -DMC_E_FIRST_ && e->code) {
			json_t *o = json_object();
			const char *name = dmc_error_name(e->code);

			json_object_set_new(o, "event", json_string("error"));
			json_object_set_new(o, "code", json_integer(e->code));
			json_object_set_new(o, "name", name ? json_string(name) : json_null());
			json_object_set_new(o, "http_status", json_integer(e->http_status));
			json_object_set_new(o, "retry_after_ms", json_integer(e->retry_after_ms));
			json_object_set_new(o, "resource", json_string(e->resource));
			json_object_set_new(o, "message", json_string(e->message));
			print_json_line(o);
		}
		if (rc <= -DMC_E_FIRST_ || rc == -EINVAL || rc == -ENOMEM) {
			rc = cli_report(c, "prefetch", rc);
		} else {
			if (rc == -ETIMEDOUT)
				fprintf(stderr, "dmcache: prefetch: the daemon sent no progress for "
						"%d s\n",
					PREFETCH_TIMEOUT_MS / 1000);
			else
				fprintf(stderr, "dmcache: prefetch: lost the daemon (%s); the job may "
						"go on: `dmcache ls` shows what is cached\n",
					dmc_strerror(rc));
			rc = EXIT_UNREACHABLE;
		}
		dmc_close(c);
		return rc;
	}
	if (v->json) {
		print_json_line(progress_json("final", &fin, cli_now_ms() - v->t0_ms));
	} else {
		print_summary(v, &fin);
	}
	rc = fin.state == DMC_JOB_DONE && fin.items_failed == 0 ? 0 : EXIT_DAEMON_ERROR;
	dmc_close(c);
	return rc;
}

int cmd_prefetch(int argc, char **argv)
{
	enum { O_VERSION = 1000, O_SERVER, O_API_KEY, O_SOURCE, O_JSON, O_CANCEL, O_OFFLINE,
	       O_PARTIAL, O_DECODE, O_SHARD, O_TO_TIER };
	static const struct option opts[] = { { "version", required_argument, NULL, O_VERSION },
					      { "server", required_argument, NULL, O_SERVER },
					      { "api-key", required_argument, NULL, O_API_KEY },
					      { "source", required_argument, NULL, O_SOURCE },
					      { "json", no_argument, NULL, O_JSON },
					      { "cancel", no_argument, NULL, O_CANCEL },
					      { "offline", no_argument, NULL, O_OFFLINE },
					      { "allow-partial", no_argument, NULL, O_PARTIAL },
					      { "decode", no_argument, NULL, O_DECODE },
					      { "shard", required_argument, NULL, O_SHARD },
					      { "to-tier", no_argument, NULL, O_TO_TIER },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	const char *version = NULL, *server = NULL, *source = NULL, *project = NULL;
	char *key_opt = NULL, dir[PATH_MAX], hint[PATH_MAX + 16], err[1024];
	struct dmc_credentials cr = { 0 };
	struct dmc_prefetch_args a = { 0 };
	struct view v = { 0 };
	bool cancel = false;
	int opt, rc;

	optind = 0; /* 0, not 1: glibc then parses afresh (options may follow operands) */
	while ((opt = cli_getopt(argc, argv, "prefetch", "h", opts)) != -1) {
		switch (opt) {
		case O_VERSION: version = optarg; break;
		case O_SERVER: server = optarg; break;
		case O_SOURCE: source = optarg; break;
		case O_JSON: v.json = true; break;
		case O_CANCEL: cancel = true; break;
		case O_OFFLINE: a.flags |= DMC_PREFETCH_OFFLINE; break;
		case O_PARTIAL: a.flags |= DMC_PREFETCH_ALLOW_PARTIAL; break;
		case O_DECODE: a.flags |= DMC_PREFETCH_DECODE; break;
		case O_TO_TIER: a.flags |= DMC_PREFETCH_TO_TIER; break;
		case O_SHARD: {
			unsigned rank, world;
			char tail, spec[64];
			const char *arg = optarg;
			if (strcmp(optarg, "auto") == 0) {
				/* torch.distributed's environment (torchrun, env:// init) */
				const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
				if (!r || !w) {
					fprintf(stderr, "dmcache prefetch: --shard auto takes RANK and "
							"WORLD_SIZE from the environment (as torchrun "
							"sets them): %s is not set\n",
						!r ? "RANK" : "WORLD_SIZE");
					rc = EXIT_USAGE;
					goto out;
				}
				snprintf(spec, sizeof(spec), "%.30s/%.30s", r, w);
				arg = spec;
			}
			if (sscanf(arg, "%u/%u%c", &rank, &world, &tail) != 2 || world < 1 ||
			    world > DMC_SHARD_WORLD_MAX || rank >= world) {
				fprintf(stderr, "dmcache prefetch: --shard wants RANK/WORLD with "
						"0 <= RANK < WORLD <= %u, not '%s'%s\n",
					DMC_SHARD_WORLD_MAX, arg,
					arg == optarg ? "" : " (RANK/WORLD_SIZE)");
				rc = EXIT_USAGE;
				goto out;
			}
			a.flags |= DMC_PREFETCH_SHARD;
			a.shard_rank = rank;
			a.shard_world = world;
			break;
		}
		case O_API_KEY:
			free(key_opt);
			key_opt = strdup(optarg);
			if (!key_opt)
				return cli_no_memory("prefetch");
			/* shorten the time it shows in /proc/PID/cmdline */
			explicit_bzero(optarg, strlen(optarg));
			break;
		case 'h':
			prefetch_usage(stdout);
			return 0;
		default:
			rc = EXIT_USAGE;
			goto out;
		}
	}
	if (optind < argc)
		project = argv[optind++];
	if (optind < argc) {
		rc = cli_unexpected("prefetch", argv[optind]);
		goto out;
	}
	if (!project == !source || (project && !*project)) {
		fprintf(stderr, "dmcache prefetch: give either a PROJECT or --source DIR "
				"(dmcache prefetch --help)\n");
		rc = EXIT_USAGE;
		goto out;
	}
	if (source && (server || key_opt)) {
		fprintf(stderr, "dmcache prefetch: a local --source takes no --server or "
				"--api-key\n");
		rc = EXIT_USAGE;
		goto out;
	}
	if (source) {
		struct stat st;

		if (!realpath(source, dir) || stat(dir, &st) != 0) {
			fprintf(stderr, "dmcache prefetch: --source '%s': %s\n", source,
				strerror(errno));
			rc = EXIT_USAGE;
			goto out;
		}
		if (!S_ISDIR(st.st_mode)) {
			fprintf(stderr, "dmcache prefetch: --source '%s' is not a directory\n",
				source);
			rc = EXIT_USAGE;
			goto out;
		}
		project = dir;
		snprintf(hint, sizeof(hint), "--source %s", dir);
	} else {
		snprintf(hint, sizeof(hint), "%s", project);
	}
	if (cancel) {
		if (key_opt || version)
			fprintf(stderr, "dmcache prefetch: --cancel ignores --api-key and "
					"--version\n");
		rc = do_cancel(project, server, v.json);
		goto out;
	}

	a.project = project;
	a.version = version;
	if (source) {
		a.source = DMC_SOURCE_LOCAL;
	} else {
		if (key_opt)
			fprintf(stderr, "dmcache: warning: --api-key is visible to other users "
					"(ps, /proc); prefer DATAMINT_API_KEY or datamint-config\n");
		rc = dmc_credentials_load(key_opt, server, &cr, err, sizeof(err));
		if (rc < 0) {
			fprintf(stderr, "dmcache prefetch: %s\n", err);
			rc = EXIT_USAGE;
			goto out;
		}
		if (cli_offline_env())
			a.flags |= DMC_PREFETCH_OFFLINE;
		if (!cr.api_key && !(a.flags & DMC_PREFETCH_OFFLINE)) {
			rc = cli_no_key("prefetch", cr.file);
			goto out;
		}
		a.source = DMC_SOURCE_DATAMINT;
		a.server = cr.server;
		a.api_key = cr.api_key;
	}
	v.tty = !v.json && isatty(STDOUT_FILENO);
	v.label = source ? dir : project;
	catch_sigint();
	rc = follow(&v, &a, hint);
out:
	dmc_credentials_done(&cr);
	if (key_opt) {
		explicit_bzero(key_opt, strlen(key_opt));
		free(key_opt);
	}
	return rc;
}
