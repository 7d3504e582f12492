/*
 * secret: API keys in memory, and nowhere else (docs/security.md, docs/reliability.md S5).
 *
 * A key lives in its own anonymous mapping, locked in RAM where the limit allows
 * (never swapped), excluded from core dumps (MADV_DONTDUMP) and zeroed in a forked child
 * (MADV_WIPEONFORK); it is wiped before the mapping goes. Nothing here logs, and nothing prints a key. Loop thread or any thread:
 * a secret is immutable after secret_new() and freed by its single owner.
 */
#ifndef DMC_SECRET_H
#define DMC_SECRET_H

#include <stddef.h>

struct secret;

/* A copy of `len` bytes of `key` (borrowed). NULL on failure. */
struct secret *secret_new(const char *key, size_t len);
/* Wipes and frees. NULL is allowed. */
void secret_free(struct secret *s);
/* The key as a NUL-terminated string; borrowed from `s`. */
const char *secret_str(const struct secret *s);
/* Constant-time comparison with `key` of `len` bytes: 1 equal, 0 not. */
int secret_equals(const struct secret *s, const char *key, size_t len);

#endif
