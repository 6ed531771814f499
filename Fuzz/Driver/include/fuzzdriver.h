#ifndef PINCACHE_FUZZDRIVER_H
#define PINCACHE_FUZZDRIVER_H
#include <stddef.h>
#include <stdint.h>

/* SwiftPM links an executable target's `main` to its top-level code (`--defsym
 * main=<Module>_main`), so libFuzzer's own main is never linked in: each target's
 * main.swift hands its one-input function to libFuzzer's driver through this. */
int pincache_fuzz_main(int argc, char **argv, int (*one_input)(const uint8_t *data, size_t size));

#endif
