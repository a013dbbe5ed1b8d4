/* What the C test drivers share: counters and the CHECK macro, one line per check. */
#ifndef SHMEMEXT_TEST_CHECK_H
#define SHMEMEXT_TEST_CHECK_H

#include <stdio.h>

static int passed, failed;

#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (cond) {                                                                                                    \
            passed++;                                                                                                  \
            printf("ok - ");                                                                                           \
        } else {                                                                                                       \
            failed++;                                                                                                  \
            printf("FAIL (%s:%d) - ", __FILE__, __LINE__);                                                             \
        }                                                                                                              \
        printf(__VA_ARGS__);                                                                                           \
        printf("\n");                                                                                                  \
        fflush(stdout);                                                                                                \
    } while (0)

#endif
