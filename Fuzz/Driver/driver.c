#include "fuzzdriver.h"

/* libFuzzer's documented entry for programs with their own main (FuzzerInterface.h). */
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*UserCb)(const uint8_t *Data, size_t Size));

int pincache_fuzz_main(int argc, char **argv, int (*one_input)(const uint8_t *data, size_t size)) {
    return LLVMFuzzerRunDriver(&argc, &argv, one_input);
}
