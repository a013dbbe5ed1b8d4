/* Compiled as C and as C++ with warnings as errors: the header must be clean in both. */
#include <Python.h>
#include <shmemext.h>

int shmemext_header_check(void);
int shmemext_header_check(void)
{
    ShmemExt_Error err;
    err.code = SHMEMEXT_OK;
    return err.code + (int)sizeof(ShmemExt_CAPI) + (ShmemExtAPI == NULL ? 0 : 1);
}
