/*
 * Replays a fuzz target's corpus as an ordinary test (after systemd's fuzz-main.c).
 *
 * Usage: replay FILE|DIR...: every regular file named, or found directly inside a named
 * directory, is passed to LLVMFuzzerTestOneInput once. A crash, a sanitizer report or a
 * hang fails the test; the output is TAP, one line per input.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REPLAY_FILE_MAX (16u << 20)

static int run_file(const char *path, unsigned *n)
{
	FILE *f = fopen(path, "rb");
	uint8_t *buf = NULL;
	long size;

	if (!f) {
		printf("not ok %u - %s: %s\n", ++*n, path, strerror(errno));
		return 1;
	}
	if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || size > REPLAY_FILE_MAX ||
	    fseek(f, 0, SEEK_SET) != 0) {
		printf("not ok %u - %s: unreadable or larger than %u bytes\n", ++*n, path,
		       REPLAY_FILE_MAX);
		fclose(f);
		return 1;
	}
	/* A copy of exactly `size` bytes, so ASan sees any read past the input's end. */
	buf = malloc(size ? (size_t)size : 1);
	if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
		printf("not ok %u - %s: read failed\n", ++*n, path);
		free(buf);
		fclose(f);
		return 1;
	}
	fclose(f);
	LLVMFuzzerTestOneInput(buf, (size_t)size);
	free(buf);
	printf("ok %u - %s\n", ++*n, path);
	fflush(stdout);
	return 0;
}

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
	unsigned n = 0;
	int failed = 0;

	for (int i = 1; i < argc; i++) {
		struct stat st;
		DIR *d;
		struct dirent *de;
		char **names = NULL;
		size_t count = 0, cap = 0;

		if (stat(argv[i], &st) != 0 || !S_ISDIR(st.st_mode)) {
			failed |= run_file(argv[i], &n);
			continue;
		}
		d = opendir(argv[i]);
		if (!d) {
			printf("not ok %u - %s: %s\n", ++n, argv[i], strerror(errno));
			failed = 1;
			continue;
		}
		while ((de = readdir(d))) {
			size_t len;
			char *p;

			if (de->d_name[0] == '.')
				continue;
			if (count == cap) {
				char **nn = realloc(names, (cap = cap ? 2 * cap : 64) * sizeof(*nn));
				if (!nn)
					abort();
				names = nn;
			}
			len = strlen(argv[i]) + 1 + strlen(de->d_name) + 1;
			p = malloc(len);
			if (!p)
				abort();
			snprintf(p, len, "%s/%s", argv[i], de->d_name);
			names[count++] = p;
		}
		closedir(d);
		qsort(names, count, sizeof(*names), cmp_names);
		for (size_t k = 0; k < count; k++) {
			if (stat(names[k], &st) == 0 && S_ISREG(st.st_mode))
				failed |= run_file(names[k], &n);
			free(names[k]);
		}
		free(names);
	}
	printf("1..%u\n", n);
	return failed;
}
