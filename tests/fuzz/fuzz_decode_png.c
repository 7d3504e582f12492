/*
 * Fuzz target: the PNG decoder through the public decode API (probe, decode, metadata),
 * with a context reused across inputs as a decoder worker reuses it. Inputs of other
 * formats are skipped so that the fuzzer spends its time inside this one.
 */
#include <stddef.h>
#include <stdint.h>

#include "decode.h"

int fuzz_decode_one(enum decode_format want, const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return fuzz_decode_one(DECODE_FORMAT_PNG, data, size);
}
