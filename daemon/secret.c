/* API keys in memory only: see secret.h. */
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "secret.h"

struct secret {
	size_t map_len;
	size_t len;
	char key[];
};

struct secret *secret_new(const char *key, size_t len)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t need = sizeof(struct secret) + len + 1;
	size_t map_len = (need + page - 1) / page * page;
	struct secret *s;

	if (len > (1u << 16))
		return NULL;
	s = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s == MAP_FAILED)
		return NULL;
	(void)madvise(s, map_len, MADV_DONTDUMP);
#ifdef MADV_WIPEONFORK
	/* a child (the decoder zygote, forked after the tier's credentials are taken from
	 * the environment) sees zeros here */
	(void)madvise(s, map_len, MADV_WIPEONFORK);
#endif
	(void)mlock(s, map_len); /* best effort: RLIMIT_MEMLOCK may say no */
	s->map_len = map_len;
	s->len = len;
	memcpy(s->key, key, len);
	s->key[len] = '\0';
	return s;
}

void secret_free(struct secret *s)
{
	size_t map_len;

	if (!s)
		return;
	map_len = s->map_len;
	explicit_bzero(s, map_len);
	munlock(s, map_len);
	munmap(s, map_len);
}

const char *secret_str(const struct secret *s)
{
	return s->key;
}

int secret_equals(const struct secret *s, const char *key, size_t len)
{
	unsigned char diff = (unsigned char)(s->len != len);
	size_t n = s->len < len ? s->len : len;

	for (size_t i = 0; i < n; i++)
		diff |= (unsigned char)(s->key[i] ^ key[i]);
	return diff == 0;
}
